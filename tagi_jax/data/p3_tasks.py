"""SeqIO Tasks and Mixtures over pre-rendered P3 (the bigscience/P3 layout, or ours from
``p3.render_dataset``): one directory per (dataset, template) task holding
``<split>.jsonl`` or ``<split>.tfrecord``, and ``<task>_score_eval`` twins for rank
classification.

For P3 the prompted input is the instruction: ``hyper_inputs`` and ``teacher_inputs`` are the
input itself (tagi_spec.md §3.3). The category of a task is its dataset (the LoRA teachers are
per dataset). Which datasets form the T0 training mixture and the held-out evaluation comes
from ``tagi_jax/data/lists/`` (data files, not code).

Registration lists the task directories (their names decide mixture membership); files are
read only when a dataset is built, and mixture rates (examples per task, capped) are counted
then too.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import seqio
import tensorflow as tf

from tagi_jax.data import p3

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
        path = os.path.join(task_dir, f"{split}.{ext}")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{task_dir} has no {split}.jsonl or {split}.tfrecord")


def _rows(path: str):
    return p3.read_jsonl(path) if path.endswith(".jsonl") else p3.read_tfrecord(path)


def _dataset_fn(task_dir: str, task_id: int, category_id: int, split, shuffle_files, seed=None):
    del shuffle_files, seed
    path = _split_file(task_dir, split)

    def generate():
        for row in _rows(path):
            text = row["inputs_pretokenized"]
            yield {
                "inputs": text,
                "hyper_inputs": text,
                "teacher_inputs": text,
                "targets": row["targets_pretokenized"],
                "task_id": task_id,
                "category_id": category_id,
                "is_correct": bool(row.get("is_correct", True)),
                "weight": float(row.get("weight", 1.0)),
                "idx": list(row.get("idx", [0, 0]))[:2],
            }

    return tf.data.Dataset.from_generator(generate, output_signature=_SIGNATURE)


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
    if not os.path.isdir(p3_dir):
        raise FileNotFoundError(f"P3 directory does not exist: {p3_dir}")
    names = sorted(d for d in os.listdir(p3_dir) if os.path.isdir(os.path.join(p3_dir, d)))
    if not names:
        raise FileNotFoundError(f"{p3_dir} holds no P3 task directories")
    train_keys, eval_keys = _dataset_keys()
    datasets = sorted({*train_keys.values(), *(p for p, _ in eval_keys.values())})

    def category(task: str) -> int:
        matches = [i for i, d in enumerate(datasets) if _belongs(task, d)]
        # the longest dataset prefix wins (super_glue_wsc.fixed vs a shorter super_glue_*)
        return max(matches, key=lambda i: len(datasets[i])) if matches else len(datasets)

    return names, datasets, category


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
        rows = _rows(_split_file(os.path.join(p3_dir, name), split))
        grouped.setdefault(key, []).extend(
            (row["inputs_pretokenized"], row["targets_pretokenized"]) for row in rows
        )
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
    train_keys, eval_keys = _dataset_keys()

    features = {
        name: seqio.Feature(vocabulary, add_eos=True, required=False)
        for name in ("inputs", "hyper_inputs", "teacher_inputs", "targets")
    }
    registered, train_members, eval_members = [], [], []
    for task_id, name in enumerate(names):
        task_dir = os.path.join(p3_dir, name)
        full = f"{prefix}_p3_{name}"
        seqio.TaskRegistry.remove(full)
        seqio.TaskRegistry.add(
            full,
            source=seqio.FunctionDataSource(
                functools.partial(_dataset_fn, task_dir, task_id, category(name)),
                splits=SPLITS,
            ),
            preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
            output_features=features,
        )
        registered.append(full)
        rate = functools.partial(_capped_rate, task_dir, max_examples_per_task)
        if name.endswith(SCORE_EVAL):
            if any(_belongs(name, p, s) for p, s in eval_keys.values()):
                eval_members.append((full, rate))
        elif any(_belongs(name, d) for d in train_keys.values()):
            train_members.append((full, rate))

    mixtures = []
    for label, members in (("t0_train", train_members), ("t0_eval_score", eval_members)):
        if not members:
            continue
        mixture = f"{prefix}_p3_{label}"
        seqio.MixtureRegistry.remove(mixture)
        seqio.MixtureRegistry.add(mixture, [(task, _LazyRate(rate)) for task, rate in members])
        mixtures.append(mixture)
    return P3Registered(tuple(registered), tuple(mixtures))


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
