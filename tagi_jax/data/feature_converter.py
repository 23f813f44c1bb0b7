"""TAGI's task features → model features, and numpy batches → global jax arrays.

``TagiFeatureConverter`` (a ``seqio.FeatureConverter``, no packing: adapters are per example,
so examples cannot share a row) maps::

  inputs          -> encoder_input_tokens
  hyper_inputs    -> hyper_input_tokens
  teacher_inputs  -> teacher_input_tokens      (only when the task has them)
  targets         -> decoder_target_tokens, decoder_input_tokens (shifted), decoder_loss_weights
  task_id, category_id (scalars) -> passed through

Every sequence is trimmed/padded to its length: static shapes. ``host_batches`` gives one
process's rows of a task's endless global batches from any batch on, read by example index
(``example_index``); ``training_batches`` the sequential seqio stream of whole batches. Bad
data met on the way is one ``DataError`` line; ``tagi_jax.training.inputs`` places the batches
on the mesh.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator, Mapping

import numpy as np

from tagi_jax.data import errors
from tagi_jax.data.tf_setup import import_tensorflow

# Before seqio: TensorFlow must never see the accelerators (JAX owns their memory).
tf = import_tensorflow()

import seqio  # noqa: E402

_log = logging.getLogger(__name__)

_SEQUENCES = {
    "inputs": "encoder_input_tokens",
    "hyper_inputs": "hyper_input_tokens",
    "teacher_inputs": "teacher_input_tokens",
}
IDS = ("task_id", "category_id")
# What tf.data raises for bad data: a Python exception in a generator (InvalidArgument for a
# ValueError, Unknown for other types), a missing or corrupt file. Others (out of memory, a
# cancelled pipeline) are not the data's fault and keep their own type.
_DATA_ERRORS = (
    tf.errors.InvalidArgumentError,
    tf.errors.UnknownError,
    tf.errors.NotFoundError,
    tf.errors.DataLossError,
)


def _spec(rank: int = 1):
    return seqio.FeatureConverter.FeatureSpec(dtype=tf.int32, rank=rank)


class TagiFeatureConverter(seqio.FeatureConverter):
    """Three encoder streams + targets + ids, padded (never packed).

    ``with_teacher=False`` drops the teacher stream (C4 pretraining has no teacher input).
    """

    TASK_FEATURES = {}
    MODEL_FEATURES = {}
    PACKING_FEATURE_DTYPES = {}

    def __init__(self, with_teacher: bool = True, with_ids: bool = True, **kwargs):
        if kwargs.pop("pack", False):
            raise ValueError("TagiFeatureConverter cannot pack: adapters are per example")
        sequences = dict(_SEQUENCES)
        if not with_teacher:
            sequences.pop("teacher_inputs")
        self._sequences = sequences
        self._ids = IDS if with_ids else ()
        self.TASK_FEATURES = {k: _spec() for k in (*sequences, "targets")} | {
            k: _spec(0) for k in self._ids
        }
        self.MODEL_FEATURES = {
            **{v: _spec() for v in sequences.values()},
            "decoder_target_tokens": _spec(),
            "decoder_input_tokens": _spec(),
            "decoder_loss_weights": _spec(),
            **{k: _spec(0) for k in self._ids},
        }
        super().__init__(pack=False, **kwargs)

    def task_feature_lengths(self, lengths: Mapping[str, int]) -> dict[str, int]:
        """Adds the scalar ids (whose length seqio requires but ignores) to ``lengths``."""
        return {**lengths, **{k: 1 for k in self._ids}}

    def _convert_features(self, ds, task_feature_lengths):
        def pad(x, length):
            x = x[:length]
            x = tf.pad(x, [[0, length - tf.shape(x)[0]]])
            return tf.ensure_shape(x, [length])

        def convert(features):
            out = {
                model: pad(features[task], task_feature_lengths[task])
                for task, model in self._sequences.items()
            }
            targets = pad(features["targets"], task_feature_lengths["targets"])
            out["decoder_target_tokens"] = targets
            out["decoder_input_tokens"] = seqio.utils.make_autoregressive_inputs(
                targets, bos_id=self.bos_id
            )
            out["decoder_loss_weights"] = tf.cast(targets > 0, tf.int32)
            for k in self._ids:
                out[k] = tf.cast(features[k], tf.int32)
            return out

        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths):
        lengths = {model: task_feature_lengths[task] for task, model in self._sequences.items()}
        target = task_feature_lengths["targets"]
        lengths |= {
            "decoder_target_tokens": target,
            "decoder_input_tokens": target,
            "decoder_loss_weights": target,
        }
        return lengths | {k: 1 for k in self._ids}


def training_batches(
    task: str,
    feature_lengths: Mapping[str, int],
    batch_size: int,
    *,
    seed: int,
    with_teacher: bool,
    source: str = "",
) -> Iterator[dict[str, np.ndarray]]:
    """Endless numpy batches of ``task``'s (a registered Task or Mixture) ``train`` split,
    shuffled in a ``seed``-fixed order. ``with_teacher`` keeps ``teacher_input_tokens``.

    Bad data met while the batches are built or pulled is one ``DataError`` line (the original
    message of what the reader raised, not TensorFlow's traceback around it), and a task with no
    examples is a ``DataError`` naming the task and ``source`` (where its data lives), not the
    end of the stream."""
    conv = TagiFeatureConverter(with_teacher=with_teacher)
    lengths = dict(feature_lengths)
    if not with_teacher:
        lengths.pop("teacher_inputs", None)
    lengths = conv.task_feature_lengths(lengths)
    context = f"task {task!r}" + (f" ({source})" if source else "")
    try:
        provider = seqio.get_mixture_or_task(task)
        # A Mixture keeps only its output features (the text streams); the scalar ids are not
        # features (seqio would trim them like sequences), so they are passed through by name.
        extra = {"passthrough_features": IDS} if isinstance(provider, seqio.Mixture) else {}
        ds = provider.get_dataset(
            lengths, split="train", shuffle=True, seed=seed, num_epochs=None, **extra
        )
        batches = numpy_batches(conv(ds, task_feature_lengths=lengths), batch_size)
    except _DATA_ERRORS as e:
        raise errors.from_pipeline(e, context) from None
    return _pulled(batches, context)


def host_batches(
    task: str,
    feature_lengths: Mapping[str, int],
    batch_size: int,
    *,
    seed: int,
    with_teacher: bool,
    rows,
    start_batch: int = 0,
    source: str = "",
) -> Iterator[dict[str, np.ndarray]]:
    """This process's ``rows`` of each global batch of ``task``'s train split, from global
    batch ``start_batch`` on: endless numpy batches of ``len(rows)`` examples.

    Global batch ``b`` is examples ``[b * batch_size, (b + 1) * batch_size)`` of a stream that
    is a function of ``seed`` and the example index alone (``example_index.Order``: a seeded
    permutation per epoch), so the global batch does not depend on how many processes read it,
    and batch ``start_batch`` is found by index: nothing before it is read beyond the data's
    structure (task files, line ends), nor formatted, tokenized or converted. Only this
    process's rows are. ``tasks.indexed_source`` says which tasks can be read so. TFDS C4
    (``tasks.sequential_source``) is read in file order from example ``start_batch *
    batch_size`` on (TFDS split slicing: earlier files unopened, earlier records of its file
    read but not parsed); each process reads and parses the records of whole global batches
    and tokenizes only its rows. Any other task (registered elsewhere) falls back to the
    sequential seqio stream of ``training_batches``, which every process reads whole and a
    resume replays (a warning says so).

    Errors: as ``training_batches`` (one ``DataError`` line).
    """
    rows = np.asarray(rows, np.int64)
    if rows.ndim != 1 or not len(rows) or np.any(np.diff(rows) <= 0):
        raise ValueError(f"rows must be increasing global row indices, got {rows}")
    if rows[0] < 0 or rows[-1] >= batch_size:
        raise ValueError(f"rows {rows} are outside a batch of {batch_size}")
    if start_batch < 0:
        raise ValueError(f"start_batch={start_batch} is negative")
    from tagi_jax.data import example_index, tasks

    context = f"task {task!r}" + (f" ({source})" if source else "")
    try:
        indexed = tasks.indexed_source(task, seed)
    except errors.DataError:
        raise
    except (OSError, ValueError) as e:  # a missing split file, an unreadable TFRecord
        raise errors.DataError(f"{context}: {e}") from None
    conv = TagiFeatureConverter(with_teacher=with_teacher)
    lengths = dict(feature_lengths)
    if not with_teacher:
        lengths.pop("teacher_inputs", None)
    lengths = conv.task_feature_lengths(lengths)
    sequential = tasks.sequential_source(task) if indexed is None else None
    if sequential is not None:
        try:
            ds = sequential.examples(start_batch * batch_size)
            # whole global batches of raw records, then this process's rows of each
            picked = tf.constant(rows)
            ds = ds.batch(batch_size, drop_remainder=True)
            ds = ds.map(lambda batch: {k: tf.gather(v, picked) for k, v in batch.items()})
            ds = conv(sequential.preprocess(ds.unbatch(), lengths), task_feature_lengths=lengths)
            batches = ds.batch(len(rows), drop_remainder=True).prefetch(2).as_numpy_iterator()
        except _DATA_ERRORS as e:
            raise errors.from_pipeline(e, context) from None
        except (OSError, ValueError) as e:  # TFDS: a dataset not prepared there
            raise errors.DataError(f"{context}: {e}") from None
        return _pulled(batches, context)
    if indexed is None:
        _log.warning(
            "%s cannot be read by example index: every process reads the whole global batch "
            "and a resume replays the %d batches before it",
            context,
            start_batch,
        )
        return _replayed(
            task, feature_lengths, batch_size, seed, with_teacher, rows, start_batch, source
        )
    order = example_index.Order(indexed.sizes, seed, indexed.cap)
    if order.epoch_size == 0:
        raise errors.DataError(f"{context} has no training examples: its train split is empty")
    keys = [k for k in indexed.signature if with_teacher or k != "teacher_inputs"]

    @errors.recorded
    def generate():
        batch = start_batch
        while True:
            indices = example_index.batch_indices(batch, batch_size, rows)
            for member, row in zip(*order.lookup(indices), strict=True):
                example = indexed.example(int(member), int(row))
                yield {key: example[key] for key in keys}
            batch += 1

    try:
        ds = tf.data.Dataset.from_generator(
            generate, output_signature={key: indexed.signature[key] for key in keys}
        )
        ds = conv(indexed.preprocess(ds, lengths), task_feature_lengths=lengths)
        batches = ds.batch(len(rows), drop_remainder=True).prefetch(2).as_numpy_iterator()
    except _DATA_ERRORS as e:
        raise errors.from_pipeline(e, context) from None
    return _pulled(batches, context)


def _replayed(task, feature_lengths, batch_size, seed, with_teacher, rows, start_batch, source):
    """``rows`` of the sequential stream's global batches from ``start_batch`` on."""
    batches = training_batches(
        task, feature_lengths, batch_size, seed=seed, with_teacher=with_teacher, source=source
    )
    try:
        for _ in range(start_batch):
            next(batches)
        for batch in batches:
            yield {key: value[rows] for key, value in batch.items()}
    finally:
        batches.close()


def _pulled(batches: Iterator, context: str) -> Iterator[dict[str, np.ndarray]]:
    """``batches`` (endless) with the errors of pulling them made data errors."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            # The train split repeats forever: it ends only when it has no example at all.
            error = errors.DataError(
                f"{context} has no training examples: its train split is empty"
            )
        except _DATA_ERRORS as e:
            error = errors.from_pipeline(e, context)
        else:
            yield batch
            continue
        # Raised outside the except clause (no __context__) once the failed pipeline is gone:
        # TensorFlow's error holds the iterator in a reference cycle, and an iterator left to
        # be destroyed at interpreter exit waits there forever for its generator threads,
        # which can no longer take the GIL: the process would print the error and hang.
        del batches
        gc.collect()
        raise error from None


def numpy_batches(dataset: tf.data.Dataset, batch_size: int, *, drop_remainder: bool = True):
    """Batches of numpy arrays from a converted dataset (this host's share)."""
    return dataset.batch(batch_size, drop_remainder=drop_remainder).as_numpy_iterator()
