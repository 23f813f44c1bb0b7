"""The data's front door: a ``DataConfig`` in, checked data and numpy batches out.

* ``preflight``: the data checked before any model work (one ``DataError`` line).
* ``host_batches``: this process's rows of each global training batch, from any batch on, by
  example index (``feature_converter.host_batches``): what the trainer reads
  (``training.inputs.TrainInput`` places them on the mesh).
* ``train_batches``: the older sequential whole-batch stream (tools and tests).
* ``teacher_group_names``, ``group_examples``, ``group_batches``: the LoRA-teacher stage's
  groups (one per task or category) and their ``[K, rows, length]`` batches.

Tasks are registered on demand (``register_data``). TensorFlow and SeqIO are imported inside
the functions that need them, so importing this module (as the trainer does) imports neither.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import numpy as np

from tagi_jax import paths
from tagi_jax.data import ni as ni_lib
from tagi_jax.data import tokens
from tagi_jax.data.config import (
    C4_TASK,
    NI_DIRS,
    DataConfig,
    checked_vocabulary,
    make_vocabulary,
    ni_dir_field,
    source,
    source_field,
)
from tagi_jax.data.errors import DataError

# The batch features the model reads (``host_batches`` also gives task_id / category_id, and
# ``teacher_input_tokens`` with ``with_teacher``).
MODEL_FEATURES = (
    "encoder_input_tokens",
    "hyper_input_tokens",
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_loss_weights",
)


def check_paths(data: DataConfig) -> None:
    """Fails (``DataError``) when a configured data path (local or cloud: ``tagi_jax.paths``)
    does not exist; ``preflight`` does this first, then checks the data in them."""
    for field in ("sni_dir", "suite_dir", "p3_dir", "c4_tfds_dir"):
        path = getattr(data, field)
        if path is not None and not paths.isdir(path):
            raise DataError(f"DataConfig.{field}: data directory does not exist: {path}")
    for path in data.c4_files or ():
        if not paths.isfile(path):
            raise DataError(f"DataConfig.c4_files: no such file: {path}")


def preflight(data: DataConfig) -> None:
    """Checks the training data before any model work; raises ``DataError``, one line naming
    the file (or setting) and the problem.

    The paths exist (``check_paths``) and the task's data is there and usable: for
    natural-instructions tasks every task file of the train split is read and its schema
    checked (``ni.load_task``), and the first example of each task is formatted
    (``ni.first_examples``, the code training formats with) and tokenized; for P3 every member
    task has a non-empty train split whose first row is formatted and tokenized
    (``p3_tasks.preflight``); for C4 the first document of each file. Also an unknown task name,
    or one whose data directory is not set, and a vocabulary that does not load.

    Costs about what reading the task files costs (well under a second on the shared SNI subset
    and the built-in suite, once TensorFlow is imported), no tf.data pipeline.
    """
    check_paths(data)
    task = data.task
    field = ni_dir_field(task)
    if field is None and task.startswith(tuple(NI_DIRS)):
        raise DataError(
            f"DataConfig.task={task!r} is no natural-instructions task: use one of "
            + ", ".join(f"{p}{v}" for p in NI_DIRS for v in ni_lib.TASK_VARIANTS)
        )
    needs = source_field(data)  # the DataConfig field the task reads its data from
    if needs is not None and not getattr(data, needs):
        raise DataError(
            f"DataConfig.task={task!r} reads DataConfig.{needs}, which is not set"
            + (" (or c4_files)" if needs == "c4_tfds_dir" else "")
        )
    if needs is None:
        _check_registered(task)
        return  # a task registered elsewhere: its data is its own
    vocabulary = checked_vocabulary(data)
    if field is not None:
        from tagi_jax.data import tasks

        directory = getattr(data, field)
        for example in ni_lib.first_examples(
            directory, "train", data.ni_for_task(), vocabulary=vocabulary
        ):
            for key in tasks.TEXT_FEATURES:
                _tokenize(vocabulary, example[key], f"{directory}: task {example['task_name']}")
    elif needs == "p3_dir":
        from tagi_jax.data import p3_tasks

        p3_tasks.preflight(data.p3_dir, task, vocabulary)
    elif needs == "c4_files":
        from tagi_jax.data import c4

        for path in data.c4_files:
            try:
                first = next(iter(c4.read_documents([path])), None)
            except (ValueError, UnicodeDecodeError) as e:
                raise DataError(f"DataConfig.c4_files: {e}") from None
            if first is None:
                raise DataError(f"DataConfig.c4_files: {path} holds no document")
            _tokenize(vocabulary, first, path)


def _check_registered(task: str) -> None:
    """A task name ``register_data`` does not give must be registered already (by the run's
    own imports), or training would fail after the model is built."""
    from tagi_jax.data import tasks

    if not tasks.is_registered(task):
        raise DataError(
            f"DataConfig.task={task!r} names no task: use tagi_sni_<variant> (sni_dir), "
            f"tagi_suite_<variant> (suite_dir), variants {sorted(ni_lib.TASK_VARIANTS)}, "
            f"tagi_p3_t0_train or tagi_p3_<task directory> (p3_dir), {C4_TASK} (c4_files)"
        )


def _tokenize(vocabulary, text: str, where: str) -> None:
    try:
        vocabulary.encode(text)
    except Exception as e:  # noqa: BLE001 - any tokenizer failure is this file's problem
        raise DataError(f"{where}: cannot tokenize {text[:40]!r}: {e}") from None


def register_data(data: DataConfig, vocabulary) -> None:
    """Registers ``data``'s SeqIO tasks and mixtures (``tasks.register_tasks``: lazy,
    idempotent) with ``vocabulary``."""
    from tagi_jax.data import tasks

    check_paths(data)
    tasks.register_tasks(
        vocabulary=vocabulary,
        sni_dir=data.sni_dir,
        suite_dir=data.suite_dir,
        p3_dir=data.p3_dir,
        c4_files=list(data.c4_files) if data.c4_files else None,
        c4_tfds_dir=data.c4_tfds_dir,
        sni_config=data.ni,
    )


def host_batches(
    data: DataConfig,
    batch_size: int,
    seed: int,
    *,
    rows,
    start_batch: int = 0,
    with_teacher: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's ``rows`` (sorted global row indices) of each global batch of ``data``'s
    train split, from global batch ``start_batch`` on: endless numpy batches of ``len(rows)``
    examples, every feature (``MODEL_FEATURES``, ``task_id``, ``category_id``, and
    ``teacher_input_tokens`` with ``with_teacher``). Global batch ``b`` is examples
    ``[b * batch_size, (b + 1) * batch_size)`` of a stream that is a function of ``seed`` and
    the example index alone (``feature_converter.host_batches``). Close it when done."""
    from tagi_jax.data import feature_converter

    register_data(data, make_vocabulary(data))
    return feature_converter.host_batches(
        data.task,
        dict(data.feature_lengths),
        batch_size,
        seed=seed,
        with_teacher=with_teacher,
        rows=rows,
        start_batch=start_batch,
        source=source(data),
    )


def train_batches(
    data: DataConfig, batch_size: int, seed: int, skip: int, *, with_teacher: bool = False
) -> Iterator[dict[str, np.ndarray]]:
    """Endless global numpy batches of the training split in a seed-fixed order, after ``skip``
    (replayed: produced and dropped); the sequential seqio stream, whose order is not
    ``host_batches``'.

    ``with_teacher`` keeps the teacher's input stream (``teacher_input_tokens``) for the KL
    terms; without it that stream is not built at all.
    """
    from tagi_jax.data import feature_converter

    vocabulary = make_vocabulary(data)
    register_data(data, vocabulary)
    batches = feature_converter.training_batches(
        data.task,
        dict(data.feature_lengths),
        batch_size,
        seed=seed,
        with_teacher=with_teacher,
        source=source(data),
    )
    for _ in range(skip):
        next(batches)
    yield from batches


def teacher_group_names(data: DataConfig, group_by: str) -> list[str]:
    """Names indexed by the batch's ``task_id`` (``group_by="task"``) or ``category_id``
    (``"category"``): how a LoRA-teacher bank row is found for each example."""
    if group_by not in ("task", "category"):
        raise ValueError(f"group_by={group_by!r} is not task/category")
    ni_dir = data.sni_dir or data.suite_dir
    if data.task.startswith(("tagi_sni", "tagi_suite")) and ni_dir is not None:
        # data.ni's on_error decides which tasks exist, as for the batches' task ids
        tasks = ni_lib.load_split(ni_dir, "train", data.ni)
        return [name for name, _ in tasks] if group_by == "task" else ni_lib.categories(tasks)
    if "_p3_" in data.task and data.p3_dir is not None:
        from tagi_jax.data import p3_tasks

        return p3_tasks.group_names(data.p3_dir, group_by)
    raise ValueError(
        f"LoRA-teacher alignment needs natural-instructions or P3 data; task {data.task!r} "
        "has neither (set DataConfig.sni_dir/suite_dir/p3_dir)"
    )


def group_examples(data: DataConfig, group_by: str, vocabulary):
    """``{group name: (teacher input ids [n, L_in], target ids [n, L_out])}`` of the train split
    (natural instructions: the Tk-Instruct source; P3 with ``DataConfig.p3_dir``: the prompt),
    for the LoRA-teacher stage; sorted by name."""
    lengths = dict(data.feature_lengths)
    grouped = collections.defaultdict(lambda: ([], []))
    if "_p3_" in data.task and data.p3_dir is not None:
        # P3: one teacher per training dataset (or task), reading the prompt (tagi_spec.md §5.2)
        from tagi_jax.data import p3_tasks

        for key, pairs in p3_tasks.training_texts(data.p3_dir, group_by).items():
            for prompt, target in pairs:
                grouped[key][0].append(prompt)
                grouped[key][1].append(target)
    else:
        directory = data.sni_dir or data.suite_dir
        if directory is None:
            raise ValueError(
                "the lora_teachers stage needs DataConfig.sni_dir, suite_dir or (with a "
                "tagi_p3_* task) p3_dir"
            )
        examples = ni_lib.iter_examples(
            directory, "train", data.ni_for_task(), vocabulary=vocabulary
        )
        for example in examples:
            key = example["task_name"] if group_by == "task" else example["category"]
            grouped[key][0].append(example["teacher_inputs"])
            grouped[key][1].append(example["targets"])
    return {
        key: (
            tokens.encode_padded(vocabulary, sources, lengths["teacher_inputs"]),
            tokens.encode_padded(vocabulary, targets, lengths["targets"]),
        )
        for key, (sources, targets) in sorted(grouped.items())
    }


def group_batches(groups: dict, rows: int, seed: int):
    """Endless ``[K, rows, length]`` batches of ``group_examples``' groups, group k drawing
    from its own shuffled cycle."""
    rng = np.random.default_rng(seed)
    orders = {k: rng.permutation(len(v[0])) for k, v in groups.items()}
    cursor = dict.fromkeys(groups, 0)
    while True:
        enc, tgt = [], []
        for name, (sources, targets) in groups.items():
            picked = []
            while len(picked) < rows:
                if cursor[name] == len(orders[name]):
                    orders[name], cursor[name] = rng.permutation(len(sources)), 0
                picked.append(orders[name][cursor[name]])
                cursor[name] += 1
            enc.append(sources[picked])
            tgt.append(targets[picked])
        targets = np.stack(tgt)
        yield {
            "encoder_input_tokens": np.stack(enc),
            "decoder_target_tokens": targets,
            "decoder_input_tokens": tokens.shift_right(targets),
            "decoder_loss_weights": (targets > 0).astype(np.float32),
        }
