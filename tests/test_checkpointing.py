"""Train-state checkpoints: round trip, resume equality, config mismatch, SIGTERM."""

import functools
import os
import signal

import jax
import numpy as np
import pytest
from test_train_step import CE_ONLY, MODEL, _batch

from tagi_jax.models import tagi, trainable
from tagi_jax.training import checkpointing, optim
from tagi_jax.training import state as state_lib


def _setup():
    params = tagi.init_params(MODEL, jax.random.key(0))
    train, frozen = state_lib.partition(params, trainable.trainable_mask(MODEL, params))
    optimizer = optim.make_optimizer(optim.OptimizerConfig(learning_rate=3e-3, schedule="constant"))
    config = state_lib.StepConfig(MODEL, CE_ONLY)
    step = jax.jit(
        functools.partial(state_lib.train_step, config, optimizer, jax.tree.structure(params))
    )
    return frozen, state_lib.init_state(train, optimizer, seed=0), step


def _run(step, state, frozen, start, count):
    for i in range(start, start + count):
        state, _ = step(state, frozen, _batch(seed=i))  # the data order is the step index
    return state


@pytest.mark.slow
def test_six_steps_equal_three_steps_kill_and_three_resumed(tmp_path):
    frozen, state, step = _setup()
    straight = _run(step, state, frozen, 0, 6)

    ckpt = checkpointing.Checkpointer(str(tmp_path), config_json="model-a", keep=2)
    first = _run(step, state, frozen, 0, 3)
    ckpt.save(3, first, examples=3)
    ckpt.close()
    del first  # "kill": only the checkpoint survives

    again = checkpointing.Checkpointer(str(tmp_path), config_json="model-a", keep=2)
    assert again.latest_step() == 3
    restored, meta = again.restore(state)
    assert meta["examples"] == 3  # batches of one example
    resumed = _run(step, restored, frozen, meta["examples"], 3)
    assert int(resumed.step) == int(straight.step) == 6
    for k in straight.trainable:
        np.testing.assert_array_equal(
            np.asarray(resumed.trainable[k]), np.asarray(straight.trainable[k])
        )
    np.testing.assert_array_equal(np.asarray(resumed.rng), np.asarray(straight.rng))


def test_keeps_the_last_k_and_refuses_another_config(tmp_path):
    frozen, state, step = _setup()
    ckpt = checkpointing.Checkpointer(str(tmp_path), config_json="model-a", keep=2)
    for s in (1, 2, 3):
        ckpt.save(s, state, examples=s)
    assert ckpt.manager.all_steps() == [2, 3]
    other = checkpointing.Checkpointer(str(tmp_path), config_json="model-b", keep=2)
    with pytest.raises(checkpointing.CheckpointMismatchError, match="another model config"):
        other.restore(state)
    empty = checkpointing.Checkpointer(str(tmp_path / "none"), config_json="model-a")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        empty.restore(state)


def test_sigterm_is_recorded_not_fatal():
    with checkpointing.PreemptionGuard() as guard:
        assert not guard.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested
    assert signal.getsignal(signal.SIGTERM) is not guard._handler
