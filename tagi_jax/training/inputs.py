"""Training's batches on the mesh: each process's rows of the global batch, placed as global
arrays. The data itself (what the rows hold) comes from ``tagi_jax.data.pipeline``.

``TrainInput`` (what the loop reads): global batch ``b`` is examples ``[b * B, (b + 1) * B)``
of a stream that is a function of the seed and the example index alone
(``pipeline.host_batches``), and each process reads, formats and tokenizes only the rows its
own devices hold (``local_rows``) and places them (``place_local``). So the global batch, and
with it the loss, does not depend on how many hosts or devices there are; a run resumed on
another topology continues the same data order; and a resume at batch ``k`` starts the stream
there by index instead of producing the ``k`` batches before it. ``TeacherAdapters`` places
each local row's LoRA teacher the same way. ``to_global`` places a whole (host-side) batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from tagi_jax.data import pipeline
from tagi_jax.data.config import DataConfig
from tagi_jax.models import lora
from tagi_jax.parallel import partitioning


def local_rows(mesh, batch_size: int, rules=partitioning.DEFAULT_RULES) -> np.ndarray:
    """The rows of a global batch this process's devices hold (sorted global row indices):
    what it reads. With the batch over the data-parallel axes, process ``p`` of ``n`` holding
    its devices in mesh order gets ``[p * B / n, (p + 1) * B / n)``; a process whose devices
    replicate rows (a model axis across processes) reads those rows too."""
    sharding = batch_sharding(mesh, 1, rules)
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((batch_size,)).values():
        rows.update(range(*index[0].indices(batch_size)))
    return np.asarray(sorted(rows), np.int64)


def place_local(value, sharding, rows, batch_size: int, *, batch_axis: int = 0) -> jax.Array:
    """A global array from this process's ``rows`` (``value``'s ``batch_axis`` holds them, in
    ``rows``' order); the global array has ``batch_size`` there. Each device takes its slice
    of the rows this process read; asking for a row it did not read is an error."""
    value = np.asarray(value)
    rows = np.asarray(rows, np.int64)
    if value.shape[batch_axis] != len(rows):
        raise ValueError(
            f"axis {batch_axis} of a {value.shape} value holds {value.shape[batch_axis]} rows, "
            f"this process read {len(rows)}"
        )
    position = np.full(batch_size, -1, np.int64)
    position[rows] = np.arange(len(rows))
    shape = value.shape[:batch_axis] + (batch_size,) + value.shape[batch_axis + 1 :]

    def fetch(index):
        index = list(index)
        wanted = position[index[batch_axis]]
        if np.any(wanted < 0):
            raise ValueError(
                f"a device of this process holds rows {np.arange(batch_size)[index[batch_axis]]} "
                f"of the batch, this process read {rows}: the sharding does not split the "
                "batch as batch_sharding does"
            )
        if len(wanted) and np.all(np.diff(wanted) == 1):  # contiguous: a view, no copy
            wanted = slice(int(wanted[0]), int(wanted[-1]) + 1)
        index[batch_axis] = wanted
        return value[tuple(index)]

    return jax.make_array_from_callback(shape, sharding, fetch)


class TrainInput:
    """This process's share of the training stream, placed as global arrays.

    Each process reads, formats and tokenizes only the rows of each global batch its own
    devices hold (``local_rows``), and a run resumed at ``start_batch`` starts the stream
    there by example index, without producing the batches before it
    (``pipeline.host_batches``; tasks that cannot be indexed, TFDS C4, fall back to the
    replayed whole-batch stream). The global batch, and the loss, do not depend on the number
    of processes.

    ``next()`` gives ``(local, arrays)``: ``local`` the numpy rows this process read (every
    feature, ``task_id``/``category_id`` included, ``len(self.rows)`` rows in ``self.rows``'
    order) and ``arrays`` the global ``jax.Array`` of each of ``keys``
    (``pipeline.MODEL_FEATURES``, and ``teacher_input_tokens`` with ``with_teacher``), rows
    over the data-parallel axes.
    ``position`` is the global batch the next ``next()`` gives (``start_batch`` + batches
    given): what a checkpoint records. Close it (``close()`` or ``with``) when done.
    """

    def __init__(
        self,
        data: DataConfig,
        batch_size: int,
        seed: int,
        mesh,
        rules=partitioning.DEFAULT_RULES,
        *,
        start_batch: int = 0,
        with_teacher: bool = False,
    ):
        self.mesh, self.rules = mesh, rules
        self.batch_size = batch_size
        self.rows = local_rows(mesh, batch_size, rules)
        self.keys = pipeline.MODEL_FEATURES + (("teacher_input_tokens",) if with_teacher else ())
        self.position = start_batch
        self._batches = pipeline.host_batches(
            data,
            batch_size,
            seed,
            rows=self.rows,
            start_batch=start_batch,
            with_teacher=with_teacher,
        )

    def __iter__(self):
        return self

    def __next__(self) -> tuple[dict[str, np.ndarray], dict[str, jax.Array]]:
        local = next(self._batches)
        self.position += 1
        arrays = {
            key: self.place_local(
                local[key], batch_sharding(self.mesh, local[key].ndim, self.rules)
            )
            for key in self.keys
        }
        return local, arrays

    def place_local(self, value, sharding, *, batch_axis: int = 0) -> jax.Array:
        """A global array from values of this process's rows (``place_local``): e.g. each
        local example's teacher LoRA, looked up by the local batch's ``task_id``."""
        return place_local(value, sharding, self.rows, self.batch_size, batch_axis=batch_axis)

    @property
    def tokens_scale(self) -> float:
        """Global batch rows per local row: ``local_tokens(...) * tokens_scale`` estimates the
        global batch's tokens (exact when every process's rows hold as many)."""
        return self.batch_size / len(self.rows)

    @staticmethod
    def local_tokens(local: Mapping[str, np.ndarray]) -> int:
        """Target (loss) plus non-padding encoder tokens of this process's rows."""
        return int(local["decoder_loss_weights"].sum()) + int(
            (local["encoder_input_tokens"] > 0).sum()
        )

    def close(self) -> None:
        """Ends the input pipeline now (not at interpreter exit, where a tf.data iterator
        finalised during shutdown can abort the process)."""
        self._batches.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TeacherAdapters:
    """Each example's teacher LoRA (from the bank the ``lora_teachers`` stage wrote), placed as
    global arrays: ``teacher_lora`` and ``teacher_mask`` (False where a group has no teacher)."""

    def __init__(self, path: str, data: DataConfig, mesh, rules):
        from tagi_jax.distill import lora_teachers

        self.bank = lora_teachers.TeacherBank.load(path)
        self.names = np.asarray(pipeline.teacher_group_names(data, self.bank.group_by))
        self.id_key = "task_id" if self.bank.group_by == "task" else "category_id"
        self.mesh, self.rules = mesh, rules

    def __call__(self, numpy_batch, train_input: TrainInput) -> dict[str, Any]:
        """``numpy_batch``: this process's rows (``train_input.rows`` of the global batch)."""
        ids = np.asarray(numpy_batch[self.id_key]).reshape(-1)
        if ids.max(initial=0) >= len(self.names):
            raise ValueError(f"{self.id_key} {ids.max()} is beyond the {len(self.names)} names")
        adapters, keep = self.bank.adapters_for(list(self.names[ids]), skip_missing=True)

        def place(value, axes):
            sharding = partitioning.named_sharding(self.mesh, axes, self.rules)
            return train_input.place_local(value, sharding, batch_axis=axes.index("batch"))

        a, b = {}, {}
        for name in adapters.a:
            a_axes, b_axes = lora.adapter_logical_axes(lora.TARGETS[name])
            a[name], b[name] = place(adapters.a[name], a_axes), place(adapters.b[name], b_axes)
        return {
            "teacher_lora": adapters.replace(a=a, b=b),
            "teacher_mask": place(keep, ("batch",)),
        }


def batch_sharding(mesh, ndim: int, rules=partitioning.DEFAULT_RULES):
    """Rows over the data-parallel axes, everything else whole."""
    return partitioning.named_sharding(mesh, ("batch",) + (None,) * (ndim - 1), rules)


def place(value, sharding) -> jax.Array:
    """A global array from the whole (host-side) ``value``: each process copies only the
    slices its own devices hold."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def to_global(
    numpy_batch: Mapping[str, np.ndarray],
    keys: Sequence[str],
    mesh,
    rules=partitioning.DEFAULT_RULES,
) -> dict[str, jax.Array]:
    """Global arrays of ``keys``, rows over the data-parallel axes."""
    return {
        key: place(numpy_batch[key], batch_sharding(mesh, np.ndim(numpy_batch[key]), rules))
        for key in keys
    }
