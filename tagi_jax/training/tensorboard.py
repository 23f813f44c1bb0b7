"""A dependency-free TensorBoard event-file writer for scalar metrics.

Why hand-written: TensorFlow may only be imported inside ``tagi_jax/data/`` (the training and
model code must run without it), and the ``tensorboard``/``tensorboardX``/``clu`` writers either
pull TensorFlow in or add a dependency for what is ~100 lines of byte packing. Only scalars are
needed, so this module encodes the few protobuf messages it uses by hand.

Format. An event file is a sequence of TFRecords, each framed as::

    uint64 length (little-endian)
    uint32 masked_crc32c(length bytes)
    bytes  data[length]
    uint32 masked_crc32c(data)

where ``masked_crc32c(x) = ((crc >> 15) | (crc << 17)) + 0xa282ead8 (mod 2**32)`` over the
CRC32C (Castagnoli) checksum. Each record is a serialized ``tensorflow.Event``::

    Event         { double wall_time = 1; int64 step = 2; string file_version = 3;
                    Summary summary = 5; }
    Summary       { repeated Value value = 1; }
    Summary.Value { string tag = 1; float simple_value = 2; }

The first record of a file carries ``file_version = "brain.Event:2"``, which TensorBoard uses to
recognise the file. Files are named ``events.out.tfevents.<int(time)>.<hostname>``, and are
opened in append mode: a writer restarted in the same second on the same host continues the same
file (still a valid record stream) instead of truncating it.

Only local paths are supported (plain ``open``); a ``gs://`` log dir would need a synced local
directory.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from collections.abc import Mapping
from types import TracebackType

FILE_VERSION = "brain.Event:2"

_CRC32C_POLY = 0x82F63B78  # Castagnoli, bit-reflected


def _make_crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC32C_POLY if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


# Built once at import; the per-record cost is then one table lookup per byte, which is plenty
# for event records of a few hundred bytes written once per logging step.
_CRC32C_TABLE = _make_crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC32C (Castagnoli) of ``data``, as used by TFRecord framing."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    # TFRecord stores a rotated-and-offset CRC so that a CRC over bytes that themselves contain
    # CRCs does not degenerate.
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """``data`` framed as one TFRecord."""
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", masked_crc32c(length))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


# --- protobuf wire format ---------------------------------------------------------------------

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
    # Negative int64 values are encoded as their 64-bit two's complement (10 bytes).
    value &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint((field << 3) | wire_type)


def _len_field(field: int, payload: bytes) -> bytes:
    return _key(field, _LEN) + _varint(len(payload)) + payload


def _float32(value: float) -> bytes:
    try:
        return struct.pack("<f", value)
    except OverflowError:
        # struct refuses finite doubles beyond float32 range; a C cast (what TensorFlow would
        # do) gives a signed infinity, which TensorBoard displays rather than losing the point.
        return struct.pack("<f", math.copysign(math.inf, value))


def _summary_value(tag: str, value: float) -> bytes:
    return _len_field(1, tag.encode("utf-8")) + _key(2, _FIXED32) + _float32(value)


def _event(
    wall_time: float, step: int = 0, file_version: str | None = None, summary: bytes | None = None
) -> bytes:
    out = _key(1, _FIXED64) + struct.pack("<d", wall_time) + _key(2, _VARINT) + _varint(step)
    if file_version is not None:
        out += _len_field(3, file_version.encode("utf-8"))
    if summary is not None:
        out += _len_field(5, summary)
    return out


def scalars_event(step: int, values: Mapping[str, float], wall_time: float) -> bytes:
    """One serialized ``Event`` holding every entry of ``values`` as a ``simple_value``."""
    summary = b"".join(
        _len_field(1, _summary_value(str(tag), float(value))) for tag, value in values.items()
    )
    return _event(wall_time, int(step), summary=summary)


# --- writer -----------------------------------------------------------------------------------


class SummaryWriter:
    """Writes scalar summaries to ``<log_dir>/events.out.tfevents.<int(time)>.<hostname>``.

    Every ``scalars`` call is flushed to the OS, so a preempted (killed) run keeps everything it
    already logged.
    """

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        os.makedirs(log_dir, exist_ok=True)
        now = time.time()
        name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}"
        self.path = os.path.join(log_dir, name)
        self._file = open(self.path, "ab")  # noqa: SIM115 -- closed in close()
        self._write(_event(now, file_version=FILE_VERSION))
        self.flush()

    def _write(self, event: bytes) -> None:
        if self._file.closed:
            raise ValueError(f"SummaryWriter for {self.path} is closed")
        # One write call per record, so a record is never split between two buffer flushes.
        self._file.write(tfrecord(event))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Logs ``values`` (tag -> number) at ``step`` as one event; nan/inf are written as is.

        Values may be Python/NumPy numbers or 0-d arrays (anything ``float()`` accepts).
        """
        self._write(scalars_event(step, values, time.time()))
        self.flush()

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            self._file.close()

    def __enter__(self) -> SummaryWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
