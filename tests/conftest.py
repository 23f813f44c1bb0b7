"""Test environment: 8 fake CPU devices, no network, quiet TensorFlow, XLA's compilation cache;
and what several modules share: one tiny finished run per session (``tiny_run``), the suite
it trains on (``tiny_suite``), a CLI's ``main`` run in this process (``run_main``).

The environment must be set before jax initialises a backend, so it sits at the top of
conftest.
"""

import fcntl
import getpass
import os
import shutil
import subprocess
import sys
import tempfile
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight fake devices for the sharding tests; a stuck collective fails in seconds, not minutes
# (see ../shared/docs/dependencies.md §3).
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if "collective_call_terminate_timeout" not in _flags:
    _flags += (
        " --xla_cpu_collective_call_warn_stuck_timeout_seconds=5"
        " --xla_cpu_collective_call_terminate_timeout_seconds=10"
    )
os.environ["XLA_FLAGS"] = _flags.strip()
# XLA's persistent compilation cache: the suite compiles the same tiny models many times over
# (every tiny run, in this process and in the CLI subprocesses, which inherit these variables).
# A cache hit is the executable XLA compiled for the same program, so nothing a test checks
# changes; only the compile time goes. Local runs keep it between runs (delete the directory to
# empty it; no size limit: JAX's limit rescans the directory on every write, which costs more
# than it saves); launch/run_tests.sh gives CI a fresh, empty one.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"tagi_jax_tests_xla_cache_{getpass.getuser()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shared_data_dir():
    """../shared/data next to the repository (never copied into it)."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.abspath(os.path.join(here, "..", "..", "shared", "data"))
    if not os.path.isdir(path):
        pytest.skip(f"shared data not found at {path}")
    return path


@pytest.fixture(scope="session")
def sentencepiece_dir(tmp_path_factory, shared_data_dir):
    """A SentencePiece model with T5's id layout, trained on the fly on the shared SNI text,
    saved as ``spiece.model`` in a checkpoint-like directory."""
    from tagi_jax.testing import sentencepiece_model

    out = tmp_path_factory.mktemp("spm")
    lines = sentencepiece_model.sni_text(os.path.join(shared_data_dir, "sni"))
    return sentencepiece_model.train(lines, str(out), vocab_size=512)


@pytest.fixture(scope="module")
def bucket():
    """One fake ``gs://`` bucket per test module, on the local GCS emulator
    (``tagi_jax.testing.fake_gcs``, started once per process; no network)."""
    from tagi_jax.testing import fake_gcs

    if not fake_gcs.available():
        pytest.skip("gcp-storage-emulator / gcsfs not installed (requirements-test.txt)")
    with fake_gcs.fake_gcs() as root:
        yield root


# --- one tiny finished run per test session ---------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The CLI as a user's laptop runs it: one CPU device (this process has eight fake ones).
ONE_DEVICE_ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
TINY_RUN_STEPS = 4


def shared_once(tmp_path_factory, name: str, build) -> str:
    """``build(path)`` once per test run, also under pytest-xdist: the first process that needs
    ``name`` builds it under a lock in the run's shared temporary directory (the parent of the
    workers' own), the others wait for it and reuse it. A failed build is retried by the next
    test that needs it (and fails it the same way). Returns the path."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / f"{name}.done").exists():
            shutil.rmtree(path, ignore_errors=True)
            build(str(path))
            (root / f"{name}.done").touch()
    return str(path)


@pytest.fixture(scope="session")
def tiny_suite(tmp_path_factory):
    """The built-in suite at test size (8 instances per training task, 4 per test task), shared
    by every module that trains ``runs/tiny_cpu.gin``. Read only."""

    def build(path):
        from tagi_jax.data import synthetic

        synthetic.write_suite(path, instances_per_train_task=8, instances_per_test_task=4)

    return shared_once(tmp_path_factory, "tiny_suite", build)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_suite):
    """One finished tiny run per session, trained as a user trains it: ``python -m
    tagi_jax.train --gin_file=runs/tiny_cpu.gin`` in a child process with one CPU device,
    ``TINY_RUN_STEPS`` steps, a metrics line every step (MFU included), no base checkpoint, its
    one checkpoint at the last step (``save_every`` 10) and the loop's export.

    Shared by the CLI, training-loop and export tests: read only (copy it to change it). Gives
    ``model_dir``, ``suite``, ``steps`` and the CLI's ``stdout``/``stderr``."""

    def build(path):
        os.makedirs(path)
        model_dir = os.path.join(path, "run")
        flags = [
            "--gin_file=runs/tiny_cpu.gin",
            f"--gin.MODEL_DIR='{model_dir}'",
            f"--gin.DATA_DIR='{tiny_suite}'",
            f"--gin.TRAIN_STEPS={TINY_RUN_STEPS}",
            "--gin.train.log_every=1",
            "--gin.train.peak_flops_per_device=1e12",
        ]
        done = subprocess.run(
            [sys.executable, "-m", "tagi_jax.train", *flags],
            capture_output=True,
            text=True,
            env=ONE_DEVICE_ENV,
            cwd=ROOT,
            timeout=600,
        )
        assert done.returncode == 0, f"the tiny run failed:\n{done.stderr[-3000:]}"
        for stream in ("stdout", "stderr"):
            with open(os.path.join(path, f"cli.{stream}"), "w") as f:
                f.write(getattr(done, stream))

    path = shared_once(tmp_path_factory, "tiny_run", build)
    streams = {}
    for stream in ("stdout", "stderr"):
        with open(os.path.join(path, f"cli.{stream}")) as f:
            streams[stream] = f.read()
    return types.SimpleNamespace(
        model_dir=os.path.join(path, "run"), suite=tiny_suite, steps=TINY_RUN_STEPS, **streams
    )


@pytest.fixture
def run_main(capsys):
    """A CLI's ``main(argv)`` in this process, as ``python -m`` runs it from the repository
    root: ``(exit status, stdout, stderr)``; gin is cleared after it. For the checks of exit
    status and error lines that do not need a process of their own (no fresh JAX and TensorFlow
    import each)."""

    import gin

    def run(main, argv):
        capsys.readouterr()
        cwd = os.getcwd()
        os.chdir(ROOT)
        gin.clear_config()
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = e.code
        finally:
            os.chdir(cwd)
            gin.clear_config()
        out, err = capsys.readouterr()
        return code, out, err

    return run


# --- order -----------------------------------------------------------------------------------

# The longest test files first (a file's tests keep their order): under pytest-xdist's
# ``--dist loadfile`` (launch/run_tests.sh) a worker takes the next file when it finishes one,
# so the suite does not end with one worker alone on a long file.
LONGEST_FIRST = (
    "test_main_job.py",
    "test_wheel.py",
    "test_p3_eval.py",
    "test_stages.py",
    "test_training_loop.py",
    "test_export_evaluate.py",
    "test_tagi.py",
    "test_train_step.py",
    "test_t5_model.py",
    "test_predictor.py",
    "test_teachers.py",
    "test_sharding.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
