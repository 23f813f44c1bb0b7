"""TensorBoard itself (its event reader, as `tensorboard --logdir` uses it) reads the event
files our writer (tensorboardX, no TensorFlow) writes."""

from __future__ import annotations

import pytest

# the viewer is a test dependency (requirements-test.txt), not one of tagi_jax
from tensorboard.backend.event_processing import event_accumulator

from tagi_jax.training import tensorboard


def test_tensorboard_reads_our_scalars(tmp_path):
    writer = tensorboard.SummaryWriter(tmp_path)
    for step in range(1, 4):
        writer.scalars(step, {"loss/total": 1.0 / step, "speed/examples_per_s": 10.0 * step})
    writer.close()
    reader = event_accumulator.EventAccumulator(str(tmp_path))
    reader.Reload()
    assert set(reader.Tags()["scalars"]) == {"loss/total", "speed/examples_per_s"}
    loss = reader.Scalars("loss/total")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([1.0, 0.5, 1 / 3])
