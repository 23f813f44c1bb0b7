"""Super-Natural Instructions: the natural-instructions layout, read from a local directory or
from cloud storage (``gs://...``, through ``tagi_jax.paths``).

Layout: ``<dir>/tasks/<task>.json`` and ``<dir>/splits/<split_name>/{train,test}_tasks.txt``
(the flat ``<dir>/splits/{train,test}_tasks.txt`` of a sample is accepted too). Task files are
read whole (they are parsed whole), a cloud one in one download.

``format_instance`` builds the three TAGI text streams exactly as Tk-Instruct / the authors'
collator does (tagi_spec.md §2.4): the teacher's source (definition, demonstrations, the
"Now complete the following example -" block), the hypernetwork's instruction (definition +
demonstrations, no input) and the student's input. ``iter_examples`` walks a split: test tasks
give their first 100 instances with every reference; training tasks give a seeded shuffle,
capped per task, with one reference drawn as the target.

One ``NIConfig`` (gin: ``NIConfig.<field>``, held by ``DataConfig.ni``) says how for training,
the LoRA-teacher stage and evaluation alike. With ``max_source_length`` set, Tk-Instruct's
budget counts the model's tokens: demonstrations are dropped before the source is cut, so the
``Input: ... Output:`` tail survives whenever the Definition and the input fit.

Bad input (malformed JSON, a file that is not UTF-8, a listed task missing on disk, a field of
the wrong type or missing: ``load_task`` checks every field this module reads) raises
``NIDataError`` (a ``tagi_jax.data.errors.DataError``), one line naming the file, the instance
and the field, what was expected and what was found; with ``on_error="skip"`` the file is
skipped instead, counted and reported in one warning at the end. A wrong type is never coerced:
an ``output`` that is a string instead of a list of strings would train on single characters.
``first_examples`` formats one example per task exactly as training does (``preflight``).
``IndexedExamples`` gives ``iter_examples``' examples by index, formatting only the one asked
for (the per-host training stream).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import string
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from tagi_jax import paths
from tagi_jax.data import example_index
from tagi_jax.data.errors import DataError, found

log = logging.getLogger(__name__)

STUDENT_INPUTS = ("definition_and_input", "input_only", "teacher_source")
EVAL_INSTANCES_PER_TASK = 100  # the official (label-balanced) evaluation instances
DEFAULT_POS_EXAMPLES = 2  # Tk-Instruct's "Def + 2 Pos", the paper's main setting
# The task variants registered per natural-instructions directory ("<prefix>_<label>_<variant>",
# e.g. tagi_sni_def_pos2): variant -> positive demonstrations. The task name is how a run says
# "Definition only" or "Def + 2 Pos"; NIConfig.num_pos_examples may not contradict it.
TASK_VARIANTS = {"def_pos2": 2, "def": 0}


class NIDataError(DataError):
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
    cut_source: Callable[[str], str] | None = None,
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
      cut_source: applied to a source (the teacher's, and the student's input) whose
        ``count_tokens`` still exceeds ``max_source_length`` once demonstrations are dropped:
        Tk-Instruct tokenizes it, cuts the ids and decodes them back (``token_budget``).
      student_input: ``definition_and_input`` (with fusion), ``input_only``, or
        ``teacher_source`` (the authors' last runs without fusion).

    Returns:
      ``teacher_inputs``, ``hyper_inputs``, ``inputs``, ``references`` (all outputs).
    """
    if student_input not in STUDENT_INPUTS:
        raise ValueError(f"student_input={student_input!r} is not one of {STUDENT_INPUTS}")
    if (max_source_length is None) != (count_tokens is None):
        raise ValueError("max_source_length and count_tokens go together")
    if cut_source is not None and max_source_length is None:
        raise ValueError("cut_source needs max_source_length and count_tokens")
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

    def cut(source: str) -> str:
        # The demonstrations that did not fit are gone already: only a Definition and input
        # too long on their own (or the task-name prefix, which Tk-Instruct's check leaves out)
        # get cut. The hypernetwork's instruction has no input to keep; its own length trims it.
        if cut_source is None or fits(source):
            return source
        return cut_source(source)

    teacher = cut(instruction + task_input)
    student = {
        "definition_and_input": cut(prefix + definition + task_input),
        "input_only": cut(task_input),
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
        paths.join(data_dir, "splits", split_name, f"{split}_tasks.txt"),
        paths.join(data_dir, "splits", f"{split}_tasks.txt"),
    ]
    for path in candidates:
        if paths.isfile(path):
            try:
                with example_index.open_text(path) as f:
                    names = [line.strip() for line in f if line.strip()]
            except UnicodeDecodeError as e:
                raise NIDataError(f"{path} is not UTF-8: {e}") from None
            if not names:
                raise NIDataError(f"{path} lists no tasks")
            return names
    raise NIDataError(f"no split file for {split!r}: looked for {' and '.join(candidates)}")


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _check_examples(path: str, task: dict, key: str) -> None:
    """``Positive Examples`` / ``Negative Examples``: optional, else a list of
    ``{input: str, output: str[, explanation: str]}`` (the demonstrations' text)."""
    examples = task.get(key)
    if examples is None:
        return
    if not isinstance(examples, list):
        raise NIDataError(f'{path}: "{key}" must be a list of examples, found {found(examples)}')
    for i, example in enumerate(examples):
        where = f'{path}: "{key}"[{i}]'
        if not isinstance(example, dict):
            raise NIDataError(
                f"{where} must be an object with input and output, found {found(example)}"
            )
        for field in ("input", "output", "explanation"):
            if field == "explanation" and field not in example:
                continue
            if not isinstance(example.get(field), str):
                value = f"found {found(example[field])}" if field in example else "it is missing"
                raise NIDataError(f'{where} field "{field}" must be a string, {value}')


def _check_instance(path: str, index: int, instance: Any) -> None:
    """One entry of ``Instances``: ``{id: str, input: str, output: [str, ...]}`` (non-empty)."""
    if not isinstance(instance, dict):
        raise NIDataError(
            f"{path}: Instances[{index}] must be an object with id, input and output, "
            f"found {found(instance)}"
        )
    ident = instance.get("id")
    if not isinstance(ident, str):
        value = f"found {found(ident)}" if "id" in instance else "it is missing"
        raise NIDataError(f'{path}: Instances[{index}] field "id" must be a string, {value}')
    where = f"{path}: instance {ident} (Instances[{index}])"
    if not isinstance(instance.get("input"), str):
        value = f"found {found(instance['input'])}" if "input" in instance else "it is missing"
        raise NIDataError(f'{where} field "input" must be a string, {value}')
    outputs = instance.get("output")
    if "output" not in instance:
        raise NIDataError(f'{where} has no outputs: field "output" is missing')
    if not _is_str_list(outputs):
        # a string here would be iterated into single-character references
        raise NIDataError(
            f'{where} field "output" must be a list of strings, found {found(outputs)}'
        )
    if not outputs:
        raise NIDataError(f'{where} has no outputs: field "output" is an empty list')


def check_task(path: str, task: Any) -> dict:
    """``task`` (a parsed task file) if every field this module reads has its type:
    ``Definition`` a non-empty list of strings, ``Categories`` a list of strings (optional),
    ``Positive Examples`` / ``Negative Examples`` lists of ``{input, output[, explanation]}``
    strings (optional), ``Instances`` a non-empty list of ``{id, input, output: [str, ...]}``.
    Raises ``NIDataError``, one line naming ``path``, the field (and instance), what was
    expected and what was found."""
    if not isinstance(task, dict):
        raise NIDataError(f"{path} does not hold a JSON object (found {found(task)})")
    definition = task.get("Definition")
    if not definition:
        raise NIDataError(f'{path} has no Definition (field "Definition" missing or empty)')
    if not _is_str_list(definition):
        raise NIDataError(
            f'{path}: field "Definition" must be a list of strings, found {found(definition)}'
        )
    categories = task.get("Categories")
    if categories is not None and not _is_str_list(categories):
        # a string here would give the category of its first letter
        raise NIDataError(
            f'{path}: field "Categories" must be a list of strings, found {found(categories)}'
        )
    _check_examples(path, task, "Positive Examples")
    _check_examples(path, task, "Negative Examples")
    instances = task.get("Instances")
    if not instances:
        raise NIDataError(f'{path} has no Instances (field "Instances" missing or empty)')
    if not isinstance(instances, list):
        raise NIDataError(
            f'{path}: field "Instances" must be a list of instances, found {found(instances)}'
        )
    for i, instance in enumerate(instances):
        _check_instance(path, i, instance)
    return task


def load_task(path: str) -> dict:
    """A parsed task file whose schema holds (``check_task``)."""
    try:
        raw = paths.read_bytes(path)
    except FileNotFoundError:
        raise NIDataError(f"task file missing: {path}") from None
    except OSError as e:
        raise NIDataError(f"{path}: cannot read the task file: {e.strerror or e}") from None
    try:
        task = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise NIDataError(f"{path} is not UTF-8: {e}") from None
    except json.JSONDecodeError as e:
        raise NIDataError(f"{path} is not valid JSON: {e}") from None
    return check_task(path, task)


@dataclasses.dataclass(frozen=True)
class NIConfig:
    """How natural-instructions data becomes examples, for training, the LoRA-teacher stage and
    evaluation alike (gin: ``NIConfig.<field>``; runs hold it as ``DataConfig.ni``, evaluation
    as ``evaluate.ni``, both the gin-configured one by default).

    Attributes:
      num_pos_examples: positive demonstrations. None: as the data says, i.e. a training
        task's variant (``*_def``: 0, ``*_def_pos2``: 2, ``TASK_VARIANTS``) and otherwise (an
        evaluation) Tk-Instruct's Def + 2 Pos. A number that contradicts the task's variant is
        an error, never silently overridden (``with_pos_examples``).
      num_neg_examples, add_definition, add_task_name, add_explanation: Tk-Instruct's format
        switches (the authors' scripts: 0, True, False, False).
      student_input: what the student reads (``STUDENT_INPUTS``; ``format_instance``).
      max_train_instances_per_task: training instances per task, a seeded draw (the paper's
        100; None for all).
      eval_instances_per_task: evaluation instances per task, the first ones (the official 100).
      max_source_length: Tk-Instruct's source budget in the model's tokens, EOS included
        (Tk-Instruct and the authors: 1024): demonstrations are kept only while the source fits,
        then a source still longer is cut to it. Needs the vocabulary (``iter_examples``).
        None: no budget; the feature lengths alone trim.
      on_error: ``raise`` on an unusable task file, or ``skip`` it (counted, warned once).
    """

    num_pos_examples: int | None = None
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
        at_least = {
            "num_pos_examples": 0,
            "num_neg_examples": 0,
            "max_train_instances_per_task": 1,
            "eval_instances_per_task": 1,
            # the source ends in EOS: a budget of 1 leaves no room for any text
            "max_source_length": 2,
        }
        for name, low in at_least.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"NIConfig.{name}={value} must be >= {low} (or None)")

    def streams_shorter_than_budget(self, lengths: dict[str, int]) -> dict[str, int]:
        """The source streams among ``lengths`` (feature name -> length) shorter than
        ``max_source_length``: the budget keeps a source's ``Input: ... Output:`` tail by
        dropping demonstrations, and such a length would trim that tail off after all. The
        student's ``inputs`` is a source only when it reads the teacher's."""
        if self.max_source_length is None:
            return {}
        sources = ["teacher_inputs"]
        if self.student_input == "teacher_source":
            sources.append("inputs")
        return {
            k: lengths[k] for k in sources if k in lengths and lengths[k] < self.max_source_length
        }

    @property
    def pos_examples(self) -> int:
        """The demonstrations formatted: ``num_pos_examples``, Def + 2 Pos when unset."""
        return DEFAULT_POS_EXAMPLES if self.num_pos_examples is None else self.num_pos_examples

    def with_pos_examples(self, count: int, source: str) -> NIConfig:
        """This config with ``count`` demonstrations, as ``source`` (a task variant) asks; an
        explicit other ``num_pos_examples`` is a contradiction, reported, not overridden."""
        if self.num_pos_examples is not None and self.num_pos_examples != count:
            raise ValueError(
                f"NIConfig.num_pos_examples={self.num_pos_examples} contradicts {source}, which "
                f"formats {count} positive examples: leave NIConfig.num_pos_examples unset (the "
                "task name picks the demonstrations) or pick the task variant you mean "
                f"({', '.join(f'_{v}: {n}' for v, n in TASK_VARIANTS.items())})"
            )
        return dataclasses.replace(self, num_pos_examples=count)


def task_variant(task: str) -> str | None:
    """The ``TASK_VARIANTS`` key a task name ends in (``tagi_sni_def_pos2`` -> ``def_pos2``),
    or None for a task that is not a natural-instructions variant (P3, C4)."""
    for variant in sorted(TASK_VARIANTS, key=len, reverse=True):
        if task.endswith("_" + variant):
            return variant
    return None


def for_task(config: NIConfig, task: str) -> NIConfig:
    """``config`` with the demonstrations the task variant ``task`` names (errors as
    ``NIConfig.with_pos_examples``)."""
    variant = task_variant(task)
    if variant is None:
        raise ValueError(
            f"task {task!r} is not a natural-instructions task (<prefix>_sni_<variant> or "
            f"<prefix>_suite_<variant>, variant one of {sorted(TASK_VARIANTS)})"
        )
    return config.with_pos_examples(TASK_VARIANTS[variant], f"task {task!r}")


def token_budget(vocabulary, max_source_length: int):
    """``(count_tokens, cut_source)`` for ``format_instance``: Tk-Instruct's source budget in
    ``vocabulary``'s tokens (anything with SeqIO's ``encode``/``decode``)."""

    def count_tokens(text: str) -> int:
        return len(vocabulary.encode(text)) + 1  # + EOS, as the model sees it

    def cut_source(text: str) -> str:
        # Tk-Instruct decodes the first max_source_length ids and its final tokenization keeps
        # max_source_length - 1 of them + EOS. Cutting to those ids here gives the model the
        # same ids and makes the text itself fit the budget, EOS included, so the feature
        # length's trim (append_eos_after_trim, encode_padded) has nothing left to cut.
        return vocabulary.decode(list(vocabulary.encode(text))[: max_source_length - 1])

    return count_tokens, cut_source


def load_split(data_dir: str, split: str, config: NIConfig, split_name: str = "default"):
    """``[(name, task)]`` of a split; bad files raise or (skip) are counted and warned once."""
    tasks, skipped = [], Counter()
    for name in read_split(data_dir, split, split_name):
        try:
            tasks.append((name, load_task(paths.join(data_dir, "tasks", f"{name}.json"))))
        except NIDataError as e:
            if config.on_error == "raise":
                raise
            skipped[_skip_key(str(e))] += 1
    if skipped:
        log.warning("skipped %d unusable SNI task files: %s", sum(skipped.values()), dict(skipped))
    if not tasks:
        raise NIDataError(f"no usable tasks in the {split} split of {data_dir}")
    return tasks


def _skip_key(message: str) -> str:
    """What a skipped file is counted under: its message up to the first ``:`` (the file, or
    the kind of problem), a URI's ``scheme://`` not counting as that ``:``."""
    scheme = paths.scheme(message)
    head = f"{message[: len(scheme)]}://" if scheme else ""
    return head + message[len(head) :].split(":")[0]


def categories(tasks) -> list[str]:
    """Sorted distinct first categories: the category id is the index here."""
    return sorted({(task.get("Categories") or ["Uncategorized"])[0] for _, task in tasks})


def _budget(config: NIConfig, vocabulary) -> dict[str, Any]:
    """``format_instance``'s budget arguments for ``config`` (none without a budget)."""
    if config.max_source_length is None:
        return {}
    if vocabulary is None:
        raise ValueError(
            f"NIConfig.max_source_length={config.max_source_length} counts the model's "
            "tokens: iter_examples needs the vocabulary"
        )
    count_tokens, cut_source = token_budget(vocabulary, config.max_source_length)
    return dict(
        max_source_length=config.max_source_length,
        count_tokens=count_tokens,
        cut_source=cut_source,
    )


def _task_plan(name: str, task: dict, split: str, config: NIConfig, seed: int) -> list:
    """``[(instance, target)]`` of a task in the order ``iter_examples`` gives: the seeded
    shuffle and cap of training instances (the first ones in evaluation) and each training
    instance's drawn reference, all without formatting anything."""
    training = split == "train"
    instances = list(task["Instances"])
    # zlib.crc32, not hash(): stable across processes and Python versions.
    rng = random.Random(seed * 1_000_003 + zlib.crc32(name.encode()))
    if training:
        rng.shuffle(instances)
        if config.max_train_instances_per_task is not None:
            instances = instances[: config.max_train_instances_per_task]
    else:
        instances = instances[: config.eval_instances_per_task]
    # the draws follow the instances in order, as when each was drawn right after formatting
    return [
        (instance, rng.choice(list(instance["output"])) if training else instance["output"][0])
        for instance in instances
    ]


def _format(
    name: str,
    task: dict,
    task_id: int,
    category_ids: dict[str, int],
    config: NIConfig,
    budget: dict,
    instance: dict,
    target: str,
) -> dict[str, Any]:
    """One planned instance as a formatted example (``iter_examples``' fields)."""
    category = (task.get("Categories") or ["Uncategorized"])[0]
    example = format_instance(
        task,
        instance,
        task_name=name if config.add_task_name else "",
        num_pos_examples=config.pos_examples,
        num_neg_examples=config.num_neg_examples,
        add_definition=config.add_definition,
        add_explanation=config.add_explanation,
        student_input=config.student_input,
        **budget,
    )
    example["targets"] = target
    example.update(
        task_name=name,
        category=category,
        task_id=task_id,
        category_id=category_ids[category],
        instance_id=instance["id"],
    )
    return example


def _task_examples(
    tasks: list,
    task_id: int,
    category_ids: dict[str, int],
    split: str,
    config: NIConfig,
    seed: int,
    budget: dict,
) -> Iterator[dict[str, Any]]:
    """The formatted examples of ``tasks[task_id]``, in the order ``iter_examples`` gives."""
    name, task = tasks[task_id]
    for instance, target in _task_plan(name, task, split, config, seed):
        yield _format(name, task, task_id, category_ids, config, budget, instance, target)


class IndexedExamples:
    """The examples ``iter_examples`` gives (same arguments), addressable as ``(task_id, k)``
    (the ``k``-th example of a task in its order) without formatting any other.

    Building it reads and checks every task file of the split (as ``iter_examples`` does) and
    draws each task's instances and targets; only the drawn instances are kept. Formatting
    (with the token budget: the tokenizer's work) happens in ``example``, for that example
    alone.
    """

    def __init__(
        self,
        data_dir: str,
        split: str,
        config: NIConfig,
        *,
        seed: int = 0,
        vocabulary=None,
        split_name: str = "default",
    ):
        self._config = config
        tasks, self._category_ids, self._budget = _split_setup(
            data_dir, split, config, vocabulary, split_name
        )
        self._plans = [_task_plan(name, task, split, config, seed) for name, task in tasks]
        # the drawn instances live in the plans; the rest of each file is let go
        self._tasks = [
            (name, {k: v for k, v in task.items() if k != "Instances"}) for name, task in tasks
        ]
        self.sizes = [len(plan) for plan in self._plans]

    def __len__(self) -> int:
        return sum(self.sizes)

    def example(self, task_id: int, k: int) -> dict[str, Any]:
        """The ``k``-th example of task ``task_id``, formatted."""
        name, task = self._tasks[task_id]
        instance, target = self._plans[task_id][k]
        return _format(
            name, task, task_id, self._category_ids, self._config, self._budget, instance, target
        )


def _split_setup(data_dir, split, config, vocabulary, split_name):
    """What formatting a split's examples needs: its tasks, category ids and source budget."""
    budget = _budget(config, vocabulary)
    tasks = load_split(data_dir, split, config, split_name)
    return tasks, {c: i for i, c in enumerate(categories(tasks))}, budget


def iter_examples(
    data_dir: str,
    split: str,
    config: NIConfig,
    *,
    seed: int = 0,
    vocabulary=None,
    split_name: str = "default",
) -> Iterator[dict[str, Any]]:
    """Formatted examples of a split, deterministic given ``seed``.

    ``vocabulary`` (the model's; SeqIO's ``encode``/``decode``) counts and cuts the source when
    ``config.max_source_length`` is set, and is required then: a budget that cannot be counted
    is an error, not a budget silently off.

    Each carries ``inputs``, ``hyper_inputs``, ``teacher_inputs``, ``targets`` (a reference:
    drawn with the seeded RNG in training, the first in evaluation), ``references``,
    ``task_name``, ``category``, ``task_id``, ``category_id``, ``instance_id``.
    """
    tasks, category_ids, budget = _split_setup(data_dir, split, config, vocabulary, split_name)
    for task_id in range(len(tasks)):
        yield from _task_examples(tasks, task_id, category_ids, split, config, seed, budget)


def first_examples(
    data_dir: str,
    split: str,
    config: NIConfig,
    *,
    seed: int = 0,
    vocabulary=None,
    split_name: str = "default",
) -> list[dict[str, Any]]:
    """The first example ``iter_examples`` gives for each task of the split, formatted by the
    same code (the data check before training: every file is read and checked, one instance
    per task formatted)."""
    tasks, category_ids, budget = _split_setup(data_dir, split, config, vocabulary, split_name)
    return [
        next(_task_examples(tasks, task_id, category_ids, split, config, seed, budget))
        for task_id in range(len(tasks))
    ]
