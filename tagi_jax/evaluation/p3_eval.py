"""P3 rank classification (tagi_spec.md §8) as pure functions: score every answer choice of a
prompted instance with the student, pick the best, aggregate accuracies as the paper does.

For P3 the hypernetwork reads the prompted input itself (§3.3), so adapters are generated per
prompt, not per task. Each prompt is encoded and turned into adapters once, then expanded to
its answer choices (``lora.take``; the instruction states with ``jnp.take``), and every choice
is teacher-forced through ``tagi.forward`` with those adapters. A choice's score is

* ``"mean"`` (default, the authors'): the mean log-likelihood of its tokens, EOS included,
  pads (id 0) ignored: minus the per-token mean NLL of ``label_smoothed_nll_loss(...,
  average="instance")``;
* ``"sum"`` (T0's): the summed log-likelihood of the same tokens.

The highest score wins; ties go to the first choice. ``use_adapters=False`` scores with the
backbone alone (``t5.forward`` on the prompt): the zero-shot baseline.

The prompt is EOS-terminated (``tokens.encode_padded``), as training's SeqIO features are; the
authors' evaluation collator drops that EOS (§3.3), a one-token difference kept for
train/eval consistency.

Aggregation: accuracy per (dataset, template) -> mean and median over a dataset's templates
(the paper reports the mean, T0 the median) -> plain mean over datasets: MTest11 (the 11
held-out tasks, ANLI rounds separate) and the HyperT5 average (8: ANLI rounds averaged into
one, no StoryCloze). Averages over fewer datasets than they name are flagged ``partial`` with
what is missing, never passed off as the full average.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tagi_jax import paths
from tagi_jax.data import p3
from tagi_jax.data.tokens import encode_padded, shift_right
from tagi_jax.models import lora, t5, tagi
from tagi_jax.models.tagi_config import TagiConfig

SCORES = ("mean", "sum")
ANLI_PREFIX = "anli/"
STORY_CLOZE = "story_cloze/2016"


# --------------------------------------------------------------------------------------------
# Task names and instances


@dataclasses.dataclass(frozen=True)
class TaskName:
    """A P3 task split into its dataset and template.

    Attributes:
      task: the task name without ``_score_eval``.
      dataset: the dataset as ``tagi_jax/data/lists/`` names it (``super_glue/cb``, ``anli/r1``).
      template: the template part of the name (the template's name with runs of non-word
        characters as ``_``, as ``p3.task_name`` writes it).
      held_out: whether the dataset is a T0 held-out (evaluation) dataset.
    """

    task: str
    dataset: str
    template: str
    held_out: bool


@functools.cache
def _dataset_prefixes() -> tuple[tuple[str, str, str, bool], ...]:
    """``(list name, P3 prefix, suffix, held out)`` of every listed dataset, longest prefix
    first so that ``super_glue_wsc.fixed`` wins over a shorter ``super_glue_*``."""
    entries = [
        (name, entry["p3_dataset"], entry["p3_suffix"], True)
        for name, entry in p3.read_raw_map().items()
    ]
    entries += [
        (name, name.replace("/", "_"), "", False) for name in p3.read_list("t0_train_datasets")
    ]
    return tuple(sorted(entries, key=lambda e: (-len(e[1]), -len(e[2]), e[0])))


def held_out_datasets() -> list[str]:
    """The T0 held-out datasets (``lists/t0_eval_datasets.txt``), in list order: MTest11."""
    return p3.read_list("t0_eval_datasets")


def parse_task_name(task: str) -> TaskName:
    """Maps a P3 task name (``p3.task_name(dataset, template[, suffix])``, optionally with
    ``_score_eval``) back to its dataset and template.

    Raises ValueError naming the task when no listed dataset's prefix (and suffix) fits.
    """
    base = task[: -len(p3.SCORE_EVAL_SUFFIX)] if task.endswith(p3.SCORE_EVAL_SUFFIX) else task
    for name, prefix, suffix, held_out in _dataset_prefixes():
        if not base.startswith(prefix + "_") or not base.endswith(suffix):
            continue
        template = base[len(prefix) + 1 : len(base) - len(suffix)]
        if template:
            return TaskName(base, name, template, held_out)
    raise ValueError(
        f"P3 task {task!r} belongs to no dataset of tagi_jax/data/lists (t0_train_datasets.txt, "
        "p3_raw_map.json)"
    )


@dataclasses.dataclass(frozen=True)
class Instance:
    """One prompted example with its answer choices.

    Attributes:
      task: the task name (no ``_score_eval``); dataset, template: ``parse_task_name``'s.
      idx: the example's index in its task (``idx[0]`` of its score_eval rows).
      prompt: the prompted input.
      choices: the answer choices, in ``idx[1]`` order.
      gold: the index of the correct choice (-1 when no row is marked correct).
    """

    task: str
    dataset: str
    template: str
    idx: int
    prompt: str
    choices: tuple[str, ...]
    gold: int


def _split_file(task_dir: str, split: str) -> str:
    for ext in ("jsonl", "tfrecord"):
        path = paths.join(task_dir, f"{split}.{ext}")
        if paths.isfile(path):
            return path
    present = sorted(paths.listdir(task_dir)) if paths.isdir(task_dir) else []
    raise FileNotFoundError(
        f"{task_dir} has no {split}.jsonl or {split}.tfrecord (it holds {present or 'nothing'})"
    )


def instances_from_rows(task: str, rows: Iterable[Mapping], *, where: str = "") -> list[Instance]:
    """Groups a task's score_eval rows (``idx``, ``inputs_pretokenized``,
    ``targets_pretokenized``, ``is_correct``) into instances, ordered by ``idx``."""
    name = parse_task_name(task)
    where = where or task
    grouped: dict[int, dict[int, Mapping]] = {}
    for n, row in enumerate(rows):
        missing = [
            k for k in ("idx", "inputs_pretokenized", "targets_pretokenized") if k not in row
        ]
        if missing:
            raise ValueError(f"{where}: row {n} lacks {missing}: not a score_eval row")
        p3.check_row(row, f"{where}: row {n}")  # types, never coerced (bool("false") is True)
        example, choice = row["idx"][:2]
        grouped.setdefault(example, {})[choice] = row
    out = []
    for example in sorted(grouped):
        rows_ = [grouped[example][c] for c in sorted(grouped[example])]
        prompts = {r["inputs_pretokenized"] for r in rows_}
        if len(prompts) != 1:
            raise ValueError(f"{where}: the rows of example {example} disagree on the prompt")
        correct = [i for i, r in enumerate(rows_) if r.get("is_correct")]
        out.append(
            Instance(
                task=name.task,
                dataset=name.dataset,
                template=name.template,
                idx=example,
                prompt=rows_[0]["inputs_pretokenized"],
                choices=tuple(r["targets_pretokenized"] for r in rows_),
                gold=correct[0] if correct else -1,
            )
        )
    return out


def score_eval_tasks(p3_dir: str, datasets: Sequence[str]) -> dict[str, list[str]]:
    """``{dataset: [score_eval task directory, ...]}`` for the ``datasets`` present in
    ``p3_dir`` (a dataset with no task there is absent from the result; local or cloud)."""
    if not paths.isdir(p3_dir):
        raise FileNotFoundError(f"P3 directory does not exist: {p3_dir}")
    wanted = set(datasets)
    found: dict[str, list[str]] = {}
    for entry in p3.task_dirs(p3_dir):
        if not entry.endswith(p3.SCORE_EVAL_SUFFIX):
            continue
        try:
            dataset = parse_task_name(entry).dataset
        except ValueError:
            continue  # a task of no listed dataset: not part of any requested evaluation
        if dataset in wanted:
            found.setdefault(dataset, []).append(entry)
    return found


def load_instances(
    p3_dir: str, task_dirs: Iterable[str], split: str, *, max_per_task: int | None = None
) -> list[Instance]:
    """The instances of the given score_eval task directories of ``p3_dir``."""
    out = []
    for task_dir in task_dirs:
        path = _split_file(paths.join(p3_dir, task_dir), split)
        rows = p3.read_jsonl(path) if path.endswith(".jsonl") else p3.read_tfrecord(path)
        instances = instances_from_rows(task_dir, rows, where=path)
        out.extend(instances if max_per_task is None else instances[:max_per_task])
    return out


# --------------------------------------------------------------------------------------------
# Scoring


def _token_log_likelihoods(logits, targets, vocab_size):
    """``[rows, T]`` log p(target token), zero at pads. ``vocab_size`` masks logits of ids the
    tokenizer never produces (T5's padded embedding rows) out of the softmax."""
    logits = logits.astype(jnp.float32)
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits[..., :vocab_size]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return jnp.where(targets > 0, picked, 0.0)


def _reduce(total, count, score: str):
    """A choice's score from its summed log-likelihood and its number of tokens."""
    return total if score == "sum" else total / np.maximum(count, 1)


@functools.partial(jax.jit, static_argnames=("config", "vocab_size", "use_adapters"))
def _score_rows(
    config, params, prompts, owner, targets, decoder_inputs, *, vocab_size, use_adapters
):
    """``(summed log-likelihood, token count)`` of ``targets[r]`` (decoder inputs
    ``decoder_inputs[r]``: ``targets`` shifted right) given ``prompts[owner[r]]``, each prompt
    encoded (and its adapters generated) once."""
    rows = jnp.take(prompts, owner, axis=0)
    if not use_adapters:
        logits = t5.forward(config.t5, params["t5"], rows, decoder_inputs)
    else:
        states, first = tagi.encode_instruction(config, params, prompts)
        adapters = None
        if config.hyper.targets:
            adapters = tagi.adapters_from_states(config, params, states, prompts, first)[0]
        if adapters is not None:
            adapters = lora.take(adapters, owner)
        batch = {
            "encoder_input_tokens": rows,
            "hyper_input_tokens": rows,
            "decoder_input_tokens": decoder_inputs,
        }
        logits, _ = tagi.forward(
            config,
            params,
            batch,
            adapters=adapters,
            instruction_states=jnp.take(states, owner, axis=0),
        )
    token_ll = _token_log_likelihoods(logits, targets, vocab_size)
    return token_ll.sum(axis=-1), (targets > 0).sum(axis=-1)


def _packs(instances: Sequence[Instance], prompts_per_batch: int, rows_per_batch: int):
    """Consecutive groups of instances with at most ``prompts_per_batch`` prompts and
    ``rows_per_batch`` choices in all."""
    pack: list[int] = []
    rows = 0
    for i, instance in enumerate(instances):
        n = len(instance.choices)
        if n > rows_per_batch:
            raise ValueError(
                f"{instance.task} example {instance.idx} has {n} answer choices, more than the "
                f"{rows_per_batch} rows of a batch: raise the batch size"
            )
        if pack and (len(pack) == prompts_per_batch or rows + n > rows_per_batch):
            yield pack
            pack, rows = [], 0
        pack.append(i)
        rows += n
    if pack:
        yield pack


def score_choices(
    config: TagiConfig,
    params,
    instances: Sequence[Instance],
    vocabulary,
    *,
    input_length: int,
    target_length: int,
    batch_size: int = 32,
    score: str = "mean",
    use_adapters: bool = True,
    vocab_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """Every instance's choice scores (float32 ``[len(choices)]``), in order.

    Each batch holds up to ``batch_size`` prompts and ``batch_size`` (prompt, choice) rows,
    padded to exactly that (one compilation for the whole evaluation). Prompts are
    EOS-terminated and cut to ``input_length`` tokens, choices (with EOS) to
    ``target_length``. ``vocab_size``: logits of ids at or above it are left out of the
    softmax (None: the model's full width). ``progress`` is called with the number of
    instances each batch finished.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(instances)
    for pack in _packs(instances, batch_size, batch_size):
        prompt_texts = [instances[i].prompt for i in pack]
        # padding prompts repeat the first: an all-pad prompt could pool to NaN
        prompt_texts += [prompt_texts[0]] * (batch_size - len(pack))
        prompts = encode_padded(vocabulary, prompt_texts, input_length)
        owner, choice_texts = [], []
        for slot, i in enumerate(pack):
            owner += [slot] * len(instances[i].choices)
            choice_texts += list(instances[i].choices)
        used = len(owner)
        owner += [0] * (batch_size - used)
        choice_texts += [choice_texts[0]] * (batch_size - used)
        targets = encode_padded(vocabulary, choice_texts, target_length)
        total, count = _score_rows(
            config,
            params,
            jnp.asarray(prompts),
            jnp.asarray(owner, jnp.int32),
            jnp.asarray(targets),
            jnp.asarray(shift_right(targets)),
            vocab_size=vocab_size,
            use_adapters=use_adapters,
        )
        scores = _reduce(np.asarray(total), np.asarray(count), score)[:used]
        start = 0
        for i in pack:
            n = len(instances[i].choices)
            out[i] = scores[start : start + n].astype(np.float32)
            start += n
        if progress is not None:
            progress(len(pack))
    return out


def predict(scores: np.ndarray) -> int:
    """The highest-scoring choice; ties go to the first (``np.argmax``)."""
    return int(np.argmax(scores))


# --------------------------------------------------------------------------------------------
# Metrics


def accuracy_per_task(instances: Sequence[Instance], predictions: Sequence[int]) -> dict:
    """``{task: {"dataset", "template", "accuracy" (percent), "count"}}``, sorted by task."""
    if len(instances) != len(predictions):
        raise ValueError(f"{len(instances)} instances but {len(predictions)} predictions")
    tally: dict[str, list] = {}
    for instance, predicted in zip(instances, predictions, strict=True):
        entry = tally.setdefault(instance.task, [instance.dataset, instance.template, 0, 0])
        entry[2] += int(predicted == instance.gold)
        entry[3] += 1
    return {
        task: {"dataset": d, "template": t, "accuracy": 100.0 * c / n, "count": n}
        for task, (d, t, c, n) in sorted(tally.items())
    }


def per_dataset(per_task: Mapping[str, Mapping]) -> dict:
    """``{dataset: {"mean", "median", "templates", "count"}}`` over its templates' accuracies."""
    grouped: dict[str, list] = {}
    for entry in per_task.values():
        grouped.setdefault(entry["dataset"], []).append(entry)
    return {
        dataset: {
            "mean": statistics.fmean(e["accuracy"] for e in entries),
            "median": statistics.median(e["accuracy"] for e in entries),
            "templates": len(entries),
            "count": sum(e.get("count", 0) for e in entries),
        }
        for dataset, entries in sorted(grouped.items())
    }


def _average(members: Mapping[str, Sequence[str]], datasets: Mapping[str, Mapping]) -> dict:
    """Plain mean over ``members`` (a member averages its datasets first, e.g. ANLI's rounds)
    of the per-dataset means and medians; members or datasets that are absent are listed."""
    missing = sorted(d for group in members.values() for d in group if d not in datasets)
    values = {"mean": [], "median": []}
    present = []
    for name, group in members.items():
        have = [datasets[d] for d in group if d in datasets]
        if not have:
            continue
        present.append(name)
        for key in values:
            values[key].append(statistics.fmean(h[key] for h in have))
    return {
        "mean": statistics.fmean(values["mean"]) if present else None,
        "median": statistics.fmean(values["median"]) if present else None,
        "datasets": present,
        "count": len(present),
        "expected": len(members),
        "partial": bool(missing),
        "missing": missing,
    }


def averages(datasets: Mapping[str, Mapping], held_out: Sequence[str] | None = None) -> dict:
    """``{"mtest11": ..., "hypert5": ...}`` from ``per_dataset``'s output.

    MTest11 averages the 11 held-out datasets (ANLI rounds separately); HyperT5 averages 8:
    the ANLI rounds as one (their mean), StoryCloze left out. Each says which members it
    averaged, how many of how many, and ``partial``/``missing`` when some are absent.
    """
    held_out = list(held_out if held_out is not None else held_out_datasets())
    anli = [d for d in held_out if d.startswith(ANLI_PREFIX)]
    hyper: dict[str, list[str]] = {}
    for d in held_out:
        if d == STORY_CLOZE:
            continue
        if d in anli:
            hyper.setdefault("anli", []).append(d)
        else:
            hyper[d] = [d]
    return {
        "mtest11": _average({d: [d] for d in held_out}, datasets),
        "hypert5": _average(hyper, datasets),
    }


def summarize(instances: Sequence[Instance], predictions: Sequence[int]) -> dict:
    """``{"per_task", "per_dataset", "averages"}`` of one model's predictions."""
    tasks = accuracy_per_task(instances, predictions)
    datasets = per_dataset(tasks)
    return {"per_task": tasks, "per_dataset": datasets, "averages": averages(datasets)}


def _number(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def markdown_table(summary: Mapping, title: str) -> str:
    """Per-dataset mean/median accuracy and the two averages (partial ones marked)."""
    lines = [f"## {title}", "", "| dataset | templates | mean | median |", "|---|---|---|---|"]
    for dataset, entry in summary["per_dataset"].items():
        lines.append(
            f"| {dataset} | {entry['templates']} | {entry['mean']:.2f} | {entry['median']:.2f} |"
        )
    for key, label in (("mtest11", "MTest11 avg"), ("hypert5", "HyperT5 avg")):
        avg = summary["averages"][key]
        note = f"{avg['count']}/{avg['expected']}"
        if avg["partial"]:
            note += f", partial: missing {', '.join(avg['missing'])}"
        lines.append(
            f"| **{label}** ({note}) | | {_number(avg['mean'])} | {_number(avg['median'])} |"
        )
    return "\n".join(lines) + "\n"
