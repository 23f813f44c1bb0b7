"""The hand-written TensorBoard writer, checked against TensorFlow as the independent reader.

``tf.data.TFRecordDataset`` verifies both CRCs of every record, and ``event_pb2`` parses the
hand-encoded protobufs, so a passing read-back means TensorBoard can load the files.
"""

from __future__ import annotations

import glob
import math
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

from tagi_jax.training import tensorboard
from tagi_jax.training.tensorboard import SummaryWriter, crc32c

tf = pytest.importorskip("tensorflow")
event_pb2 = pytest.importorskip("tensorflow.core.util.event_pb2")


def _read_events(path: str) -> list:
    return [event_pb2.Event.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]


def _event_files(log_dir) -> list[str]:
    return sorted(glob.glob(os.path.join(str(log_dir), "events.out.tfevents.*")))


def _scalars(event) -> dict[str, float]:
    return {v.tag: v.simple_value for v in event.summary.value}


def test_crc32c_known_vectors():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    # RFC 3720 (iSCSI) B.4: 32 bytes of zeros.
    assert crc32c(bytes(32)) == 0x8A9136AA


def test_record_bytes_match_tensorflow(tmp_path):
    """Byte-for-byte equal to TF's own serialization and TFRecord framing."""
    ours = tensorboard.scalars_event(7, {"loss": 0.25, "lr": 1e-3}, wall_time=1234.5)
    ref = event_pb2.Event(wall_time=1234.5, step=7)
    ref.summary.value.add(tag="loss", simple_value=0.25)
    ref.summary.value.add(tag="lr", simple_value=1e-3)
    assert ours == ref.SerializeToString()

    path = str(tmp_path / "ref.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
        w.write(ours)
    with open(path, "rb") as f:
        assert tensorboard.tfrecord(ours) == f.read()


def test_write_and_read_back(tmp_path):
    steps = {
        0: {"loss": 2.5, "accuracy": 0.125, "lr": 3e-4},
        10: {"loss": 1.0 / 3.0, "accuracy": np.float32(0.5), "lr": np.array(1e-4)},
        2**40: {"loss": 0.1, "grad_norm": np.int64(12)},
    }
    start = time.time()
    with SummaryWriter(str(tmp_path / "logs")) as writer:
        for step, values in steps.items():
            writer.scalars(step, values)
    end = time.time()

    (path,) = _event_files(tmp_path / "logs")
    assert path == writer.path
    assert os.path.basename(path).startswith(f"events.out.tfevents.{int(start)}.")
    events = _read_events(path)
    assert events[0].file_version == "brain.Event:2"
    assert not events[0].HasField("summary")
    assert [e.step for e in events[1:]] == list(steps)
    for event, values in zip(events[1:], steps.values(), strict=True):
        got = _scalars(event)
        assert list(got) == list(values)  # tags, in insertion order
        assert got == pytest.approx({k: float(v) for k, v in values.items()}, rel=1e-6)
    for event in events:
        assert start - 1 <= event.wall_time <= end + 1


def test_non_finite_and_out_of_float32_range(tmp_path):
    with SummaryWriter(str(tmp_path)) as writer:
        writer.scalars(-1, {"nan": math.nan, "inf": math.inf, "big": 1e40, "small": -1e40})
    (event,) = _read_events(writer.path)[1:]
    assert event.step == -1
    got = _scalars(event)
    assert math.isnan(got["nan"])
    assert got["inf"] == math.inf and got["big"] == math.inf and got["small"] == -math.inf


def test_corrupted_byte_fails_the_crc_check(tmp_path):
    with SummaryWriter(str(tmp_path)) as writer:
        writer.scalars(1, {"loss": 1.0})
    assert len(_read_events(writer.path)) == 2
    path = pathlib.Path(writer.path)
    data = bytearray(path.read_bytes())
    data[-6] ^= 0x01  # inside the last record's payload (its last 4 bytes are the data CRC)
    path.write_bytes(bytes(data))
    with pytest.raises(tf.errors.DataLossError):
        _read_events(writer.path)


def test_second_writer_creates_a_second_file(tmp_path):
    with SummaryWriter(str(tmp_path)) as first:
        first.scalars(1, {"loss": 1.0})
    # File names have one-second resolution; wait for the next second so the names differ.
    while int(time.time()) == int(os.path.basename(first.path).split(".")[3]):
        time.sleep(0.05)
    with SummaryWriter(str(tmp_path)) as second:
        second.scalars(2, {"loss": 0.5})
    assert _event_files(tmp_path) == sorted([first.path, second.path])
    assert first.path != second.path
    for path, step, loss in ((first.path, 1, 1.0), (second.path, 2, 0.5)):
        events = _read_events(path)
        assert events[0].file_version == "brain.Event:2"
        assert [(e.step, _scalars(e)) for e in events[1:]] == [(step, {"loss": loss})]


def test_restart_within_the_same_second_appends(tmp_path, monkeypatch):
    """Same name (same second, same host): the file is appended to, never truncated."""
    with monkeypatch.context() as m:
        m.setattr(tensorboard.time, "time", lambda: 1_700_000_000.0)
        with SummaryWriter(str(tmp_path)) as first:
            first.scalars(1, {"loss": 1.0})
        with SummaryWriter(str(tmp_path)) as second:
            second.scalars(2, {"loss": 0.5})
    assert first.path == second.path
    events = _read_events(first.path)
    assert [e.file_version for e in events] == ["brain.Event:2", "", "brain.Event:2", ""]
    assert [e.step for e in events if e.HasField("summary")] == [1, 2]


def test_writes_are_flushed_and_close_is_final(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    writer.scalars(3, {"loss": 1.0})
    # Readable while the writer is still open: nothing sits in a Python buffer.
    assert [e.step for e in _read_events(writer.path)] == [0, 3]
    writer.close()
    writer.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        writer.scalars(4, {"loss": 1.0})


def test_module_does_not_import_tensorflow():
    code = (
        "import sys\n"
        "import tagi_jax.training.tensorboard\n"
        "print(sorted(m for m in ('tensorflow', 'tensorboard', 'tensorboardX', 'clu')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
