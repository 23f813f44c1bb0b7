"""The training example stream as a function of (seed, global example index).

What lets each process read only its share of a global batch, and a resumed run start at batch
``k`` without producing the ``k * batch_size`` examples before it:

* ``Order`` maps a global example index to ``(member, row)``: a member is a group of examples
  (a natural-instructions task, a P3 task of a mixture, a C4 file) and ``row`` one of its
  examples. Epoch ``e`` is a seeded permutation of every member's rows (a capped member gives
  a seeded subset of ``cap`` rows, another each epoch: examples-proportional mixing with a
  cap, drawn without replacement within an epoch). Index ``i`` is in epoch
  ``i // epoch_size``; nothing before it is computed but that epoch's permutation (a numpy
  permutation of ``epoch_size`` ints).
* ``LineIndex`` / ``TFRecordIndex``: row ``r`` of a JSONL/text or TFRecord file by byte offset,
  so a row is read (and parsed) only when it is drawn. Building one scans the file once: line
  ends, or record headers (12 bytes each, the data seeked over), never parsing or tokenizing
  a row; every ``stride``-th offset is kept (8 bytes per ``stride`` rows) and a read takes the
  ``stride`` rows from it in one read. Files are local or in cloud storage (``gs://``, through
  ``tagi_jax.paths``): a small cloud object is read whole once and held in memory, a large one
  read by range (``_File`` says why).

No TensorFlow here: the order is plain numpy, testable on its own. numpy's ``Generator``
streams are stable within a numpy version (pinned in requirements.txt); a run resumed under
another numpy could see another order after the resume point.
"""

from __future__ import annotations

import builtins
import io
import struct
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import IO

import numpy as np

from tagi_jax import paths

# Separates the stream's random draws from any other use of the same seed.
_SALT = 0x7A61_6769

# Cloud objects up to this size are held in memory by the indexes (``_File``), while all of
# them together stay within the budget; larger ones are read by range.
IN_MEMORY_BYTES = 64 * 2**20
IN_MEMORY_BUDGET = 2 * 2**30
_SCAN_CHUNK = 4 * 2**20
_held = 0
_held_lock = threading.Lock()


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([_SALT, *(int(k) % 2**63 for k in key)])


class Order:
    """Global example index -> ``(member, row)``, a deterministic function of the seed.

    Args:
      sizes: rows of each member.
      seed: the run's seed.
      cap: at most this many rows of a member per epoch (a seeded subset); None: all.
    """

    def __init__(self, sizes: Sequence[int], seed: int, cap: int | None = None):
        self.sizes = np.asarray(sizes, np.int64)
        self.seed = int(seed)
        self.cap = cap
        per_epoch = self.sizes if cap is None else np.minimum(self.sizes, cap)
        self.per_epoch = per_epoch
        self.epoch_size = int(per_epoch.sum())
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self._epochs:
            rows = []
            for member, (size, take) in enumerate(zip(self.sizes, self.per_epoch, strict=True)):
                if take < size:
                    chosen = _rng(self.seed, epoch, member).choice(size, take, replace=False)
                    rows.append(np.sort(chosen))
                else:
                    rows.append(np.arange(size, dtype=np.int64))
            members = np.repeat(np.arange(len(self.sizes), dtype=np.int32), self.per_epoch)
            rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
            permutation = _rng(self.seed, epoch).permutation(self.epoch_size)
            if len(self._epochs) >= 2:  # the stream only moves forward: keep this and the last
                del self._epochs[min(self._epochs)]
            self._epochs[epoch] = (members[permutation], rows[permutation])
        return self._epochs[epoch]

    def lookup(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """``(members, rows)`` of the global example ``indices``."""
        if self.epoch_size == 0:
            raise ValueError("the stream has no examples")
        indices = np.asarray(indices, np.int64)
        members = np.empty(indices.shape, np.int32)
        rows = np.empty(indices.shape, np.int64)
        epochs = indices // self.epoch_size
        for epoch in np.unique(epochs):
            where = epochs == epoch
            epoch_members, epoch_rows = self._epoch(int(epoch))
            at = indices[where] % self.epoch_size
            members[where], rows[where] = epoch_members[at], epoch_rows[at]
        return members, rows


def batch_indices(batch: int, batch_size: int, rows: np.ndarray) -> np.ndarray:
    """The global example indices of ``rows`` of global batch ``batch``: batch ``b`` is
    examples ``[b * batch_size, (b + 1) * batch_size)`` of the stream."""
    return batch * batch_size + np.asarray(rows, np.int64)


class _File:
    """A file's bytes by range, wherever it lives (``tagi_jax.paths``).

    * A local file is opened for each read, as before (the OS caches it).
    * A cloud object of at most ``IN_MEMORY_BYTES`` is downloaded whole, once, and held in
      memory (while all held together stay within ``IN_MEMORY_BUDGET``): the index scans every
      byte anyway, and a row drawn is seldom near the one read before it, so reading rows from
      the object costs one HTTP request per row (measured on the emulator: 300 random rows of
      a 20 MiB JSONL object, 303 requests; held in memory, none), i.e. a GCS round trip per
      example of every batch. P3 task files and natural-instructions data are this size.
    * A larger cloud object (a C4 shard, a big P3 task), or one past the budget, is scanned
      streamed in chunks and read by range through one handle kept open: a request per row
      drawn, memory bounded.
    """

    def __init__(self, path: str):
        self.path = path
        self._data: bytes | None = None
        self._handle = None
        self._lock = threading.Lock()
        if paths.is_uri(path):
            size = paths.getsize(path)  # FileNotFoundError, as open() gives for a local file
            if size <= IN_MEMORY_BYTES and _reserve(size):
                try:
                    self._data = paths.read_bytes(path)
                except BaseException:
                    _release(size)
                    raise
                _reserve(len(self._data) - size, force=True)  # it changed since: what is held
                weakref.finalize(self, _release, len(self._data))

    def size(self) -> int:
        return len(self._data) if self._data is not None else paths.getsize(self.path)

    def chunks(self, size: int = _SCAN_CHUNK) -> Iterator[bytes]:
        """The file's bytes in order, ``size`` at a time (the scan)."""
        if self._data is not None:
            for start in range(0, len(self._data), size):
                yield self._data[start : start + size]
            return
        with paths.open(self.path, "rb") as f:
            while block := f.read(size):
                yield block

    def read(self, start: int, length: int) -> bytes:
        """``length`` bytes from byte ``start`` (fewer at the end of the file)."""
        if self._data is not None:
            return self._data[start : start + length]
        if paths.is_local(self.path):
            with builtins.open(self.path, "rb") as f:
                f.seek(start)
                return f.read(length)
        with self._lock:  # one handle: a seek and its read go together
            if self._handle is None:
                self._handle = paths.open(self.path, "rb")
            self._handle.seek(start)
            return self._handle.read(length)


def _reserve(size: int, force: bool = False) -> bool:
    """Counts ``size`` bytes against ``IN_MEMORY_BUDGET`` (False: it does not fit)."""
    global _held
    with _held_lock:
        if not force and _held + size > IN_MEMORY_BUDGET:
            return False
        _held += size
        return True


def _release(size: int) -> None:
    global _held
    with _held_lock:
        _held -= size


def open_text(path: str) -> IO[str]:
    """``path`` (local or cloud) opened as UTF-8 text, streamed: a local file as ``open`` does;
    a cloud object's bytes through the same decoder (``io.TextIOWrapper``, UTF-8: not the
    locale's encoding, which fsspec's text mode would take), so both read and fail alike."""
    if paths.is_local(path):
        return paths.open(path, "r", encoding="utf-8")
    return io.TextIOWrapper(paths.open(path, "rb"), encoding="utf-8")


def binary_lines(path: str) -> Iterator[bytes]:
    """The lines of a local or cloud file, as iterating it opened ``"rb"`` gives them: a local
    file is iterated as before; a cloud object is read in chunks of a few MiB and split here
    (fsspec's ``readline`` copies a whole read-ahead block for every line)."""
    if paths.is_local(path):
        with builtins.open(path, "rb") as f:
            yield from f
        return
    with paths.open(path, "rb") as f:
        for _, line in split_lines(iter(lambda: f.read(_SCAN_CHUNK), b"")):
            yield line


def split_lines(chunks: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """``(byte offset, line)`` of each line (its ``\\n`` included; the last one may lack it)
    of a file given as consecutive chunks: the lines iterating the binary file gives."""
    position, rest = 0, b""
    for block in chunks:
        data = rest + block if rest else block
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            yield position, data[start : end + 1]
            position += end + 1 - start
            start = end + 1
        rest = data[start:]
    if rest:
        yield position, rest


class LineIndex:
    """The non-blank lines of a text/JSONL file, addressable by row (a blank line: ASCII
    whitespace only, which every reader here skips). Local or in cloud storage (``_File``)."""

    def __init__(self, path: str, stride: int = 64):
        self.path = path
        self.stride = stride
        self._file = _File(path)
        offsets, count, end = [], 0, 0
        for position, line in split_lines(self._file.chunks()):
            if not line.isspace():
                if count % stride == 0:
                    offsets.append(position)
                count += 1
            end = position + len(line)
        self.count = count
        self._offsets = np.asarray(offsets, np.int64)
        self._end = end  # where the last non-blank line's chunk of ``stride`` rows ends

    def __len__(self) -> int:
        return self.count

    def _chunk(self, row: int) -> tuple[int, bytes]:
        """``(offset, bytes)`` of the ``stride`` rows (with the blank lines among them) that
        hold ``row``: one read."""
        k = row // self.stride
        start = int(self._offsets[k])
        end = int(self._offsets[k + 1]) if k + 1 < len(self._offsets) else self._end
        data = self._file.read(start, end - start)
        if len(data) != end - start:
            raise ValueError(f"{self.path} changed while training read it (row {row})")
        return start, data

    def read(self, row: int) -> tuple[bytes, int]:
        """``(line, byte offset)`` of non-blank line ``row`` (0-based)."""
        if not 0 <= row < self.count:
            raise IndexError(f"{self.path}: row {row} of {self.count}")
        skip = row % self.stride
        start, data = self._chunk(row)
        for position, line in split_lines((data,)):
            if line.isspace():
                continue
            if not skip:
                return line, start + position
            skip -= 1
        raise ValueError(f"{self.path} changed while training read it (row {row})")

    def line_number(self, offset: int) -> int:
        """The 1-based line number of the line at byte ``offset`` (for error messages)."""
        return self._file.read(0, offset).count(b"\n") + 1


class TFRecordIndex:
    """The records of an uncompressed TFRecord file, addressable by row. Records are framed
    ``uint64 length, uint32 crc, data, uint32 crc``; the scan reads each header and seeks over
    the data (CRCs are not checked). Local or in cloud storage (``_File``)."""

    def __init__(self, path: str, stride: int = 64):
        self.path = path
        self.stride = stride
        self._file = _File(path)
        size = self._file.size()
        offsets, count, position = [], 0, 0
        for position, length in _records(self._file, size):
            if count % stride == 0:
                offsets.append(position)
            count += 1
            position += 12 + length + 4
        if position != size:
            raise ValueError(f"{path}: truncated TFRecord file (record {count - 1})")
        self.count = count
        self.size = size
        self._offsets = np.asarray(offsets, np.int64)

    def __len__(self) -> int:
        return self.count

    def read(self, row: int) -> bytes:
        """The serialized record ``row`` (0-based)."""
        if not 0 <= row < self.count:
            raise IndexError(f"{self.path}: record {row} of {self.count}")
        k = row // self.stride
        start = int(self._offsets[k])
        end = int(self._offsets[k + 1]) if k + 1 < len(self._offsets) else self.size
        data = self._file.read(start, end - start)
        position = 0
        for _ in range(row % self.stride):
            (length,) = struct.unpack("<Q", data[position : position + 8].ljust(8, b"\0"))
            position += 12 + length + 4
        (length,) = struct.unpack("<Q", data[position : position + 8].ljust(8, b"\0"))
        record = data[position + 12 : position + 12 + length]
        if len(data) != end - start or len(record) != length:
            raise ValueError(f"{self.path} changed while training read it (record {row})")
        return record


def _records(file: _File, size: int) -> Iterator[tuple[int, int]]:
    """``(byte offset, data length)`` of each record of a TFRecord file of ``size`` bytes:
    reads each 12-byte header and skips the data (a local file or a large cloud object: by
    seeking, as before; an object held in memory: by slicing)."""
    position = 0
    if paths.is_local(file.path) or file._data is None:
        with paths.open(file.path, "rb") as f:
            while position < size:
                header = f.read(12)
                if len(header) < 12:
                    raise ValueError(f"{file.path}: truncated TFRecord header at byte {position}")
                (length,) = struct.unpack("<Q", header[:8])
                yield position, length
                position += 12 + length + 4
                f.seek(position)
        return
    data = file._data
    while position < size:
        header = data[position : position + 12]
        if len(header) < 12:
            raise ValueError(f"{file.path}: truncated TFRecord header at byte {position}")
        (length,) = struct.unpack("<Q", header[:8])
        yield position, length
        position += 12 + length + 4
