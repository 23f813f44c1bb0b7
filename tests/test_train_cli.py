"""``python -m tagi_jax.train`` end to end on the tiny run, and its bad-input errors.

The end-to-end run is the session's shared tiny run (``tiny_run`` in conftest: the CLI in a
child process with one device); what follows from it (resuming, refusing another config, the
error lines) runs the CLI's ``main`` in this process (eight fake devices).
"""

import json
import os
import shutil

import pytest

from tagi_jax import train as train_cli

# 8 fake devices in this process: data-parallel over all of them.
MESH = "--gin.train.mesh_shape=(-1, 1)"


@pytest.fixture(scope="module")
def suite(tiny_suite):
    return tiny_suite


@pytest.mark.slow
def test_tiny_run_trains_checkpoints_and_resumes(tmp_path, tiny_run, run_main):
    steps = tiny_run.steps
    assert "Traceback" not in tiny_run.stderr
    with open(os.path.join(tiny_run.model_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == list(range(1, steps + 1))  # log_every = 1
    assert records[-1]["loss"] < records[0]["loss"]
    for name in ("config.gin", "operative_config.gin", "export/t5/t5_config.json"):
        assert os.path.exists(os.path.join(tiny_run.model_dir, name)), name
    # save_every = 10: the one checkpoint is the last step's
    assert os.listdir(os.path.join(tiny_run.model_dir, "checkpoints")) == [str(steps)]
    # a second launch with more steps resumes from the last step
    model_dir = str(tmp_path / "run")
    shutil.copytree(tiny_run.model_dir, model_dir)
    flags = [
        "--gin_file=runs/tiny_cpu.gin",
        f"--gin.MODEL_DIR='{model_dir}'",
        f"--gin.DATA_DIR='{tiny_run.suite}'",
        "--gin.train.log_every=1",
        "--gin.train.peak_flops_per_device=1e12",
        MESH,
    ]
    code, out, err = run_main(train_cli.main, [*flags, f"--gin.TRAIN_STEPS={steps + 2}"])
    assert code == 0, err[-3000:]
    assert "resumed from" in out and f"steps {steps}->{steps + 2}" in out
    # the same MODEL_DIR with another model config is refused; its checkpoints stay as they were
    before = sorted(os.listdir(os.path.join(model_dir, "checkpoints")))
    with open(os.path.join(model_dir, "run.json")) as f:
        run = f.read()
    argv = [*flags, f"--gin.TRAIN_STEPS={steps + 4}", "--gin.HyperConfig.rank=2"]
    code, _, err = run_main(train_cli.main, argv)
    assert code == 2 and "another model config" in err
    assert sorted(os.listdir(os.path.join(model_dir, "checkpoints"))) == before
    with open(os.path.join(model_dir, "run.json")) as f:
        assert f.read() == run


def test_bad_input_is_one_clear_error(tmp_path, suite, run_main):
    def train(*flags):
        return run_main(train_cli.main, ["--gin_file=runs/tiny_cpu.gin", *flags])

    code, _, err = train(
        f"--gin.MODEL_DIR='{tmp_path}'", f"--gin.DATA_DIR='{suite}'", "--gin.train.bogus=1"
    )
    assert code != 0 and "bogus" in err
    code, _, err = train("--gin_file=runs/nope.gin")
    assert code != 0 and "nope.gin" in err
    code, _, err = train(
        f"--gin.MODEL_DIR='{tmp_path}'", f"--gin.DATA_DIR='{tmp_path / 'no_suite'}'", MESH
    )
    assert code == 2 and "no_suite" in err
    code, _, err = train(
        f"--gin.MODEL_DIR='{tmp_path}'",
        f"--gin.DATA_DIR='{suite}'",
        f"--gin.train.base_checkpoint='{tmp_path / 'no_base'}'",
        MESH,
    )
    assert code == 2 and "base_checkpoint" in err
    assert "no_base" in err
    # the mesh builds (8 devices, data-parallel), so the batch check itself is what refuses
    code, _, err = train(
        f"--gin.MODEL_DIR='{tmp_path}'", f"--gin.DATA_DIR='{suite}'", "--gin.BATCH_SIZE=3", MESH
    )
    assert code == 2, err[-2000:]
    assert "batch_size=3 is not divisible by the data-parallel mesh axes" in err
