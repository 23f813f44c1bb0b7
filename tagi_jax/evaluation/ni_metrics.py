"""SNI metrics as Tk-Instruct computes them: ROUGE-L (``rouge-score``, Porter stemming) and
exact match after answer normalisation, each the best over an example's references, reported
in percent per task, per category and overall (tasks weighted by their examples)."""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Sequence

from rouge_score import rouge_scorer

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, articles and extra whitespace (SQuAD-style)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def rouge_l(prediction: str, reference: str) -> float:
    return _SCORER.score(reference, prediction)["rougeL"].fmeasure


def best_over_references(metric, prediction: str, references: Sequence[str]) -> float:
    if not references:
        raise ValueError("an evaluation example has no references")
    return max(metric(prediction, ref) for ref in references)


def score(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    tasks: Sequence[str],
    categories: Sequence[str],
) -> dict:
    """``{"overall": {...}, "per_task": {task: {...}}, "per_category": {...}}`` with
    ``rougeL`` and ``exact_match`` in percent and the example count."""
    if not len(predictions) == len(references) == len(tasks) == len(categories):
        raise ValueError("predictions, references, tasks and categories differ in length")
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for pred, refs, task, category in zip(predictions, references, tasks, categories, strict=True):
        r = 100.0 * best_over_references(rouge_l, pred, refs)
        e = 100.0 * best_over_references(exact_match, pred, refs)
        for key in ("overall", f"task:{task}", f"category:{category}"):
            groups[key]["rougeL"].append(r)
            groups[key]["exact_match"].append(e)

    def summary(values):
        n = len(values["rougeL"])
        return {
            "rougeL": sum(values["rougeL"]) / n,
            "exact_match": sum(values["exact_match"]) / n,
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
