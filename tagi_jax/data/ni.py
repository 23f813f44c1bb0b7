"""Super-Natural Instructions: the natural-instructions layout, read from a local directory.

Layout: ``<dir>/tasks/<task>.json`` and ``<dir>/splits/<split_name>/{train,test}_tasks.txt``
(the flat ``<dir>/splits/{train,test}_tasks.txt`` of a sample is accepted too).

``format_instance`` builds the three TAGI text streams exactly as Tk-Instruct / the authors'
collator does (tagi_spec.md §2.4): the teacher's source (definition, demonstrations, the
"Now complete the following example -" block), the hypernetwork's instruction (definition +
demonstrations, no input) and the student's input. ``iter_examples`` walks a split: test tasks
give their first 100 instances with every reference; training tasks give a seeded shuffle,
capped per task, with one reference drawn as the target.

Bad input (malformed JSON, a file that is not UTF-8, a listed task missing on disk, no
Definition or Instances, an instance without outputs) raises ``NIDataError`` naming the file and
instance, or with ``on_error="skip"`` is counted and reported in one warning at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import string
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

STUDENT_INPUTS = ("definition_and_input", "input_only", "teacher_source")
EVAL_INSTANCES_PER_TASK = 100  # the official (label-balanced) evaluation instances


class NIDataError(ValueError):
    """A task file or split list that cannot be used; the message names it."""


def _punctuate(text: str) -> str:
    # Tk-Instruct appends "." when the text so far does not end in punctuation.
    return text if text and text[-1] in string.punctuation else text + "."


def _demonstration(kind: str, index: int, example: dict, add_explanation: bool) -> str:
    text = _punctuate(f" {kind} Example {index} -\nInput: {example['input'].strip()}") + "\n"
    text = _punctuate(text + f" Output: {example['output'].strip()}") + "\n"
    if add_explanation and "explanation" in example:
        text = _punctuate(text + f" Explanation: {example['explanation'].strip()}") + "\n"
    return text + "\n"


def format_instance(
    task: dict,
    instance: dict,
    *,
    task_name: str = "",
    num_pos_examples: int = 2,
    num_neg_examples: int = 0,
    add_definition: bool = True,
    add_explanation: bool = False,
    max_source_length: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
    student_input: str = "definition_and_input",
) -> dict[str, Any]:
    """The TAGI streams of one instance.

    Args:
      task: a parsed task file; instance: one entry of its ``Instances``.
      task_name: prefixed as ``"<name>. "`` when non-empty (Tk-Instruct's add_task_name).
      num_pos_examples, num_neg_examples: demonstrations requested.
      max_source_length, count_tokens: a demonstration is kept only while the token count of
        ``definition + " ".join(kept) + demonstration + task_input`` stays within
        ``max_source_length`` (Tk-Instruct's rule, " ".join included); ``count_tokens`` should
        count like the model's tokenizer, EOS included. None keeps every demonstration.
      student_input: ``definition_and_input`` (with fusion), ``input_only``, or
        ``teacher_source`` (the authors' last runs without fusion).

    Returns:
      ``teacher_inputs``, ``hyper_inputs``, ``inputs``, ``references`` (all outputs).
    """
    if student_input not in STUDENT_INPUTS:
        raise ValueError(f"student_input={student_input!r} is not one of {STUDENT_INPUTS}")
    if (max_source_length is None) != (count_tokens is None):
        raise ValueError("max_source_length and count_tokens go together")
    task_input = _punctuate(
        f"Now complete the following example -\nInput: {instance['input'].strip()}"
    )
    task_input += "\nOutput: "
    prefix = f"{task_name}. " if task_name else ""
    definition = ""
    if add_definition:
        text = task["Definition"]
        text = text[0] if isinstance(text, list) else text
        definition = _punctuate("Definition: " + text.strip()) + "\n\n"

    def fits(candidate: str) -> bool:
        return max_source_length is None or count_tokens(candidate) <= max_source_length

    positives: list[str] = []
    for i, example in enumerate(task.get("Positive Examples", [])[:num_pos_examples]):
        demo = _demonstration("Positive", i + 1, example, add_explanation)
        if not fits(definition + " ".join(positives) + demo + task_input):
            break
        positives.append(demo)
    negatives: list[str] = []
    for i, example in enumerate(task.get("Negative Examples", [])[:num_neg_examples]):
        demo = _demonstration("Negative", i + 1, example, add_explanation)
        if not fits(definition + " ".join(positives) + " ".join(negatives) + demo + task_input):
            break
        negatives.append(demo)
    instruction = prefix + definition + "".join(positives) + "".join(negatives)
    teacher = instruction + task_input
    student = {
        "definition_and_input": prefix + definition + task_input,
        "input_only": task_input,
        "teacher_source": teacher,
    }[student_input]
    return {
        "teacher_inputs": teacher,
        "hyper_inputs": instruction,
        "inputs": student,
        "references": list(instance["output"]),
    }


# --- reading -----------------------------------------------------------------------------


def read_split(data_dir: str, split: str, split_name: str = "default") -> list[str]:
    """Task names of ``split`` (``train``/``test``), from ``splits/<split_name>/`` or the flat
    ``splits/`` of a sample directory."""
    candidates = [
        os.path.join(data_dir, "splits", split_name, f"{split}_tasks.txt"),
        os.path.join(data_dir, "splits", f"{split}_tasks.txt"),
    ]
    for path in candidates:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                names = [line.strip() for line in f if line.strip()]
            if not names:
                raise NIDataError(f"{path} lists no tasks")
            return names
    raise NIDataError(f"no split file for {split!r}: looked for {' and '.join(candidates)}")


def load_task(path: str) -> dict:
    """A parsed, validated task file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError as e:
        raise NIDataError(f"task file missing: {path}") from e
    try:
        task = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise NIDataError(f"{path} is not UTF-8: {e}") from e
    except json.JSONDecodeError as e:
        raise NIDataError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(task, dict):
        raise NIDataError(f"{path} does not hold a JSON object")
    definition = task.get("Definition")
    if not definition or not all(isinstance(d, str) for d in definition):
        raise NIDataError(f"{path} has no Definition")
    instances = task.get("Instances")
    if not instances:
        raise NIDataError(f"{path} has no Instances")
    for i, instance in enumerate(instances):
        outputs = instance.get("output") if isinstance(instance, dict) else None
        if "input" not in (instance or {}) or not outputs:
            ident = instance.get("id", i) if isinstance(instance, dict) else i
            raise NIDataError(f"{path}: instance {ident} has no input or no outputs")
    return task


@dataclasses.dataclass(frozen=True)
class NIConfig:
    """How a split becomes examples (gin: ``NIConfig.<field>``)."""

    num_pos_examples: int = 2
    num_neg_examples: int = 0
    add_definition: bool = True
    add_task_name: bool = False
    add_explanation: bool = False
    student_input: str = "definition_and_input"
    max_train_instances_per_task: int | None = 100
    eval_instances_per_task: int = EVAL_INSTANCES_PER_TASK
    max_source_length: int | None = None
    on_error: str = "raise"

    def __post_init__(self):
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"NIConfig.on_error={self.on_error!r} is not raise/skip")
        if self.student_input not in STUDENT_INPUTS:
            raise ValueError(
                f"NIConfig.student_input={self.student_input!r} not in {STUDENT_INPUTS}"
            )


def load_split(data_dir: str, split: str, config: NIConfig, split_name: str = "default"):
    """``[(name, task)]`` of a split; bad files raise or (skip) are counted and warned once."""
    tasks, skipped = [], Counter()
    for name in read_split(data_dir, split, split_name):
        try:
            tasks.append((name, load_task(os.path.join(data_dir, "tasks", f"{name}.json"))))
        except NIDataError as e:
            if config.on_error == "raise":
                raise
            skipped[str(e).split(":")[0]] += 1
    if skipped:
        log.warning("skipped %d unusable SNI task files: %s", sum(skipped.values()), dict(skipped))
    if not tasks:
        raise NIDataError(f"no usable tasks in the {split} split of {data_dir}")
    return tasks


def categories(tasks) -> list[str]:
    """Sorted distinct first categories: the category id is the index here."""
    return sorted({(task.get("Categories") or ["Uncategorized"])[0] for _, task in tasks})


def iter_examples(
    data_dir: str,
    split: str,
    config: NIConfig,
    *,
    seed: int = 0,
    count_tokens: Callable[[str], int] | None = None,
    split_name: str = "default",
) -> Iterator[dict[str, Any]]:
    """Formatted examples of a split, deterministic given ``seed``.

    Each carries ``inputs``, ``hyper_inputs``, ``teacher_inputs``, ``targets`` (a reference:
    drawn with the seeded RNG in training, the first in evaluation), ``references``,
    ``task_name``, ``category``, ``task_id``, ``category_id``, ``instance_id``.
    """
    tasks = load_split(data_dir, split, config, split_name)
    category_ids = {c: i for i, c in enumerate(categories(tasks))}
    training = split == "train"
    max_length = config.max_source_length if count_tokens is not None else None
    for task_id, (name, task) in enumerate(tasks):
        instances = list(task["Instances"])
        # zlib.crc32, not hash(): stable across processes and Python versions.
        rng = random.Random(seed * 1_000_003 + zlib.crc32(name.encode()))
        if training:
            rng.shuffle(instances)
            if config.max_train_instances_per_task is not None:
                instances = instances[: config.max_train_instances_per_task]
        else:
            instances = instances[: config.eval_instances_per_task]
        category = (task.get("Categories") or ["Uncategorized"])[0]
        for instance in instances:
            example = format_instance(
                task,
                instance,
                task_name=name if config.add_task_name else "",
                num_pos_examples=config.num_pos_examples,
                num_neg_examples=config.num_neg_examples,
                add_definition=config.add_definition,
                add_explanation=config.add_explanation,
                max_source_length=max_length,
                count_tokens=count_tokens if max_length is not None else None,
                student_input=config.student_input,
            )
            refs = example["references"]
            example["targets"] = rng.choice(refs) if training else refs[0]
            example.update(
                task_name=name,
                category=category,
                task_id=task_id,
                category_id=category_ids[category],
                instance_id=str(instance.get("id", "")),
            )
            yield example
