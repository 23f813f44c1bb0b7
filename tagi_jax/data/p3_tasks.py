"""SeqIO Tasks and Mixtures over pre-rendered P3 (the bigscience/P3 layout, or ours from
``p3.render_dataset``): one directory per (dataset, template) task holding
``<split>.jsonl`` or ``<split>.tfrecord``, and ``<task>_score_eval`` twins for rank
classification. The directory may be local or in cloud storage (``gs://``, through
``tagi_jax.paths``; ``example_index`` says how the per-host stream reads cloud files).

For P3 the prompted input is the instruction: ``hyper_inputs`` and ``teacher_inputs`` are the
input itself (tagi_spec.md §3.3). The category of a task is its dataset (the LoRA teachers are
per dataset). Which datasets form the T0 training mixture and the held-out evaluation comes
from ``tagi_jax/data/lists/`` (data files, not code).

Registration lists the task directories (their names decide mixture membership); files are
read only when a dataset is built, and mixture rates (examples per task, capped) are counted
then too.

Bad data is a ``DataError``, one line naming the file: a malformed JSONL line (and its number),
a row whose fields have the wrong type (``row N``: the N-th record), an empty or missing split.
``preflight`` checks what a training task reads (every member's split file exists, and its
first row is formatted and tokenized as training does) before any model work.
"""

from __future__ import annotations

import dataclasses
import functools
import json

from tagi_jax import paths
from tagi_jax.data import errors, p3, tasks
from tagi_jax.data.errors import DataError
from tagi_jax.data.tf_setup import import_tensorflow

# Before seqio: TensorFlow must never see the accelerators (JAX owns their memory).
tf = import_tensorflow()

import seqio  # noqa: E402

SCORE_EVAL = p3.SCORE_EVAL_SUFFIX
SPLITS = ("train", "validation", "test")

_SIGNATURE = {
    "inputs": tf.TensorSpec([], tf.string),
    "hyper_inputs": tf.TensorSpec([], tf.string),
    "teacher_inputs": tf.TensorSpec([], tf.string),
    "targets": tf.TensorSpec([], tf.string),
    "task_id": tf.TensorSpec([], tf.int32),
    "category_id": tf.TensorSpec([], tf.int32),
    "is_correct": tf.TensorSpec([], tf.bool),
    "weight": tf.TensorSpec([], tf.float32),
    "idx": tf.TensorSpec([2], tf.int32),
}


@dataclasses.dataclass(frozen=True)
class P3Registered:
    tasks: tuple[str, ...]
    mixtures: tuple[str, ...]


def _split_file(task_dir: str, split: str) -> str:
    for ext in ("jsonl", "tfrecord"):
        path = paths.join(task_dir, f"{split}.{ext}")
        if paths.isfile(path):
            return path
    raise FileNotFoundError(f"{task_dir} has no {split}.jsonl or {split}.tfrecord")


def _rows(path: str):
    """The rows of a split file; a malformed line or record is a ``DataError`` naming the file
    and line (``p3``'s readers say where; their ValueError becomes the one data error type)."""
    rows = p3.read_jsonl(path) if path.endswith(".jsonl") else p3.read_tfrecord(path)
    try:
        yield from rows
    except DataError:
        raise
    except ValueError as e:
        raise DataError(e) from None


def _example(row: dict, where: str, task_id: int, category_id: int) -> dict:
    """A row as the task's features: the prompt is the input, the instruction and the
    teacher's input alike (tagi_spec.md §3.3)."""
    p3.check_row(row, where)
    text = row["inputs_pretokenized"]
    return {
        "inputs": text,
        "hyper_inputs": text,
        "teacher_inputs": text,
        "targets": row["targets_pretokenized"],
        "task_id": task_id,
        "category_id": category_id,
        "is_correct": row.get("is_correct", True),
        "weight": float(row.get("weight", 1.0)),
        "idx": list(row.get("idx", [0, 0]))[:2],
    }


def _dataset_fn(task_dir: str, task_id: int, category_id: int, split, shuffle_files, seed=None):
    del shuffle_files, seed
    path = _split_file(task_dir, split)

    # recorded: tf.data wraps what the generator raises in a TensorFlow error; the batch
    # boundary (feature_converter) gives the original one-line message back
    @errors.recorded
    def generate():
        for n, row in enumerate(_rows(path), start=1):
            yield _example(row, f"{path}: row {n}", task_id, category_id)

    return tf.data.Dataset.from_generator(generate, output_signature=_SIGNATURE)


class IndexedRows:
    """The examples of a task's split file, addressable by row without reading the others:
    building it scans the file's line ends or record headers (``example_index``; no row is
    parsed), ``example(row)`` reads and parses that row alone. Errors name the file and the
    line (JSONL) or row as the sequential readers do."""

    def __init__(self, task_dir: str, split: str, task_id: int, category_id: int):
        from tagi_jax.data import example_index

        self.path = _split_file(task_dir, split)
        self.task_id, self.category_id = task_id, category_id
        try:
            if self.path.endswith(".jsonl"):
                self._index = example_index.LineIndex(self.path)
            else:
                self._index = example_index.TFRecordIndex(self.path)
        except ValueError as e:
            raise DataError(e) from None

    def __len__(self) -> int:
        return len(self._index)

    def example(self, row: int) -> dict:
        """Row ``row`` (0-based) as the task's features (``_example``)."""
        return _example(
            self._row(row), f"{self.path}: row {row + 1}", self.task_id, self.category_id
        )

    def _row(self, row: int) -> dict:
        if not self.path.endswith(".jsonl"):
            import tensorflow as tf

            try:
                record = tf.train.Example.FromString(self._index.read(row))
            except Exception as e:  # noqa: BLE001 - a corrupt record: protobuf's DecodeError
                raise DataError(f"{self.path}: record {row}: unreadable TFRecord: {e}") from None
            try:
                return p3._decode_example(self.path, row, record)
            except ValueError as e:
                raise DataError(e) from None
        raw, offset = self._index.read(row)
        try:
            value = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            number = self._index.line_number(offset)
            raise DataError(f"{self.path}: line {number} is not valid UTF-8") from None
        except json.JSONDecodeError as e:
            number = self._index.line_number(offset)
            raise DataError(f"{self.path}: line {number} is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            number = self._index.line_number(offset)
            raise DataError(f"{self.path}: line {number} is not a JSON object")
        return value


def _dataset_keys() -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """P3 dataset prefix per training dataset, and (prefix, suffix) per evaluation dataset."""
    train = {name: name.replace("/", "_") for name in p3.read_list("t0_train_datasets")}
    evaluation = {
        name: (entry["p3_dataset"], entry["p3_suffix"]) for name, entry in p3.read_raw_map().items()
    }
    return train, evaluation


def _belongs(task: str, prefix: str, suffix: str = "") -> bool:
    base = task[: -len(SCORE_EVAL)] if task.endswith(SCORE_EVAL) else task
    return base.startswith(prefix + "_") and base.endswith(suffix)


def _count_rows(task_dir: str, split: str) -> int:
    return sum(1 for _ in _rows(_split_file(task_dir, split)))


def _task_names_and_categories(p3_dir: str):
    """The task directories (``task_id`` = index), the dataset names (``category_id`` = index;
    one past the end for a task of no listed dataset) and the task -> category-id function."""
    if not paths.isdir(p3_dir):
        raise FileNotFoundError(f"P3 directory does not exist: {p3_dir}")
    names = p3.task_dirs(p3_dir)
    if not names:
        raise FileNotFoundError(f"{p3_dir} holds no P3 task directories")
    train_keys, eval_keys = _dataset_keys()
    datasets = sorted({*train_keys.values(), *(p for p, _ in eval_keys.values())})

    def category(task: str) -> int:
        matches = [i for i, d in enumerate(datasets) if _belongs(task, d)]
        # the longest dataset prefix wins (super_glue_wsc.fixed vs a shorter super_glue_*)
        return max(matches, key=lambda i: len(datasets[i])) if matches else len(datasets)

    return names, datasets, category


def _mixture_members(names: list[str]) -> tuple[list[str], list[str]]:
    """The task directories of the T0 training mixture and of the held-out score-eval one."""
    train_keys, eval_keys = _dataset_keys()
    train, evaluation = [], []
    for name in names:
        if name.endswith(SCORE_EVAL):
            if any(_belongs(name, p, s) for p, s in eval_keys.values()):
                evaluation.append(name)
        elif any(_belongs(name, d) for d in train_keys.values()):
            train.append(name)
    return train, evaluation


def group_names(p3_dir: str, group_by: str) -> list[str]:
    """Names indexed by ``task_id`` (``task``) or ``category_id`` (``category``: the dataset,
    which is what P3 LoRA teachers are trained per)."""
    names, datasets, _ = _task_names_and_categories(p3_dir)
    return names if group_by == "task" else [*datasets, "uncategorized"]


def training_texts(p3_dir: str, group_by: str, split: str = "train") -> dict[str, list]:
    """``{group: [(prompt, target), ...]}`` of the T0 training tasks in ``p3_dir``, grouped
    as ``group_names`` names them (``task``: the task directory; ``category``: its dataset):
    what the ``lora_teachers`` stage trains one P3 teacher per group on (the teacher reads the
    prompt, as ``teacher_inputs`` is the prompt for P3)."""
    if group_by not in ("task", "category"):
        raise ValueError(f"group_by={group_by!r} is not task/category")
    names, datasets, category = _task_names_and_categories(p3_dir)
    train_keys, _ = _dataset_keys()
    grouped: dict[str, list] = {}
    for name in names:
        if name.endswith(SCORE_EVAL) or not any(_belongs(name, d) for d in train_keys.values()):
            continue
        key = name if group_by == "task" else datasets[category(name)]
        path = _split_file(paths.join(p3_dir, name), split)
        pairs = grouped.setdefault(key, [])
        for n, row in enumerate(_rows(path), start=1):
            p3.check_row(row, f"{path}: row {n}")
            pairs.append((row["inputs_pretokenized"], row["targets_pretokenized"]))
    if not grouped:
        raise FileNotFoundError(
            f"{p3_dir} holds no task of a T0 training dataset (tagi_jax/data/lists/"
            "t0_train_datasets.txt): nothing to train P3 LoRA teachers on"
        )
    return grouped


def register_p3(
    p3_dir: str,
    vocabulary,
    *,
    prefix: str = "tagi",
    max_examples_per_task: int = 500_000,
) -> P3Registered:
    """One Task per task directory in ``p3_dir``, plus the T0 training and held-out
    score-eval mixtures (rates: examples per task, capped at ``max_examples_per_task``)."""
    names, _, category = _task_names_and_categories(p3_dir)
    train_names, eval_names = _mixture_members(names)

    features = {
        name: seqio.Feature(vocabulary, add_eos=True, required=False)
        for name in ("inputs", "hyper_inputs", "teacher_inputs", "targets")
    }
    registered, train_members, eval_members = [], [], []
    member_info = {}
    for task_id, name in enumerate(names):
        task_dir = paths.join(p3_dir, name)
        full = f"{prefix}_p3_{name}"
        seqio.TaskRegistry.remove(full)
        task = seqio.TaskRegistry.add(
            full,
            source=seqio.FunctionDataSource(
                functools.partial(_dataset_fn, task_dir, task_id, category(name)),
                splits=SPLITS,
            ),
            preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
            output_features=features,
        )
        member = (task_dir, task_id, category(name))
        tasks._add_indexed(full, task, functools.partial(_indexed, task, [member], None))
        registered.append(full)
        member_info[full] = member
        rate = functools.partial(_capped_rate, task_dir, max_examples_per_task)
        if name in eval_names:
            eval_members.append((full, rate))
        elif name in train_names:
            train_members.append((full, rate))

    mixtures = []
    for label, members in (("t0_train", train_members), ("t0_eval_score", eval_members)):
        if not members:
            continue
        mixture = f"{prefix}_p3_{label}"
        seqio.MixtureRegistry.remove(mixture)
        added = seqio.MixtureRegistry.add(
            mixture, [(task, _LazyRate(rate)) for task, rate in members]
        )
        # the same preprocessors and features for every member: the first one's serve them all
        first = seqio.get_mixture_or_task(members[0][0])
        indexed = [member_info[task] for task, _ in members]
        opener = functools.partial(_indexed, first, indexed, max_examples_per_task)
        tasks._add_indexed(mixture, added, opener)
        mixtures.append(mixture)
    return P3Registered(tuple(registered), tuple(mixtures))


_TRAIN_FEATURES = ("inputs", "hyper_inputs", "teacher_inputs", "targets", "task_id", "category_id")


def _indexed(task: seqio.Task, members: list, cap: int | None, seed: int):
    """The train splits of ``members`` (``(task_dir, task_id, category_id)``), one member per
    task, capped at ``cap`` rows per epoch as the mixture's rates are
    (``tasks.IndexedSource``); a row is read and parsed when drawn."""
    del seed  # the order's, not the rows'
    files = [IndexedRows(task_dir, "train", task_id, cat) for task_dir, task_id, cat in members]

    def example(member: int, row: int) -> dict:
        features = files[member].example(row)
        return {key: features[key] for key in _TRAIN_FEATURES}

    return tasks.IndexedSource(
        sizes=tuple(len(f) for f in files),
        example=example,
        signature={key: _SIGNATURE[key] for key in _TRAIN_FEATURES},
        preprocess=tasks.task_preprocess(task),
        cap=cap,
    )


def _capped_rate(task_dir: str, maximum: int, split: str = "train") -> float:
    try:
        count = _count_rows(task_dir, split)
    except FileNotFoundError:
        count = _count_rows(task_dir, "validation")
    return float(min(count, maximum))


class _LazyRate:
    """A mixture rate computed when the mixture is first sampled (files are read then)."""

    def __init__(self, fn):
        self._fn = fn
        self._value: float | None = None

    def __call__(self, task=None) -> float:
        del task
        if self._value is None:
            self._value = self._fn()
        return self._value


def preflight(
    p3_dir: str, task: str, vocabulary, *, prefix: str = "tagi", split: str = "train"
) -> list[str]:
    """Checks, before any model work, the P3 data that training on ``task`` (a name
    ``register_p3`` gives) reads from ``split``: the directory and every member task's split
    file exist, no member's split is empty, and each member's first row has its fields and is
    formatted and tokenized (``vocabulary.encode``) as training does. Reads one row per task,
    however large the files; a malformed line further on is reported, as a ``DataError`` naming
    the file and line, when training reaches it. Returns the split files checked."""
    if not paths.isdir(p3_dir):
        raise DataError(f"DataConfig.p3_dir: P3 directory does not exist: {p3_dir}")
    try:
        names, _, category = _task_names_and_categories(p3_dir)
    except FileNotFoundError as e:
        raise DataError(f"DataConfig.p3_dir: {e}") from None
    train_names, eval_names = _mixture_members(names)
    mixtures = {f"{prefix}_p3_t0_train": train_names, f"{prefix}_p3_t0_eval_score": eval_names}
    if task in mixtures:
        members = mixtures[task]
        if not members:
            raise DataError(
                f"DataConfig.task={task!r}: {p3_dir} holds no task of its datasets "
                "(tagi_jax/data/lists/): render them first (python -m "
                "tagi_jax.evaluation.p3_pipeline)"
            )
    elif task.startswith(f"{prefix}_p3_") and task[len(f"{prefix}_p3_") :] in names:
        members = [task[len(f"{prefix}_p3_") :]]
    else:
        raise DataError(
            f"DataConfig.task={task!r} is no P3 task of {p3_dir}: use {prefix}_p3_t0_train, "
            f"{prefix}_p3_t0_eval_score or {prefix}_p3_<one of its {len(names)} task "
            f"directories, e.g. {names[0]}>"
        )
    checked = []
    for name in members:
        task_dir = paths.join(p3_dir, name)
        try:
            path = _split_file(task_dir, split)
        except FileNotFoundError as e:
            raise DataError(f"P3 task {name!r} (training reads its {split} split): {e}") from None
        first = next(iter(_rows(path)), None)
        if first is None:
            raise DataError(
                f"{path} is empty: P3 task {name!r} has no {split} examples (render it again "
                "or remove its directory)"
            )
        example = _example(first, f"{path}: row 1", names.index(name), category(name))
        for key in ("inputs", "targets"):
            vocabulary.encode(example[key])
        checked.append(path)
    return checked
