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

Next to each seqio Task, registration records how training reads it per host
(``feature_converter.host_batches``): ``indexed_source`` (natural-instructions tasks, P3 tasks
and mixtures, local C4 files: examples addressable by index, produced only when drawn) or
``sequential_source`` (TFDS C4: file order from any example on).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping

from tagi_jax.data import c4, errors, ni
from tagi_jax.data.tf_setup import import_tensorflow

# Before seqio: TensorFlow must never see the accelerators (JAX owns their memory).
tf = import_tensorflow()

import seqio  # noqa: E402

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


# --- the per-host training stream: tasks addressable by example index ----------------------


@dataclasses.dataclass(frozen=True)
class IndexedSource:
    """A registered task's (or mixture's) training examples, addressable as ``(member, row)``:
    what ``feature_converter.host_batches`` reads only its rows of, from any batch on.

    Attributes:
      sizes: rows of each member (a natural-instructions task, a P3 task, a C4 file).
      example: ``(member, row) -> {feature: value}`` the raw example (text, ids) of
        ``signature``, produced (read, formatted) only when called.
      signature: the raw example's features.
      preprocess: ``(dataset, sequence lengths) -> dataset``: the task's seqio preprocessors
        (tokenization, EOS) over raw examples.
      cap: at most this many rows of a member per epoch (P3 mixtures), else None.
    """

    sizes: tuple[int, ...]
    example: Callable[[int, int], dict]
    signature: dict[str, tf.TensorSpec]
    preprocess: Callable[[tf.data.Dataset, Mapping[str, int]], tf.data.Dataset]
    cap: int | None = None


# name -> (the registered provider, opener(seed) -> IndexedSource). The provider guards against
# a task of the same name registered elsewhere afterwards: that one is not ours to index.
_INDEXED: dict[str, tuple[object, Callable[[int], IndexedSource]]] = {}


def _add_indexed(name: str, provider, opener: Callable[[int], IndexedSource]) -> None:
    _INDEXED[name] = (provider, opener)


@dataclasses.dataclass(frozen=True)
class SequentialSource:
    """A registered task's training examples read in one fixed order (TFDS C4, which cannot
    be read by index without scanning every record): ``examples(start)`` the raw examples
    from global example ``start`` on, endless; ``preprocess`` as ``IndexedSource``'s."""

    examples: Callable[[int], tf.data.Dataset]
    preprocess: Callable[[tf.data.Dataset, Mapping[str, int]], tf.data.Dataset]


_SEQUENTIAL: dict[str, tuple[object, SequentialSource]] = {}


def _registered(name: str):
    if name in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(name)
    if name in seqio.MixtureRegistry.names():
        return seqio.MixtureRegistry.get(name)
    return None


def sequential_source(name: str) -> SequentialSource | None:
    """The training split of ``name`` read in a fixed order from any example (TFDS C4), or
    None (see ``indexed_source``)."""
    entry = _SEQUENTIAL.get(name)
    if entry is None or _registered(name) is not entry[0]:
        return None
    return entry[1]


def indexed_source(name: str, seed: int) -> IndexedSource | None:
    """The training split of task or mixture ``name`` addressable by index (building it reads
    the data's structure: task files, line ends; no example is formatted or tokenized), or
    None when ``name`` was not registered here with such a source (TFDS C4, a task registered
    elsewhere): then only the sequential seqio stream can read it."""
    entry = _INDEXED.get(name)
    if entry is None:
        return None
    provider, opener = entry
    if _registered(name) is not provider:
        return None
    return opener(seed)


def task_preprocess(task: seqio.Task):
    """``task``'s own seqio preprocessors over raw examples (``IndexedSource.preprocess``)."""

    def preprocess(dataset: tf.data.Dataset, lengths: Mapping[str, int]) -> tf.data.Dataset:
        dataset = task.preprocess_precache(dataset)
        dataset = task.preprocess_postcache(dataset, sequence_length=dict(lengths))
        # what Task.get_dataset's trim_output_features does
        return seqio.utils.trim_dataset(dataset, dict(lengths), task.output_features)

    return preprocess


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
    task = _replace_task(
        name,
        source=source,
        preprocessors=[
            seqio.preprocessors.tokenize,
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=_features(vocabulary),
    )
    _add_indexed(
        name,
        task,
        functools.partial(_ni_indexed, task, data_dir, config, vocabulary, name, num_pos_examples),
    )
    return task


_NI_TRAIN_FEATURES = (
    "inputs",
    "hyper_inputs",
    "teacher_inputs",
    "targets",
    "task_id",
    "category_id",
)


def _ni_indexed(
    task: seqio.Task,
    data_dir: str,
    config: ni.NIConfig,
    vocabulary,
    name: str,
    num_pos_examples: int | None,
    seed: int,
) -> IndexedSource:
    """The train split of a natural-instructions task: the examples ``_ni_dataset_fn`` gives
    (the same draws with the same seed), one member per task, formatted when read."""
    if num_pos_examples is not None:
        config = config.with_pos_examples(num_pos_examples, f"task {name!r}")
    examples = ni.IndexedExamples(data_dir, "train", config, seed=seed, vocabulary=vocabulary)

    def example(member: int, row: int) -> dict:
        # ni.IndexedExamples.example: formats this one instance (``ni.format_instance``)
        formatted = examples.example(member, row)
        return {key: formatted[key] for key in _NI_TRAIN_FEATURES}

    return IndexedSource(
        sizes=tuple(examples.sizes),
        example=example,
        signature={key: _NI_SIGNATURE[key] for key in _NI_TRAIN_FEATURES},
        preprocess=task_preprocess(task),
    )


# --- C4 ----------------------------------------------------------------------------------


def register_c4(
    name: str,
    vocabulary,
    *,
    files: list[str] | None = None,
    tfds_data_dir: str | None = None,
    tfds_name: str = "c4/en:3.1.0",
    seed: int = 0,
    max_length: int = 1024,
    min_segment_length: int = c4.DEFAULT_MIN_SEGMENT,
) -> seqio.Task:
    """C4 pretraining from local text/JSONL ``files`` or TFDS ``tfds_name`` (``c4/en``) in
    ``tfds_data_dir``."""
    if (files is None) == (tfds_data_dir is None):
        raise ValueError("register_c4 needs exactly one of files or tfds_data_dir")
    if files is not None:
        source = c4.local_source(files)
    else:
        source = c4.tfds_source(tfds_data_dir, tfds_name)
    split = functools.partial(
        c4.split_document, seed=seed, max_length=max_length, min_segment_length=min_segment_length
    )
    features = _features(vocabulary, ("hyper_inputs", "inputs", "targets"))
    task = _replace_task(
        name,
        source=source,
        preprocessors=[
            c4.tokenize_text,
            split,
            seqio.preprocessors.append_eos_after_trim,
            _add_zero_ids,
        ],
        output_features=features,
    )
    _INDEXED.pop(name, None)
    _SEQUENTIAL.pop(name, None)
    preprocess = functools.partial(_c4_preprocess, features, split)
    if files is not None:
        _add_indexed(name, task, functools.partial(_c4_indexed, list(files), preprocess))
    else:
        examples = functools.partial(c4.tfds_documents, tfds_data_dir, tfds_name)
        _SEQUENTIAL[name] = (task, SequentialSource(examples, preprocess))
    return task


def _c4_preprocess(features, split, dataset, lengths):
    """The C4 task's preprocessors but for short documents: split with shorter segments
    instead of dropped, so that every document is one example (``c4.split_document``'s
    ``drop_short``): which document is example ``i`` is then known without tokenizing."""
    dataset = c4.tokenize_text(dataset, features)
    dataset = split(dataset, drop_short=False)
    dataset = seqio.preprocessors.append_eos_after_trim(
        dataset, output_features=features, sequence_length=dict(lengths)
    )
    return seqio.utils.trim_dataset(_add_zero_ids(dataset), dict(lengths), features)


def _c4_indexed(files: list[str], preprocess, seed: int) -> IndexedSource:
    """Local C4 files, one member per file, a document read when drawn."""
    del seed  # the order's; the split points are keyed by the task's own seed
    documents = c4.IndexedDocuments(files)

    def example(member: int, row: int) -> dict:
        return {"text": documents.document(member, row)}

    return IndexedSource(
        sizes=tuple(documents.sizes),
        example=example,
        signature={"text": tf.TensorSpec([], tf.string)},
        preprocess=preprocess,
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


def is_registered(name: str) -> bool:
    """Whether SeqIO knows ``name`` as a task or a mixture."""
    return name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names()


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
