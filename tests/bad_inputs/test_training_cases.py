"""Bad input and faults around training, as a hostile but realistic user meets them: each case
asserts the exit status, the one ``error:`` line and that nothing was deleted or overwritten.

Cases that need a run share one finished two-step tiny run (``finished_run``, trained once per
module, on a frozen base given by path) and copy it; the CLI runs in this process
(``tagi_jax.train.main``), so no case pays for a fresh JAX/TensorFlow import.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tagi_jax import train as train_cli
from tagi_jax.convert import param_checkpoint
from tagi_jax.models import t5
from tagi_jax.models.t5_config import T5Config
from tagi_jax.training import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# runs/tiny_cpu.gin's backbone (models/t5_1_1_tiny.gin with the byte vocabulary)
TINY = T5Config(
    vocab_size=264,
    d_model=64,
    d_kv=16,
    d_ff=128,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    is_gated_act=True,
    dense_act_fn="gelu_new",
    tie_word_embeddings=False,
    scale_decoder_outputs=False,
    dropout_rate=0.0,
)


def write_base(path, seed):
    param_checkpoint.save(str(path), TINY, t5.init_params(TINY, jax.random.key(seed)))


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    from tagi_jax.data import synthetic

    out = str(tmp_path_factory.mktemp("suite"))
    synthetic.write_suite(out, instances_per_train_task=8, instances_per_test_task=4)
    return out


def flags(model_dir, suite, *extra, steps=2):
    return [
        "--gin_file=runs/tiny_cpu.gin",
        f"--gin.MODEL_DIR='{model_dir}'",
        f"--gin.DATA_DIR='{suite}'",
        f"--gin.TRAIN_STEPS={steps}",
        "--gin.train.mesh_shape=(-1, 1)",
        "--gin.train.save_every=1",
        "--gin.train.log_every=1",
        *extra,
    ]


def error_line(err: str) -> str:
    """The one ``error:`` line of a failed run (asserting there is exactly one)."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return lines[0]


def listing(directory) -> dict[str, bytes]:
    """Every file under ``directory`` with its content: what "nothing changed" compares."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            if name == checkpointing.LOCK_FILE:  # rewritten by every trainer that starts
                continue
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


@pytest.fixture(scope="module")
def finished_run(suite, tmp_path_factory):
    """A finished two-step run on a base given by path (checkpoints 1 and 2, an export)."""
    root = tmp_path_factory.mktemp("finished")
    base = root / "base"
    write_base(base, seed=0)
    model_dir = root / "run"
    argv = flags(model_dir, suite, f"--gin.train.base_checkpoint='{base}'")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert train_cli.main(argv) == 0
    finally:
        os.chdir(cwd)
        gin.clear_config()
    assert sorted(os.listdir(model_dir / "checkpoints")) == ["1", "2"]
    return root


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A private copy of the finished run and its base: ``(model_dir, base)``."""
    shutil.copytree(finished_run, tmp_path / "copy")
    return tmp_path / "copy" / "run", tmp_path / "copy" / "base"


# --- configuration errors: before any model work -----------------------------------------

CONFIG_CASES = {
    "string_batch_size": (["--gin.BATCH_SIZE='8'"], "train.batch_size must be a positive integer"),
    "string_learning_rate": (
        ["--gin.OptimizerConfig.learning_rate='3e-3'"],
        "OptimizerConfig.learning_rate must be a number",
    ),
    "infinite_learning_rate": (
        ["--gin.OptimizerConfig.learning_rate=1e999"],
        "OptimizerConfig.learning_rate must be finite",
    ),
    "zero_learning_rate": (
        ["--gin.OptimizerConfig.learning_rate=0.0"],
        "OptimizerConfig.learning_rate must be > 0",
    ),
    "save_every_zero": (["--gin.train.save_every=0"], "train.save_every must be a positive"),
    "negative_train_steps": (["--gin.TRAIN_STEPS=-3"], "train.train_steps must be a positive"),
    "unknown_binding": (["--gin.train.bogus=1"], "bogus"),
    "gin_syntax_error": (["--gin_bindings=train.batch_size = ("], "bad gin configuration"),
    "missing_gin_file": (["--gin_file=runs/nope.gin"], "gin file not found: runs/nope.gin"),
}


@pytest.mark.parametrize("extra,message", CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
def test_configuration_errors_are_one_line_exit_2(run_main, tmp_path, suite, extra, message):
    model_dir = tmp_path / "run"
    code, _, err = run_main(train_cli.main, flags(model_dir, suite, *extra))
    assert code == 2, err[-2000:]
    assert message in error_line(err)
    assert not (model_dir / "checkpoints").exists()  # refused before anything was written


# --- resume: what a checkpoint must share with the run that resumes it --------------------


@pytest.mark.slow
def test_resume_at_its_step_count_says_it_is_finished_and_writes_nothing(run_main, run_copy, suite):
    model_dir, base = run_copy
    before = listing(model_dir)
    code, out, err = run_main(
        train_cli.main, flags(model_dir, suite, f"--gin.train.base_checkpoint='{base}'", steps=2)
    )
    assert code == 0, err[-2000:]
    assert "already finished its 2 steps" in out and "TRAIN_STEPS above 2" in out
    after = listing(model_dir)
    changed = {k for k in before if after.get(k) != before[k]} - {"config.gin", "run.json"}
    assert not changed, changed
    assert set(after) == set(before)


RESUME_CASES = {
    "train_steps_below_checkpoint": (["--gin.TRAIN_STEPS=1"], "already at step 2, past"),
    "changed_batch_size": (["--gin.BATCH_SIZE=16"], "another batch size"),
    "changed_data_settings": (
        [
            "--gin.DataConfig.feature_lengths="
            "(('inputs', 256), ('hyper_inputs', 256), ('teacher_inputs', 320), ('targets', 48))"
        ],
        "another data settings",
    ),
    "changed_optimizer": (
        ["--gin.OptimizerConfig.name='adafactor'"],
        "the optimizer changed (adamw -> adafactor",
    ),
    "changed_model": (["--gin.HyperConfig.rank=2"], "another model config"),
}


@pytest.mark.slow
@pytest.mark.parametrize("extra,message", RESUME_CASES.values(), ids=RESUME_CASES.keys())
def test_resume_refuses_a_checkpoint_it_does_not_fit(run_main, run_copy, suite, extra, message):
    model_dir, base = run_copy
    before = listing(model_dir)
    argv = flags(model_dir, suite, f"--gin.train.base_checkpoint='{base}'", *extra, steps=4)
    code, _, err = run_main(train_cli.main, argv)
    assert code == 2, err[-2000:]
    assert message in error_line(err)
    assert listing(model_dir) == before  # run files, checkpoints, metrics: untouched


@pytest.mark.slow
def test_resume_refuses_another_base_behind_the_same_path(run_main, run_copy, suite):
    model_dir, base = run_copy
    shutil.rmtree(base)
    write_base(base, seed=1)  # same path, same shapes, other weights
    before = listing(model_dir)
    argv = flags(model_dir, suite, f"--gin.train.base_checkpoint='{base}'", steps=4)
    code, _, err = run_main(train_cli.main, argv)
    assert code == 2, err[-2000:]
    assert "another base checkpoint" in error_line(err)
    assert listing(model_dir) == before


@pytest.mark.slow
def test_a_second_trainer_on_the_same_directory_is_refused(run_main, run_copy, suite):
    model_dir, base = run_copy
    before = listing(model_dir)
    with checkpointing.RunLock(str(model_dir)):  # the first trainer, still running
        argv = flags(model_dir, suite, f"--gin.train.base_checkpoint='{base}'", steps=4)
        code, _, err = run_main(train_cli.main, argv)
    assert code == 2, err[-2000:]
    line = error_line(err)
    assert "another trainer is running" in line and f"pid {os.getpid()}" in line
    assert listing(model_dir) == before


@pytest.mark.slow
def test_a_corrupt_latest_checkpoint_is_set_aside_and_the_run_resumes(run_main, run_copy, suite):
    model_dir, base = run_copy
    _corrupt(str(model_dir / "checkpoints" / "2"), "truncated_file")
    argv = flags(model_dir, suite, f"--gin.train.base_checkpoint='{base}'", steps=3)
    code, out, err = run_main(train_cli.main, argv)
    assert code == 0, err[-3000:]
    assert "checkpoint step 2 is corrupt: moved aside to" in out and "resuming from step 1" in out
    assert "steps 1->3" in out
    aside = os.listdir(model_dir / checkpointing.CORRUPT_DIR)
    assert len(aside) == 1 and aside[0].startswith("2-")  # kept, never deleted
    assert sorted(os.listdir(model_dir / "checkpoints")) == ["1", "2", "3"]


# --- checkpoints of corrupt, non-finite or unwritable state (the Checkpointer itself) ------


def _state(scale):
    rs = np.random.RandomState(0)
    return {"w": jax.numpy.asarray(rs.randn(64, 64).astype(np.float32) * scale)}


def _corrupt(step_dir, how):
    state_dir = os.path.join(step_dir, "state")
    if how == "deleted_meta":
        shutil.rmtree(os.path.join(step_dir, "meta"))
        return
    if how == "deleted_manifest":
        os.remove(os.path.join(state_dir, "manifest.ocdbt"))
        return
    # The merged OCDBT data file the manifest refers to (the per-process ones beside it may be
    # left-overs a restore never reads).
    data = [os.path.join(state_dir, "d", f) for f in os.listdir(os.path.join(state_dir, "d"))]
    biggest = max(data, key=os.path.getsize)
    size = os.path.getsize(biggest)
    if how == "truncated_file":
        with open(biggest, "r+b") as f:
            f.truncate(size // 2)
    else:  # overwritten_file
        with open(biggest, "wb") as f:
            f.write(np.random.RandomState(1).bytes(size))


@pytest.mark.parametrize(
    "how", ["truncated_file", "overwritten_file", "deleted_manifest", "deleted_meta"]
)
def test_restore_falls_back_past_a_corrupt_checkpoint(tmp_path, capsys, how):
    ckpt = checkpointing.Checkpointer(str(tmp_path), config_json="m")
    ckpt.save(1, _state(1.0), examples=8)
    ckpt.save(2, _state(2.0), examples=16)
    ckpt.close()
    _corrupt(str(tmp_path / "checkpoints" / "2"), how)
    capsys.readouterr()
    again = checkpointing.Checkpointer(str(tmp_path), config_json="m")
    state, meta = again.restore(_state(0.0))
    out = capsys.readouterr().out
    assert meta["step"] == 1 and meta["examples"] == 8
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_state(1.0)["w"]))
    assert "checkpoints/2 is corrupt" in out and "moved aside" in out
    assert again.manager.all_steps() == [1]
    assert os.listdir(tmp_path / checkpointing.CORRUPT_DIR)[0].startswith("2-")


def test_no_intact_checkpoint_is_an_error_that_moves_nothing(tmp_path):
    ckpt = checkpointing.Checkpointer(str(tmp_path), config_json="m")
    ckpt.save(1, _state(1.0), examples=8)
    ckpt.close()
    _corrupt(str(tmp_path / "checkpoints" / "1"), "deleted_meta")
    before = listing(tmp_path)
    with pytest.raises(checkpointing.CorruptCheckpointError, match="no intact checkpoint"):
        checkpointing.Checkpointer(str(tmp_path), config_json="m").restore(_state(0.0))
    assert listing(tmp_path) == before


def test_a_non_finite_state_is_never_checkpointed(tmp_path):
    ckpt = checkpointing.Checkpointer(str(tmp_path), config_json="m")
    ckpt.save(1, _state(1.0), examples=8)
    with pytest.raises(checkpointing.NonFiniteStateError, match="refusing to checkpoint step 2"):
        ckpt.save(2, {"w": _state(1.0)["w"].at[3, 4].set(np.nan)}, examples=16)
    assert ckpt.manager.all_steps() == [1]


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    # A file-size limit stands in for a full disk (no root, no small filesystem needed): the
    # write fails with an OS error deep inside TensorStore, as ENOSPC does.
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        import numpy as np
        from tagi_jax.training import checkpointing
        ckpt = checkpointing.Checkpointer({str(tmp_path)!r}, config_json="m")
        ckpt.save(1, {{"w": np.ones((8, 8), np.float32)}}, examples=8)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        big = {{"w": np.random.RandomState(0).randn(512, 512).astype(np.float32)}}
        try:
            ckpt.save(2, big, examples=16)
        except checkpointing.CheckpointWriteError as e:
            print("ERROR", e)
            sys.exit(3)
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 3, result.stderr[-3000:]
    line = result.stdout.strip().splitlines()[-1]
    assert "could not write checkpoint step 2" in line and "File too large" in line, line
    assert "newest: step 1" in line
    again = checkpointing.Checkpointer(str(tmp_path), config_json="m")
    state, meta = again.restore({"w": np.zeros((8, 8), np.float32)})
    assert meta["step"] == 1 and float(np.asarray(state["w"]).sum()) == 64.0


# --- non-finite updates --------------------------------------------------------------------

# Step 1 at learning rate 0 (the first step of a linear warmup); step 2's finite loss and
# gradient give an update that overflows float32 (a weight decay of 1e30 times a learning rate
# of 5e11), as a far too large learning rate does in a real run.
BLOW_UP = [
    "--gin.OptimizerConfig.learning_rate=1e12",
    "--gin.OptimizerConfig.weight_decay=1e30",
    "--gin.OptimizerConfig.clip_norm=0.0",
    "--gin.OptimizerConfig.schedule='linear_warmup'",
    "--gin.OptimizerConfig.warmup_steps=2",
]


@pytest.mark.slow
def test_an_update_that_overflows_the_parameters_stops_and_is_never_saved(
    run_main, tmp_path, suite
):
    model_dir = tmp_path / "run"
    code, _, err = run_main(train_cli.main, flags(model_dir, suite, *BLOW_UP, steps=4))
    assert code == 2, err[-2000:]
    line = error_line(err)
    assert "the update of step 2 made the parameters or optimizer state non-finite" in line
    assert os.listdir(model_dir / "checkpoints") == ["1"]  # the last good one, never a bad one
    ckpt = checkpointing.Checkpointer(str(model_dir), config_json="unused")
    assert not (model_dir / "export").exists()
    restored = ckpt.manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    assert checkpointing.all_finite(restored["state"])


@pytest.mark.slow
def test_skip_rolls_a_bad_update_back_and_gives_up_after_too_many(run_main, tmp_path, suite):
    model_dir = tmp_path / "run"
    argv = flags(model_dir, suite, *BLOW_UP, "--gin.train.on_nonfinite='skip'", steps=4)
    code, out, err = run_main(train_cli.main, argv)
    assert code == 2, err[-2000:]
    assert "batches in a row" in error_line(err)
    # every skipped update was undone: the state stayed finite, so checkpoint 1 is the last
    assert out.count("skipped batch") == 20 and "made the parameters" in out
    assert os.listdir(model_dir / "checkpoints") == ["1"]
