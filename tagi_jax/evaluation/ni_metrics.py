"""SNI metrics defined as in the official Super-NaturalInstructions evaluation
(``eval/automatic/evaluation.py`` of ``allenai/natural-instructions``, default English track),
which Tk-Instruct and TAGI use:

* **exact match**: both strings lower-cased, every ASCII punctuation character
  (``string.punctuation``) removed, whitespace collapsed to single spaces, then compared.
  Articles are *not* removed (unlike SQuAD's normalisation).
* **ROUGE-L**: the ``rougeL`` F-measure of ``rouge_score.rouge_scorer.RougeScorer(["rougeL"],
  use_stemmer=True)`` with its default tokenizer (lower-case, non-alphanumerics as separators,
  Porter stemming of tokens longer than 3 characters).

Each is the maximum over an instance's references; a group's score is the sum over its
instances divided by their number, times 100. Reported overall, per task and per category.
(The official script also rounds to 4 decimals; these functions do not round.)"""

from __future__ import annotations

import string
from collections import defaultdict
from collections.abc import Sequence

from rouge_score import rouge_scorer

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop ASCII punctuation, collapse whitespace; articles are kept."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings (``normalize_answer``) are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure in [0, 1] (stemmed, default ``rouge-score`` tokenizer)."""
    return _SCORER.score(target=reference, prediction=prediction)["rougeL"].fmeasure


def best_over_references(metric, prediction: str, references: Sequence[str]) -> float:
    """``max(metric(prediction, ref) for ref in references)``; at least one reference."""
    if not references:
        raise ValueError("an evaluation example has no references")
    return max(metric(prediction, ref) for ref in references)


def score(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    tasks: Sequence[str],
    categories: Sequence[str],
) -> dict:
    """``{"overall": {...}, "per_task": {task: {...}}, "per_category": {...}}``, each with
    ``rougeL`` and ``exact_match`` in percent (100 × the mean over the group's instances of the
    best score over that instance's references) and the instance ``count``."""
    if not len(predictions) == len(references) == len(tasks) == len(categories):
        raise ValueError("predictions, references, tasks and categories differ in length")
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for pred, refs, task, category in zip(predictions, references, tasks, categories, strict=True):
        r = best_over_references(rouge_l, pred, refs)
        e = best_over_references(exact_match, pred, refs)
        for key in ("overall", f"task:{task}", f"category:{category}"):
            groups[key]["rougeL"].append(r)
            groups[key]["exact_match"].append(e)

    def summary(values):
        n = len(values["rougeL"])
        return {
            "rougeL": 100.0 * sum(values["rougeL"]) / n,
            "exact_match": 100.0 * sum(values["exact_match"]) / n,
            "count": n,
        }

    return {
        "overall": summary(groups["overall"]),
        "per_task": {k[5:]: summary(v) for k, v in sorted(groups.items()) if k.startswith("task:")},
        "per_category": {
            k[9:]: summary(v) for k, v in sorted(groups.items()) if k.startswith("category:")
        },
    }


def markdown_table(results: dict, title: str = "") -> str:
    """Per-category and overall scores as a Markdown table."""
    lines = [
        f"### {title}" if title else "",
        "",
        "| category | n | ROUGE-L | EM |",
        "|---|---|---|---|",
    ]
    for name, s in results["per_category"].items():
        lines.append(f"| {name} | {s['count']} | {s['rougeL']:.1f} | {s['exact_match']:.1f} |")
    o = results["overall"]
    lines.append(f"| **overall** | {o['count']} | {o['rougeL']:.1f} | {o['exact_match']:.1f} |")
    return "\n".join(lines).strip() + "\n"
