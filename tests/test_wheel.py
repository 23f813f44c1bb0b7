"""The package users install: `python -m build` makes a wheel that trains from an empty directory.

The wheel is built from a copy of the checkout (the build writes build/ and *.egg-info beside
its sources), installed without dependencies into a fresh virtualenv, and run there from an
empty working directory, so nothing of the checkout can be found: not its `gin_configs/`, not
its `tagi_jax/`. The dependencies (jax, seqio, ...) come from this test environment through a
`.pth` line, without its editable install of tagi_jax (a `.pth` line adds a directory to the
path but does not run the `.pth` files inside it). No network: `--no-isolation`, `--no-index`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from tagi_jax.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    source = tmp_path_factory.mktemp("source")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    shutil.copytree(os.path.join(ROOT, "tagi_jax"), source / "tagi_jax", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    dist = tmp_path_factory.mktemp("dist")
    _run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist)],
        cwd=source,
    )
    (built,) = [name for name in os.listdir(dist) if name.endswith(".whl")]
    return str(dist / built)


def test_the_wheel_ships_the_gin_files_and_dataset_lists(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    gin_files = {n for n in names if n.endswith(".gin")}
    here = {
        os.path.relpath(os.path.join(d, f), ROOT)
        for d, _, files in os.walk(os.path.join(ROOT, "tagi_jax", "gin_configs"))
        for f in files
        if f.endswith(".gin")
    }
    assert gin_files == here and "tagi_jax/gin_configs/runs/tiny_cpu.gin" in gin_files
    assert "tagi_jax/gin_configs/models/__init__.py" in names  # gin's package lookup
    assert any(n.startswith("tagi_jax/data/lists/") for n in names)
    assert not any(n.startswith(("tests/", "gin_configs/", "benchmarks/")) for n in names)


def test_the_installed_wheel_trains_from_an_empty_directory(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = str(venv / "bin" / "python")
    _run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps"]
        + ["--no-index", "--disable-pip-version-check", wheel]
    )
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    with open(os.path.join(site.stdout.strip(), "test_dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")

    suite = tmp_path / "suite"
    synthetic.write_suite(str(suite), instances_per_train_task=8, instances_per_test_task=4)
    empty = tmp_path / "empty"
    empty.mkdir()
    # a user's shell: no PYTHONPATH, and not the 8 fake CPU devices of the test session
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    where = _run([python, "-c", "import tagi_jax; print(tagi_jax.__file__)"], cwd=empty, env=env)
    assert where.stdout.strip().startswith(str(venv)), where.stdout

    run_dir = tmp_path / "run"
    args = [
        "--gin_file=runs/tiny_cpu.gin",
        f"--gin.MODEL_DIR='{run_dir}'",
        f"--gin.DATA_DIR='{suite}'",
        "--gin.TRAIN_STEPS=4",
        "--gin.train.save_every=4",
    ]
    result = _run([python, "-m", "tagi_jax.train", *args], cwd=empty, env=env)
    assert os.path.isdir(run_dir / "checkpoints" / "4"), (result.stdout, os.listdir(run_dir))
    assert os.listdir(empty) == []  # nothing written where it ran
