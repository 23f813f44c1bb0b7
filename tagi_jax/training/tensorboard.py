"""TensorBoard scalars through tensorboardX, to a local directory or a ``gs://`` run directory.

Why tensorboardX: it is the maintained writer that needs neither TensorFlow nor PyTorch (the
training code must not import TensorFlow: it lives in ``tagi_jax/data/`` only), writes the
standard event files (``events.out.tfevents.*``: TFRecords of ``tensorflow.Event`` protobufs)
and ships the protobuf classes to read them back.

How it is used here:
- One event per logging step with every metric as a ``simple_value`` (``FileWriter.add_summary``
  of one ``Summary``), not one event per tag (``SummaryWriter.add_scalar``): fewer bytes and
  one queue hand-off per step; TensorBoard shows the same curves.
- Writes are asynchronous: tensorboardX's writer thread writes the queued events and flushes
  every ``flush_secs`` (2 s locally; 30 s on cloud storage, where every flush re-uploads the
  whole object and an object takes about one update per second). ``close()`` writes and flushes
  everything. ``metrics.jsonl`` (``progress.py``) is the record flushed at every step.
- Cloud paths: tensorboardX's own ``gs://`` writer needs ``google-cloud-storage``, which is not a
  dependency. ``gs://`` event files are written through ``etils.epath`` instead, as orbax's
  directories and ``metrics.jsonl`` are (epath uses gcsfs or TensorFlow's file system, whichever
  ``tagi_jax.paths``/``EPATH_USE_TF`` selects). An object cannot be appended to, and gcsfs
  makes a written object visible only when it is closed, so a cloud file (``CloudFile``) is
  kept in memory and rewritten whole at every flush, as tensorboardX's GCS writer does: the
  curves show up during the run, one upload per flush.
- Event file names carry the pid and a counter (as TensorFlow's writer does): tensorboardX opens
  its file with ``"wb"``, so two writers started in the same second in one directory (a quick
  restart) would otherwise truncate each other's file.
- tensorboardX imports PyTorch when it is installed (for ``torch.Tensor`` inputs, which we never
  pass): 1 s or more and ~180 MB per process on a development machine. It is imported with PyTorch
  hidden, unless PyTorch is already loaded.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
from collections.abc import Mapping
from types import ModuleType, TracebackType

from etils import epath

from tagi_jax import paths  # noqa: F401  (tells epath to use gcsfs, not TensorFlow, for gs://)

LOCAL_FLUSH_SECS = 2.0
CLOUD_FLUSH_SECS = 30.0

_names = itertools.count()
_import_lock = threading.Lock()


def is_cloud_path(path: str | os.PathLike) -> bool:
    """``gs://bucket/...`` and other URL-style paths, which ``os`` functions cannot handle."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: local paths and ``gs://`` alike, no ``os.path`` on it."""
    return epath.Path(path)


class CloudFile:
    """A file on an object store that is written as if appended to: the whole content is kept
    in memory and every ``flush`` (and ``close``) rewrites the object. ``append=True`` starts
    from the object's current content (a resumed run's ``metrics.jsonl``).

    Text or bytes (``binary``); no ``fileno``, so tensorboardX's RecordWriter does not fsync it.
    """

    def __init__(self, path: str | os.PathLike, *, append: bool = False, binary: bool = False):
        self.path = as_path(path)
        self._binary = binary
        self._parts: list = []
        if append and self.path.exists():
            self._parts.append(self.path.read_bytes() if binary else self.path.read_text())
        self._dirty = True  # the object exists from the first flush on, as with a local file
        self.closed = False

    def write(self, data) -> None:
        if self.closed:
            raise ValueError(f"{self.path} is closed")
        self._parts.append(data)
        self._dirty = True

    def flush(self) -> None:
        if self._dirty and not self.closed:
            content = (b"" if self._binary else "").join(self._parts)
            self._parts = [content]
            if self._binary:
                self.path.write_bytes(content)
            else:
                self.path.write_text(content)
            self._dirty = False

    def close(self) -> None:
        self.flush()
        self.closed = True


class _EpathWriterFactory:
    """tensorboardX's hook for URL-style log dirs (``record_writer.register_writer_factory``)."""

    def open(self, path: str) -> CloudFile:
        return CloudFile(path, binary=True)

    def directory_check(self, path: str) -> None:
        as_path(path).mkdir(parents=True, exist_ok=True)


def _tensorboardx() -> ModuleType:
    """``tensorboardX``, imported without PyTorch, with the epath writer for ``gs://``."""
    with _import_lock:
        if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
            # A None entry makes `import torch` raise ImportError, which tensorboardX catches;
            # it is removed at once so that later imports of torch work as usual.
            sys.modules["torch"] = None  # type: ignore[assignment]
            try:
                import tensorboardX
            finally:
                if sys.modules.get("torch", ...) is None:
                    del sys.modules["torch"]
        import tensorboardX
        from tensorboardX import record_writer

        record_writer.register_writer_factory("gs", _EpathWriterFactory())
        return tensorboardX


class SummaryWriter:
    """Scalar summaries in ``<log_dir>/events.out.tfevents.<time>.<host>.<pid>.<n>``.

    ``log_dir`` may be a local directory (created) or a ``gs://`` path. Call ``close()`` (or use
    it as a context manager) to write everything still queued.
    """

    def __init__(self, log_dir: str | os.PathLike, *, flush_secs: float | None = None):
        self.log_dir = os.fspath(log_dir)
        if flush_secs is None:
            flush_secs = CLOUD_FLUSH_SECS if is_cloud_path(self.log_dir) else LOCAL_FLUSH_SECS
        tbx = _tensorboardx()
        from tensorboardX.proto import summary_pb2

        self._summary = summary_pb2.Summary
        self._writer = tbx.FileWriter(
            self.log_dir,
            flush_secs=flush_secs,
            filename_suffix=f".{os.getpid()}.{next(_names)}",
        )
        self._closed = False

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Logs ``values`` (tag -> number) at ``step`` as one event; nan/inf are written as is,
        finite values beyond float32 as a signed infinity (TensorBoard's field is a float32).

        Values may be Python/NumPy numbers or 0-d arrays (anything ``float()`` accepts).
        """
        if self._closed:
            raise ValueError(f"SummaryWriter for {self.log_dir} is closed")
        summary = self._summary(
            value=[
                self._summary.Value(tag=str(tag), simple_value=float(value))
                for tag, value in values.items()
            ]
        )
        self._writer.add_summary(summary, global_step=int(step))

    def flush(self) -> None:
        """Flushes what the writer thread has written so far (``close`` writes everything)."""
        if not self._closed:
            self._writer.flush()

    def close(self) -> None:
        """Writes every queued event, flushes and closes the file (idempotent)."""
        if not self._closed:
            self._closed = True
            self._writer.close()

    def __enter__(self) -> SummaryWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --- reading back (tests, tools) ---------------------------------------------------------------


def event_files(log_dir: str | os.PathLike) -> list[str]:
    """The event files in ``log_dir``, oldest name first."""
    return sorted(str(p) for p in as_path(log_dir).glob("events.out.tfevents.*"))


def read_events(path: str | os.PathLike) -> list:
    """Every ``Event`` of one event file (tensorboardX's protobuf class), checking the length
    and data CRCs of every record; a damaged record raises ``ValueError``."""
    import struct

    _tensorboardx()
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    event_cls = event_pb2.Event
    data = as_path(path).read_bytes()
    events, offset = [], 0
    while offset < len(data):
        header = data[offset : offset + 8]
        if len(header) < 8 or offset + 12 > len(data):
            raise ValueError(f"{path}: truncated record header at byte {offset}")
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
        if masked_crc32c(header) != length_crc:
            raise ValueError(f"{path}: bad length CRC at byte {offset}")
        body = data[offset + 12 : offset + 12 + length]
        crc = data[offset + 12 + length : offset + 16 + length]
        if len(body) < length or len(crc) < 4:
            raise ValueError(f"{path}: truncated record at byte {offset}")
        if masked_crc32c(body) != struct.unpack("<I", crc)[0]:
            raise ValueError(f"{path}: bad data CRC at byte {offset}")
        events.append(event_cls.FromString(body))
        offset += 16 + length
    return events


def read_scalars(log_dir: str | os.PathLike) -> list[tuple[int, dict[str, float]]]:
    """``(step, {tag: value})`` of every summary event in ``log_dir``'s event files, in order."""
    out = []
    for path in event_files(log_dir):
        for event in read_events(path):
            if event.HasField("summary"):
                out.append((event.step, {v.tag: v.simple_value for v in event.summary.value}))
    return out
