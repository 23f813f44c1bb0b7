"""The training loop as users run it (``runs/tiny_cpu.gin``): the same losses on 1 device, on
8 fake devices (data x model and data x fsdp x model) and in two ``jax.distributed`` processes;
kill-and-resume equals an uninterrupted run; SIGTERM leaves a restorable checkpoint; metrics go
to JSONL and TensorBoard.

The one-device reference is the session's shared tiny run (conftest.tiny_run); processes of
their own only where processes are the point (two ``jax.distributed`` processes, signals)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tagi_jax import configurables
from tagi_jax import train as train_cli
from tagi_jax.training import checkpointing, loop

pytestmark = pytest.mark.slow  # every test trains, most in processes of their own
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_DEVICE = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
STEPS = 4  # the shared tiny run's (conftest.tiny_run)


@pytest.fixture(scope="module")
def suite(tiny_suite):
    return tiny_suite


def _flags(model_dir, suite, *extra):
    return [
        "--gin_file=runs/tiny_cpu.gin",
        f"--gin.MODEL_DIR='{model_dir}'",
        f"--gin.DATA_DIR='{suite}'",
        f"--gin.TRAIN_STEPS={STEPS}",
        "--gin.train.log_every=1",
        *extra,
    ]


MESH = "--gin.train.mesh_shape=(-1, 1)"


def _in_process(flags):
    """The CLI's own parsing and loop, in this process (8 fake devices)."""
    if not any("mesh_shape" in f for f in flags):
        flags = [*flags, MESH]
    with train_cli.configured(flags):
        return configurables.train()


def _losses(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return np.array([json.loads(line)["loss"] for line in f])


@pytest.fixture(scope="module")
def one_device_losses(tiny_run):
    """The session's tiny run: the CLI in a process of its own with one device."""
    assert tiny_run.steps == STEPS
    losses = _losses(tiny_run.model_dir)
    assert len(losses) == STEPS and np.all(np.isfinite(losses))
    return losses


@pytest.mark.parametrize(
    "shape,axes",
    [((4, 2), ("data", "model")), ((2, 2, 2), ("data", "fsdp", "model"))],
    ids=["data4_model2", "data2_fsdp2_model2"],
)
def test_eight_devices_give_the_one_device_losses(tmp_path, suite, one_device_losses, shape, axes):
    assert jax.device_count() == 8
    model_dir = str(tmp_path / "run")
    _in_process(
        _flags(model_dir, suite, f"--gin.train.mesh_shape={shape}", f"--gin.train.mesh_axes={axes}")
    )
    np.testing.assert_allclose(_losses(model_dir), one_device_losses, rtol=0, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(model_dir, suite, *extra):
    """The CLI in two ``jax.distributed`` CPU processes (one device each) on one run."""
    port = _free_port()
    procs = []
    for pid in range(2):
        flags = _flags(
            model_dir,
            suite,
            *extra,
            "--gin.train.mesh_shape=(2, 1)",
            "--gin.train.distributed=@DistributedConfig()",
            "--gin.DistributedConfig.enabled=True",
            f"--gin.DistributedConfig.coordinator_address='localhost:{port}'",
            "--gin.DistributedConfig.num_processes=2",
            f"--gin.DistributedConfig.process_id={pid}",
        )
        cmd = [sys.executable, "-m", "tagi_jax.train", *flags]
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=ONE_DEVICE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        )
    return procs


def test_two_processes_give_the_one_process_losses(tmp_path, suite, one_device_losses):
    model_dir = str(tmp_path / "run")
    procs = _two_processes(model_dir, suite)
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err.decode()[-3000:]
    assert b"process 0 of 2" in outputs[0][0] and b"process 1 of 2" in outputs[1][0]
    # only process 0 logs; the global batch is the same, so is the loss
    np.testing.assert_allclose(_losses(model_dir), one_device_losses, rtol=0, atol=1e-5)


def test_sigterm_to_one_of_two_processes_saves_the_same_step_on_both(tmp_path, suite):
    """A preemption notice reaches one host: JAX's preemption service agrees on one step, both
    processes save it together (a host deciding alone would hang in the collective save) and
    exit cleanly."""
    model_dir = str(tmp_path / "run")
    procs = _two_processes(
        model_dir, suite, "--gin.TRAIN_STEPS=100000", "--gin.train.save_every=100000"
    )
    metrics = os.path.join(model_dir, "metrics.jsonl")
    deadline = time.time() + 300
    while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        assert all(p.poll() is None for p in procs), procs[0].stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no step finished in 300 s"
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGTERM)  # the notice reaches process 1 only
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err.decode()[-3000:]
    out = outputs[0][0].decode()
    assert "SIGTERM: saved step" in out, out[-2000:]
    saved = int(out.split("SIGTERM: saved step ")[1].split()[0])
    ckpt = checkpointing.Checkpointer(model_dir, config_json="unused")
    assert ckpt.manager.all_steps() == [saved]
    ckpt.close()


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, suite):
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    _in_process(_flags(straight, suite, "--gin.TRAIN_STEPS=6", "--gin.train.save_every=3"))
    # "kill" after 3 steps: stop_after ends the run with only the step-3 checkpoint written
    flags = _flags(killed, suite, "--gin.TRAIN_STEPS=6", "--gin.train.save_every=3")
    with train_cli.configured([*flags, "--gin.train.mesh_shape=(-1, 1)"]):
        configurables.train(stop_after=3)
    assert sorted(os.listdir(os.path.join(killed, "checkpoints"))) == ["3"]
    assert not os.path.exists(os.path.join(killed, "export"))
    _in_process(_flags(killed, suite, "--gin.TRAIN_STEPS=6", "--gin.train.save_every=3"))
    np.testing.assert_array_equal(_losses(killed), _losses(straight))
    a = _restore_trainable(straight)
    b = _restore_trainable(killed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _restore_trainable(model_dir):
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.join(model_dir, "checkpoints")) as manager:
        restored = manager.restore(6, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return {k: np.asarray(v) for k, v in restored["state"]["trainable"].items()}


def test_sigterm_saves_a_restorable_checkpoint(tmp_path, suite, run_main):
    model_dir = str(tmp_path / "run")
    flags = _flags(model_dir, suite, "--gin.TRAIN_STEPS=10000", "--gin.train.save_every=10000")
    cmd = [sys.executable, "-m", "tagi_jax.train", *flags]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=ONE_DEVICE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = os.path.join(model_dir, "metrics.jsonl")
    deadline = time.time() + 300
    while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "no step finished in 300 s"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: saved step" in out
    saved = int(out.split("SIGTERM: saved step ")[1].split()[0])
    ckpt = checkpointing.Checkpointer(model_dir, config_json="unused")
    assert ckpt.latest_step() == saved
    ckpt.close()
    # the next launch (the CLI's main in this process, on its 8 devices) resumes from it
    flags = _flags(model_dir, suite, f"--gin.TRAIN_STEPS={saved + 1}", MESH)
    code, out, err = run_main(train_cli.main, flags)
    assert code == 0, err[-3000:]
    assert f"steps {saved}->{saved + 1}" in out


def test_metrics_go_to_jsonl_and_tensorboard(tiny_run):
    """The shared tiny run logs every step, with the MFU of a peak of 1e12 FLOP/s."""
    model_dir = tiny_run.model_dir
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in (
        "loss",
        "cross_entropy",
        "accuracy",
        "grad_norm",
        "learning_rate",
        "tokens_per_second",
        "mfu",
    ):
        assert all(np.isfinite(r[key]) for r in records), key
    assert 0 < records[-1]["mfu"] < 1
    with open(os.path.join(model_dir, loop.RUN_FILE)) as f:
        run = json.load(f)
    assert run["model"]["t5"]["vocab_size"] == 264 and run["seed"] == 0
    events = os.listdir(os.path.join(model_dir, "tensorboard"))
    assert len(events) == 1 and events[0].startswith("events.out.tfevents.")
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    path = os.path.join(model_dir, "tensorboard", events[0])
    parsed = [event_pb2.Event.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]
    steps = [e.step for e in parsed if e.summary.value]
    assert steps == [1, 2, 3, 4]
    tags = {v.tag: v.simple_value for v in parsed[-1].summary.value}
    assert tags["loss"] == pytest.approx(records[-1]["loss"], rel=1e-6)
