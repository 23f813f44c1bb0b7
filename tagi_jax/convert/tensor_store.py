"""Read-only, lazy access to the tensors of a local Hugging Face checkpoint directory.

Supports ``model.safetensors``, sharded safetensors (``model.safetensors.index.json``) and
``pytorch_model.bin`` (single or sharded). Safetensors files are memory-mapped and parsed here
(the format is an 8-byte header length, a JSON header and raw little-endian data), so a slice
of a tensor reads only that slice from disk and bfloat16 works without torch. ``.bin`` files
need torch and are loaded with ``mmap=True``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be read as asked; the message names it."""


class _SafetensorsFile:
    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) != 8:
                    raise CheckpointError(f"{path}: truncated safetensors file (no header)")
                (header_len,) = struct.unpack("<Q", raw)
                if header_len > 100_000_000:
                    raise CheckpointError(f"{path}: not a safetensors file (header length)")
                header = json.loads(f.read(header_len))
        except OSError as e:
            raise CheckpointError(f"cannot read weight file {path}: {e}") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from e
        header.pop("__metadata__", None)
        self.entries = header
        self.data_start = 8 + header_len
        self._mmap: np.memmap | None = None

    def names(self) -> Iterable[str]:
        return self.entries.keys()

    def array(self, name: str) -> np.ndarray:
        """A memory-mapped view: slicing it reads only the slice."""
        entry = self.entries[name]
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(
                f"{self.path}: tensor {name} has unsupported dtype {entry['dtype']}"
            )
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if end - begin != nbytes or self.data_start + end > self._mmap.size:
            raise CheckpointError(
                f"{self.path}: tensor {name} is truncated or its offsets are corrupt"
            )
        buf = self._mmap[self.data_start + begin : self.data_start + end]
        return buf.view(dtype).reshape(shape)


class _TorchFile:
    def __init__(self, path: str):
        try:
            import torch
        except ImportError as e:
            raise CheckpointError(
                f"{path} is a PyTorch pickle; reading it needs torch (pip install torch==2.13.0) "
                "or convert the checkpoint to safetensors"
            ) from e
        try:
            self.state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises many types for a corrupt file
            raise CheckpointError(f"cannot read weight file {path}: {e}") from e
        self.path = path

    def names(self) -> Iterable[str]:
        return self.state.keys()

    def array(self, name: str) -> np.ndarray:
        import torch

        t = self.state[name]
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


class TensorStore:
    """Name → lazily read numpy array over all weight files of one checkpoint directory."""

    def __init__(self, directory: str):
        if not os.path.isdir(directory):
            raise CheckpointError(f"checkpoint directory does not exist: {directory}")
        self.directory = directory
        self._files: dict[str, _SafetensorsFile | _TorchFile] = {}
        self._where: dict[str, str] = {}
        candidates = [
            ("model.safetensors.index.json", None),
            ("model.safetensors", _SafetensorsFile),
            ("pytorch_model.bin.index.json", None),
            ("pytorch_model.bin", _TorchFile),
        ]
        for filename, reader in candidates:
            path = os.path.join(directory, filename)
            if not os.path.exists(path):
                continue
            if reader is None:
                self._read_index(path)
            else:
                self._add_file(path, reader)
            return
        raise CheckpointError(
            f"no weights in {directory}: expected model.safetensors, "
            "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json"
        )

    def _read_index(self, index_path: str) -> None:
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot read shard index {index_path}: {e}") from e
        reader = _SafetensorsFile if index_path.endswith(".safetensors.index.json") else _TorchFile
        opened: dict[str, _SafetensorsFile | _TorchFile] = {}
        for name, filename in weight_map.items():
            path = os.path.join(self.directory, filename)
            if path not in opened:
                if not os.path.exists(path):
                    raise CheckpointError(f"{index_path} lists {filename}, which does not exist")
                opened[path] = reader(path)
            if name not in opened[path].names():
                raise CheckpointError(f"{index_path} puts {name} in {filename}, which lacks it")
            self._files[path] = opened[path]
            self._where[name] = path

    def _add_file(self, path: str, reader) -> None:
        f = reader(path)
        self._files[path] = f
        for name in f.names():
            self._where[name] = path

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def array(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise CheckpointError(
                f"tensor {name} is missing from the checkpoint in {self.directory}"
            )
        return self._files[self._where[name]].array(name)

    def source_of(self, name: str) -> str:
        return self._where.get(name, self.directory)
