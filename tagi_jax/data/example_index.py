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
  a row; every ``stride``-th offset is kept (8 bytes per ``stride`` rows) and a read walks at
  most ``stride - 1`` rows forward from it.

No TensorFlow here: the order is plain numpy, testable on its own. numpy's ``Generator``
streams are stable within a numpy version (pinned in requirements.txt); a run resumed under
another numpy could see another order after the resume point.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

import numpy as np

# Separates the stream's random draws from any other use of the same seed.
_SALT = 0x7A61_6769


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


class LineIndex:
    """The non-blank lines of a text/JSONL file, addressable by row (a blank line: ASCII
    whitespace only, which every reader here skips)."""

    def __init__(self, path: str, stride: int = 64):
        self.path = path
        self.stride = stride
        offsets, count, position = [], 0, 0
        with open(path, "rb") as f:
            for line in f:
                if not line.isspace():
                    if count % stride == 0:
                        offsets.append(position)
                    count += 1
                position += len(line)
        self.count = count
        self._offsets = np.asarray(offsets, np.int64)

    def __len__(self) -> int:
        return self.count

    def read(self, row: int) -> tuple[bytes, int]:
        """``(line, byte offset)`` of non-blank line ``row`` (0-based)."""
        if not 0 <= row < self.count:
            raise IndexError(f"{self.path}: row {row} of {self.count}")
        skip = row % self.stride
        with open(self.path, "rb") as f:
            f.seek(int(self._offsets[row // self.stride]))
            while True:
                offset = f.tell()
                line = f.readline()
                if not line:
                    raise ValueError(f"{self.path} changed while training read it (row {row})")
                if line.isspace():
                    continue
                if not skip:
                    return line, offset
                skip -= 1

    def line_number(self, offset: int) -> int:
        """The 1-based line number of the line at byte ``offset`` (for error messages)."""
        with open(self.path, "rb") as f:
            return f.read(offset).count(b"\n") + 1


class TFRecordIndex:
    """The records of an uncompressed TFRecord file, addressable by row. Records are framed
    ``uint64 length, uint32 crc, data, uint32 crc``; the scan reads each header and seeks over
    the data (CRCs are not checked)."""

    def __init__(self, path: str, stride: int = 64):
        self.path = path
        self.stride = stride
        size = os.path.getsize(path)
        offsets, count, position = [], 0, 0
        with open(path, "rb") as f:
            while position < size:
                header = f.read(12)
                if len(header) < 12:
                    raise ValueError(f"{path}: truncated TFRecord header at byte {position}")
                (length,) = struct.unpack("<Q", header[:8])
                if count % stride == 0:
                    offsets.append(position)
                count += 1
                position += 12 + length + 4
                f.seek(position)
        if position != size:
            raise ValueError(f"{path}: truncated TFRecord file (record {count - 1})")
        self.count = count
        self._offsets = np.asarray(offsets, np.int64)

    def __len__(self) -> int:
        return self.count

    def read(self, row: int) -> bytes:
        """The serialized record ``row`` (0-based)."""
        if not 0 <= row < self.count:
            raise IndexError(f"{self.path}: record {row} of {self.count}")
        with open(self.path, "rb") as f:
            f.seek(int(self._offsets[row // self.stride]))
            for _ in range(row % self.stride):
                (length,) = struct.unpack("<Q", f.read(12)[:8])
                f.seek(length + 4, os.SEEK_CUR)
            header = f.read(12)
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            if len(data) != length:
                raise ValueError(f"{self.path} changed while training read it (record {row})")
            return data
