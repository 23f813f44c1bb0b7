"""TensorBoard through tensorboardX (``training/tensorboard.py``) and ``Progress``'s files, on
local paths and on a ``gs://`` run directory routed to a temporary directory (no network).

TensorFlow as an independent reader of the event files is in
``test_training_loop.py::test_metrics_go_to_jsonl_and_tensorboard``; here the files are read back
with ``tensorboard.read_events``, which checks every record's CRCs.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from etils import epath

from tagi_jax.training import progress as progress_lib
from tagi_jax.training import tensorboard
from tagi_jax.training.tensorboard import SummaryWriter


def test_crc_is_castagnoli():
    """The reader's CRC check is the TFRecord one (CRC32C known vectors, RFC 3720 B.4)."""
    tensorboard._tensorboardx()  # imported as tagi_jax does (without PyTorch)
    from tensorboardX.crc32c import crc32c

    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA


def test_write_and_read_back(tmp_path):
    steps = {
        0: {"loss": 2.5, "accuracy": 0.125, "lr": 3e-4},
        10: {"loss": 1.0 / 3.0, "accuracy": np.float32(0.5), "lr": np.array(1e-4)},
        2**40: {"loss": 0.1, "grad_norm/kl": np.int64(12)},
    }
    with SummaryWriter(tmp_path / "logs") as writer:
        for step, values in steps.items():
            writer.scalars(step, values)

    (path,) = tensorboard.event_files(tmp_path / "logs")
    events = tensorboard.read_events(path)
    assert events[0].file_version == "brain.Event:2"
    assert [e.step for e in events[1:]] == list(steps)  # one event per call
    for event, values in zip(events[1:], steps.values(), strict=True):
        got = {v.tag: v.simple_value for v in event.summary.value}
        assert list(got) == list(values)  # tags, in insertion order
        assert got == pytest.approx({k: float(v) for k, v in values.items()}, rel=1e-6)
    assert tensorboard.read_scalars(tmp_path / "logs")[1][0] == 10


def test_non_finite_and_out_of_float32_range(tmp_path):
    with SummaryWriter(tmp_path) as writer:
        writer.scalars(-1, {"nan": math.nan, "inf": math.inf, "big": 1e40, "small": -1e40})
    ((step, got),) = tensorboard.read_scalars(tmp_path)
    assert step == -1
    assert math.isnan(got["nan"])
    assert got["inf"] == math.inf and got["big"] == math.inf and got["small"] == -math.inf


def test_corrupted_byte_fails_the_crc_check(tmp_path):
    with SummaryWriter(tmp_path) as writer:
        writer.scalars(1, {"loss": 1.0})
    (path,) = tensorboard.event_files(tmp_path)
    assert len(tensorboard.read_events(path)) == 2
    data = bytearray(epath.Path(path).read_bytes())
    data[-6] ^= 0x01  # inside the last record's payload (its last 4 bytes are the data CRC)
    epath.Path(path).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="bad data CRC"):
        tensorboard.read_events(path)


def test_writers_started_together_keep_separate_files(tmp_path):
    """tensorboardX opens its file with "wb" and names it by the second: without the pid and
    counter suffix a quick restart in the same directory would truncate the first file."""
    first = SummaryWriter(tmp_path)
    second = SummaryWriter(tmp_path)
    first.scalars(1, {"loss": 1.0})
    second.scalars(2, {"loss": 0.5})
    first.close()
    second.close()
    files = tensorboard.event_files(tmp_path)
    assert len(files) == 2
    steps = sorted(e.step for f in files for e in tensorboard.read_events(f) if e.summary.value)
    assert steps == [1, 2]


def test_close_writes_everything_and_is_final(tmp_path):
    writer = SummaryWriter(tmp_path, flush_secs=3600)  # only close() flushes
    for step in range(100):  # more than tensorboardX's queue holds
        writer.scalars(step, {"loss": step / 100})
    writer.close()
    writer.close()  # idempotent
    assert [s for s, _ in tensorboard.read_scalars(tmp_path)] == list(range(100))
    with pytest.raises(ValueError, match="closed"):
        writer.scalars(100, {"loss": 1.0})


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """``gs://bucket/...`` mapped onto ``tmp_path/bucket/...`` where tagi_jax turns paths into
    epath paths, so the cloud code path runs without a network (and without TensorFlow)."""
    root = tmp_path / "bucket"

    def as_path(path):
        text = str(path)
        if text.startswith("gs://bucket"):
            return epath.Path(str(root) + text[len("gs://bucket") :])
        return epath.Path(path)

    monkeypatch.setattr(tensorboard, "as_path", as_path)
    return root


def test_gs_log_dir_goes_through_epath(fake_gcs):
    with SummaryWriter("gs://bucket/run/tensorboard") as writer:
        writer.scalars(5, {"loss": 0.25})
    from tensorboardX import record_writer

    assert isinstance(record_writer.REGISTERED_FACTORIES["gs"], tensorboard._EpathWriterFactory)
    assert tensorboard.read_scalars(fake_gcs / "run" / "tensorboard") == [(5, {"loss": 0.25})]
    assert tensorboard.read_scalars("gs://bucket/run/tensorboard") == [(5, {"loss": 0.25})]


def _log_three(progress):
    for step in (1, 2, 3):
        progress.count(100)
        progress.log(step, {"loss": 1.0 / step})


def test_progress_on_a_gs_model_dir(fake_gcs, capsys):
    progress = progress_lib.Progress("gs://bucket/run", 3, 0, enabled=True)
    assert progress.metrics_path == str(fake_gcs / "run" / "metrics.jsonl")
    _log_three(progress)
    # On cloud storage the object is not rewritten (re-uploaded) at every step ...
    assert not (fake_gcs / "run" / "metrics.jsonl").exists()
    progress.close()
    # ... but every line is there after close,
    lines = (fake_gcs / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert [s for s, _ in tensorboard.read_scalars(fake_gcs / "run" / "tensorboard")] == [1, 2, 3]
    assert "step 3/3" in capsys.readouterr().out
    # and a resumed run continues the file (objects cannot be appended to: it is rewritten).
    resumed = progress_lib.Progress("gs://bucket/run", 4, 3, enabled=True)
    resumed.count(100)
    resumed.log(4, {"loss": 0.25})
    resumed.close()
    lines = (fake_gcs / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert [s for s, _ in tensorboard.read_scalars(fake_gcs / "run" / "tensorboard")] == [
        1,
        2,
        3,
        4,
    ]


def test_cloud_file_rewrites_the_whole_object_at_each_flush(tmp_path):
    path = tmp_path / "object.txt"
    path.write_text("old\n")
    f = tensorboard.CloudFile(path, append=True)
    f.write("a\n")
    assert path.read_text() == "old\n"  # nothing uploaded before a flush
    f.flush()
    assert path.read_text() == "old\na\n"
    f.write("b\n")
    f.close()
    f.close()
    assert path.read_text() == "old\na\nb\n"
    with pytest.raises(ValueError, match="closed"):
        f.write("c\n")
    fresh = tensorboard.CloudFile(tmp_path / "new.bin", binary=True)
    fresh.close()  # created even when empty, like a local file
    assert (tmp_path / "new.bin").read_bytes() == b""


def test_gcs_through_gcsfs_against_a_local_emulator():
    """The real client path (epath -> gcsfs -> the GCS JSON API) on an in-process emulator on
    127.0.0.1, where the test dependencies for it are installed."""
    fake = pytest.importorskip("tagi_jax.testing.fake_gcs")
    if not fake.available():
        pytest.skip("gcp-storage-emulator / gcsfs not installed")
    with fake.fake_gcs() as root:
        progress = progress_lib.Progress(f"{root}/run", 3, 0, enabled=True)
        _log_three(progress)
        progress.close()
        lines = epath.Path(f"{root}/run/metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
        scalars = tensorboard.read_scalars(f"{root}/run/tensorboard")
        assert [s for s, _ in scalars] == [1, 2, 3]


def test_progress_on_a_local_model_dir_flushes_every_step(tmp_path, capsys):
    model_dir = tmp_path / "new" / "run"  # created by Progress
    progress = progress_lib.Progress(str(model_dir), 3, 0, enabled=True)
    _log_three(progress)
    lines = (model_dir / "metrics.jsonl").read_text().splitlines()  # before close
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    progress.close()
    scalars = tensorboard.read_scalars(model_dir / "tensorboard")
    assert [s for s, _ in scalars] == [1, 2, 3]
    assert scalars[-1][1]["loss"] == pytest.approx(1 / 3)
    assert {"tokens_per_second", "steps_per_second"} <= set(scalars[-1][1])


def test_disabled_progress_writes_nothing(tmp_path):
    progress = progress_lib.Progress(str(tmp_path / "run"), 3, 0, enabled=False)
    _log_three(progress)
    progress.close()
    assert not (tmp_path / "run").exists()


def test_neither_tensorflow_nor_torch_is_imported():
    code = (
        "import sys, tempfile\n"
        "from tagi_jax.training import progress, tensorboard\n"
        "before = 'tensorboardX' in sys.modules\n"
        "with tensorboard.SummaryWriter(tempfile.mkdtemp()) as w:\n"
        "    w.scalars(1, {'loss': 1.0})\n"
        "print(before, sorted(m for m in ('tensorflow', 'torch') if m in sys.modules))\n"
        "import torch\n"  # still importable afterwards (where installed)
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 or "No module named 'torch'" in out.stderr, out.stderr
    assert out.stdout.strip() == "False []"
