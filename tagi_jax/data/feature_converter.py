"""TAGI's task features → model features, and numpy batches → global jax arrays.

``TagiFeatureConverter`` (a ``seqio.FeatureConverter``, no packing: adapters are per example,
so examples cannot share a row) maps::

  inputs          -> encoder_input_tokens
  hyper_inputs    -> hyper_input_tokens
  teacher_inputs  -> teacher_input_tokens      (only when the task has them)
  targets         -> decoder_target_tokens, decoder_input_tokens (shifted), decoder_loss_weights
  task_id, category_id (scalars) -> passed through

Every sequence is trimmed/padded to its length: static shapes. ``training_batches`` gives a
task's endless numpy batches (bad data met on the way is one ``DataError`` line);
``tagi_jax.training.inputs`` places them on the mesh.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Mapping

import numpy as np
import seqio
import tensorflow as tf

from tagi_jax.data import errors

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
