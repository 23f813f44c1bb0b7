"""``python -m tagi_jax.train`` end to end on the tiny run, and its bad-input errors."""

import json
import os
import subprocess
import sys

import pytest

ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    from tagi_jax.data import synthetic

    out = str(tmp_path_factory.mktemp("suite"))
    synthetic.write_suite(out, instances_per_train_task=8, instances_per_test_task=4)
    return out


def _train(*flags, timeout=600, env=ENV):
    cmd = [sys.executable, "-m", "tagi_jax.train", "--gin_file=runs/tiny_cpu.gin", *flags]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=timeout)


def test_tiny_run_trains_checkpoints_and_resumes(tmp_path, suite):
    model_dir = str(tmp_path / "run")
    flags = [f"--gin.MODEL_DIR='{model_dir}'", f"--gin.DATA_DIR='{suite}'", "--gin.TRAIN_STEPS=10"]
    result = _train(*flags)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [5, 10]
    assert records[-1]["loss"] < records[0]["loss"]
    for name in ("config.gin", "operative_config.gin", "export/t5/t5_config.json"):
        assert os.path.exists(os.path.join(model_dir, name)), name
    assert os.listdir(os.path.join(model_dir, "checkpoints")) == ["10"]  # save_every = 10
    # a second launch with more steps resumes from step 10
    more = _train(*flags[:-1], "--gin.TRAIN_STEPS=15")
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resumed from" in more.stdout and "steps 10->15" in more.stdout
    # the same MODEL_DIR with another model config is refused; its checkpoints stay as they were
    before = sorted(os.listdir(os.path.join(model_dir, "checkpoints")))
    with open(os.path.join(model_dir, "run.json")) as f:
        run = f.read()
    other = _train(*flags[:-1], "--gin.TRAIN_STEPS=20", "--gin.HyperConfig.rank=2")
    assert other.returncode == 2 and "another model config" in other.stderr
    assert sorted(os.listdir(os.path.join(model_dir, "checkpoints"))) == before
    with open(os.path.join(model_dir, "run.json")) as f:
        assert f.read() == run


def test_bad_input_is_one_clear_error(tmp_path, suite):
    unknown = _train(
        f"--gin.MODEL_DIR='{tmp_path}'", f"--gin.DATA_DIR='{suite}'", "--gin.train.bogus=1"
    )
    assert unknown.returncode != 0 and "bogus" in unknown.stderr
    missing = _train("--gin_file=runs/nope.gin")
    assert missing.returncode != 0 and "nope.gin" in missing.stderr
    no_data = _train(f"--gin.MODEL_DIR='{tmp_path}'", f"--gin.DATA_DIR='{tmp_path / 'no_suite'}'")
    assert no_data.returncode == 2 and "no_suite" in no_data.stderr
    no_base = _train(
        f"--gin.MODEL_DIR='{tmp_path}'",
        f"--gin.DATA_DIR='{suite}'",
        f"--gin.train.base_checkpoint='{tmp_path / 'no_base'}'",
    )
    assert no_base.returncode == 2 and "base_checkpoint" in no_base.stderr
    assert "no_base" in no_base.stderr
    # two devices, so the mesh builds and the batch check itself is what refuses
    two_devices = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    odd = _train(
        f"--gin.MODEL_DIR='{tmp_path}'",
        f"--gin.DATA_DIR='{suite}'",
        "--gin.BATCH_SIZE=3",
        "--gin.train.mesh_shape=(2, 1)",
        env=two_devices,
    )
    assert odd.returncode == 2, odd.stderr[-2000:]
    assert "batch_size=3 is not divisible by the data-parallel mesh axes" in odd.stderr
