"""SeqIO Tasks and Mixtures for SNI, the built-in suite, P3 and C4.

``register_tasks(...)`` is explicit (nothing registers at import) and idempotent (calling it
again replaces the tasks, e.g. with other directories). Data directories are read only when a
dataset is built, never at registration; SentencePiece vocabularies load lazily too.

Names (``prefix`` defaults to ``tagi``):

* ``{prefix}_sni_def`` / ``{prefix}_sni_def_pos2`` — SNI, Definition only / + 2 positive
  examples (splits ``train``, ``test``), everything else as the one ``NIConfig`` says.
* ``{prefix}_suite_def`` / ``{prefix}_suite_def_pos2`` — the built-in instruction suite (same
  format as SNI).
* ``{prefix}_c4_pretrain`` — C4 (a, b, c) segments for hypernetwork pretraining.
* ``{prefix}_p3_<task>`` and the mixtures ``{prefix}_p3_t0_train`` (capped rates) and
  ``{prefix}_p3_t0_eval_score`` — see ``register_p3``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import seqio
import tensorflow as tf

from tagi_jax.data import c4, errors, ni

TEXT_FEATURES = ("inputs", "hyper_inputs", "teacher_inputs", "targets")


class _DropUncachedWarning(logging.Filter):
    """seqio warns on every training dataset built from a FunctionDataSource that restarts may
    shuffle poorly. Ours shuffle each task's instances with the run's seed and the trainer
    checkpoints the data position, so a restart continues the same order: the warning is noise
    in every run's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "uncached FunctionDataset" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropUncachedWarning())


def _features(vocabulary, names=TEXT_FEATURES) -> dict[str, seqio.Feature]:
    return {name: seqio.Feature(vocabulary, add_eos=True, required=False) for name in names}


def _replace_task(name: str, *args, **kwargs) -> seqio.Task:
    seqio.TaskRegistry.remove(name)  # a no-op when absent: registration is idempotent
    return seqio.TaskRegistry.add(name, *args, **kwargs)


def _replace_mixture(name: str, *args, **kwargs) -> seqio.Mixture:
    seqio.MixtureRegistry.remove(name)
    return seqio.MixtureRegistry.add(name, *args, **kwargs)


# --- natural-instructions format (SNI and the built-in suite) -----------------------------

_NI_SIGNATURE = {
    "inputs": tf.TensorSpec([], tf.string),
    "hyper_inputs": tf.TensorSpec([], tf.string),
    "teacher_inputs": tf.TensorSpec([], tf.string),
    "targets": tf.TensorSpec([], tf.string),
    "references": tf.TensorSpec([None], tf.string),
    "task_name": tf.TensorSpec([], tf.string),
    "task_id": tf.TensorSpec([], tf.int32),
    "category_id": tf.TensorSpec([], tf.int32),
}


def _ni_dataset_fn(
    data_dir: str,
    config: ni.NIConfig,
    vocabulary,
    task: str,
    num_pos_examples: int | None,
    split: str,
    shuffle_files,
    seed=None,
):
    del shuffle_files  # the examples are shuffled per task with the seed instead
    if num_pos_examples is not None:
        # Raised when this task's data is built, not at registration: both variants are
        # registered from one NIConfig, and only the task a run reads may contradict it.
        config = config.with_pos_examples(num_pos_examples, f"task {task!r}")

    # recorded: tf.data wraps what the generator raises (a bad task file) in a TensorFlow
    # error; the batch boundary (feature_converter) gives the original one-line message back
    @errors.recorded
    def generate():
        for example in ni.iter_examples(
            data_dir, split, config, seed=seed or 0, vocabulary=vocabulary
        ):
            yield {key: example[key] for key in _NI_SIGNATURE}

    return tf.data.Dataset.from_generator(generate, output_signature=_NI_SIGNATURE)


def register_ni(
    name: str,
    data_dir: str,
    vocabulary,
    config: ni.NIConfig,
    num_pos_examples: int | None = None,
) -> seqio.Task:
    """One natural-instructions-format Task with ``train`` and ``test`` splits.

    ``num_pos_examples``: the demonstrations this task formats (a task variant's); a ``config``
    that says another number fails when the task's data is built. With
    ``config.max_source_length`` set, Tk-Instruct's budget counts and cuts the source in
    ``vocabulary``'s tokens (EOS included); give the source streams feature lengths of at least
    that budget, or the trim cuts the ``Input: ... Output:`` tail the budget kept.
    """
    source = seqio.FunctionDataSource(
        functools.partial(_ni_dataset_fn, data_dir, config, vocabulary, name, num_pos_examples),
        splits=["train", "test"],
    )
    return _replace_task(
        name,
        source=source,
        preprocessors=[
            seqio.preprocessors.tokenize,
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=_features(vocabulary),
    )


# --- C4 ----------------------------------------------------------------------------------


def register_c4(
    name: str,
    vocabulary,
    *,
    files: list[str] | None = None,
    tfds_data_dir: str | None = None,
    seed: int = 0,
    max_length: int = 1024,
    min_segment_length: int = c4.DEFAULT_MIN_SEGMENT,
) -> seqio.Task:
    """C4 pretraining from local text/JSONL ``files`` or TFDS ``c4/en`` in ``tfds_data_dir``."""
    if (files is None) == (tfds_data_dir is None):
        raise ValueError("register_c4 needs exactly one of files or tfds_data_dir")
    source = c4.local_source(files) if files is not None else c4.tfds_source(tfds_data_dir)
    return _replace_task(
        name,
        source=source,
        preprocessors=[
            c4.tokenize_text,
            functools.partial(
                c4.split_document,
                seed=seed,
                max_length=max_length,
                min_segment_length=min_segment_length,
            ),
            seqio.preprocessors.append_eos_after_trim,
            _add_zero_ids,
        ],
        output_features=_features(vocabulary, ("hyper_inputs", "inputs", "targets")),
    )


def _add_zero_ids(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """C4 has no tasks: ids 0, so its batches have the features every other task's have."""

    def add(features):
        zero = tf.constant(0, tf.int32)
        return {**features, "task_id": zero, "category_id": zero}

    return dataset.map(add, num_parallel_calls=tf.data.AUTOTUNE)


# --- everything --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Registered:
    tasks: tuple[str, ...]
    mixtures: tuple[str, ...] = ()


def register_tasks(
    *,
    vocabulary,
    sni_dir: str | None = None,
    suite_dir: str | None = None,
    p3_dir: str | None = None,
    c4_files: list[str] | None = None,
    c4_tfds_dir: str | None = None,
    sni_config: ni.NIConfig | None = None,
    seed: int = 0,
    max_examples_per_task: int = 500_000,
    prefix: str = "tagi",
) -> Registered:
    """Registers the tasks whose data directories are given; returns their names.

    ``sni_config`` is the one ``NIConfig`` of every natural-instructions task (SNI and the
    suite); each variant (``ni.TASK_VARIANTS``) sets only the demonstrations.
    """
    sni_config = sni_config or ni.NIConfig()
    tasks: list[str] = []
    mixtures: list[str] = []
    for data_dir, label in ((sni_dir, "sni"), (suite_dir, "suite")):
        if data_dir is None:
            continue
        for variant, num_pos_examples in ni.TASK_VARIANTS.items():
            name = f"{prefix}_{label}_{variant}"
            register_ni(name, data_dir, vocabulary, sni_config, num_pos_examples)
            tasks.append(name)
    if c4_files is not None or c4_tfds_dir is not None:
        name = f"{prefix}_c4_pretrain"
        register_c4(name, vocabulary, files=c4_files, tfds_data_dir=c4_tfds_dir, seed=seed)
        tasks.append(name)
    if p3_dir is not None:
        from tagi_jax.data import p3_tasks

        p3 = p3_tasks.register_p3(
            p3_dir, vocabulary, prefix=prefix, max_examples_per_task=max_examples_per_task
        )
        tasks.extend(p3.tasks)
        mixtures.extend(p3.mixtures)
    return Registered(tuple(tasks), tuple(mixtures))
