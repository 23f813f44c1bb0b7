"""The P3 evaluation (``evaluate_p3``; gin: ``evaluate_p3``, registered in
``tagi_jax.configurables``) and the renderer of the P3 layout it and
training read.

``evaluate_p3`` reads an export (``python -m tagi_jax.export``) and the ``_score_eval`` tasks of
a rendered P3 directory, ranks every instance's answer choices (``p3_eval.score_choices``:
adapters generated per prompt) and writes to ``output_dir`` (local or ``gs://...``):

* ``results.json``: the settings, ``per_task`` accuracy (percent), ``per_dataset`` mean and
  median over templates, ``averages`` (MTest11, HyperT5, with ``partial``/``missing`` where
  datasets are absent: the shared data has no HellaSwag or StoryCloze) and ``missing_datasets``;
  with ``compare_base`` also ``base`` (the backbone alone, the zero-shot baseline).
* ``results.md``: the per-dataset tables.
* ``predictions.jsonl``: per instance ``task``, ``dataset``, ``idx``, ``choices``, ``scores``,
  ``predicted``, ``gold``, ``correct`` (and ``base_*`` with ``compare_base``).

``python -m tagi_jax.evaluate --gin_file=runs/evaluate_p3.gin`` runs it (see that file).

``render_layout`` (``python -m tagi_jax.evaluation.p3_pipeline --shared_p3=... --out=...``)
renders the shared raw P3 records into that layout: the T0 training datasets present as
``<task>/train.jsonl`` (every template, what the training mixture and the LoRA-teacher stage
read) and the held-out datasets as ``<task>_score_eval/validation.jsonl`` (T0's evaluation
prompts: the ``original_task`` templates with answer choices). A template that uses a field its
records lack renders empty text there (as promptsource does): each is a warning and the CLI
reports how many renders did; ``--strict`` (``strict=True``) makes the first one an error naming
the template, the dataset and the field.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tagi_jax import paths

if TYPE_CHECKING:
    from tagi_jax.data.p3 import RenderCounts

EVAL_SPLIT = "validation"
TRAIN_SPLIT = "train"


# --------------------------------------------------------------------------------------------
# Rendering the layout


def _manifest(shared_p3: str) -> list[dict]:
    path = paths.join(shared_p3, "manifest.json")
    if not paths.isfile(path):
        raise FileNotFoundError(f"no manifest.json in {shared_p3}: not the shared P3 folder?")
    return paths.read_json(path)


def render_layout(
    shared_p3: str,
    out_dir: str,
    *,
    train_datasets: Sequence[str] | None = None,
    eval_datasets: Sequence[str] | None = None,
    max_examples: int | None = None,
    max_templates: int | None = None,
    strict: bool = False,
) -> RenderCounts:
    """Renders the shared raw P3 records (``shared/data/p3``) into the P3 layout in ``out_dir``.

    Args:
      shared_p3: the folder with ``manifest.json``, ``raw/`` and ``templates/``.
      out_dir: the P3 directory to write (``DataConfig.p3_dir``, ``evaluate_p3.p3_dir``).
      train_datasets: T0 training datasets (``lists/t0_train_datasets.txt`` names) to render;
        None: every one with a raw file in the manifest; ``[]``: none.
      eval_datasets: held-out datasets (``lists/t0_eval_datasets.txt`` names); None: every one
        with a raw file; ``[]``: none.
      max_examples: at most this many examples per task.
      max_templates: at most this many templates per dataset (the first in file order), for
        toy runs.
      strict: a template that uses a field its records lack is an error (``MissingFieldError``)
        instead of a warning.

    Returns:
      ``{task directory: rows written}``, a ``p3.RenderCounts`` whose ``missing`` reports the
      templates that used fields their records lack.
    """
    from tagi_jax.data import p3

    train_known = p3.read_list("t0_train_datasets")
    raw_map = p3.read_raw_map()
    manifest = _manifest(shared_p3)
    train_raw = {}
    for entry in manifest:
        name = entry["promptsource_dataset"] + (
            f"/{entry['promptsource_subset']}" if entry.get("promptsource_subset") else ""
        )
        if entry.get("role") == "train" and name in train_known:
            train_raw[name] = entry
    if train_datasets is None:
        train_datasets = sorted(train_raw)
    if eval_datasets is None:
        eval_datasets = [d for d, e in raw_map.items() if e["raw"] is not None]
    for name in train_datasets:
        if name not in train_raw:
            raise ValueError(
                f"training dataset {name!r} has no raw records in {shared_p3} (have "
                f"{sorted(train_raw)})"
            )
    for name in eval_datasets:
        if name not in raw_map or raw_map[name]["raw"] is None:
            have = sorted(d for d, e in raw_map.items() if e["raw"] is not None)
            raise ValueError(f"held-out dataset {name!r} has no raw records (have {have})")

    def first(path: str, wanted):
        """The ids of the first ``max_templates`` templates of ``path`` that ``wanted`` keeps."""
        ids = [t.id for t in p3.load_templates(path) if wanted(t)]
        return set(ids if max_templates is None else ids[:max_templates])

    counts = p3.RenderCounts()
    for name in train_datasets:
        entry = train_raw[name]
        templates = paths.join(shared_p3, entry["templates"])
        keep = first(templates, lambda t: True)
        counts.merge(
            p3.render_dataset(
                paths.join(shared_p3, entry["file"]),
                templates,
                out_dir,
                split=TRAIN_SPLIT,
                dataset_name=name.replace("/", "_"),
                max_examples=max_examples,
                keep=lambda t, keep=keep: t.id in keep,
                strict=strict,
            )
        )
    for name in eval_datasets:
        entry = raw_map[name]
        templates = paths.join(shared_p3, entry["templates"])
        # T0's evaluation prompts: the templates of the dataset's original task
        keep = first(templates, lambda t: bool(t.original_task) and t.answer_choices is not None)
        counts.merge(
            p3.render_dataset(
                paths.join(shared_p3, entry["raw"]),
                templates,
                out_dir,
                split=entry["split"],
                dataset_name=entry["p3_dataset"],
                task_suffix=entry["p3_suffix"],
                score_eval=True,
                max_examples=max_examples,
                keep=lambda t, keep=keep: t.id in keep,
                strict=strict,
            )
        )
    return counts


# --------------------------------------------------------------------------------------------
# The evaluation job


def _check_datasets(datasets: Sequence[str]) -> list[str]:
    from tagi_jax.data import p3
    from tagi_jax.evaluation import p3_eval

    known = p3_eval.held_out_datasets()
    known_all = set(known) | set(p3.read_list("t0_train_datasets"))
    unknown = [d for d in datasets if d not in known_all]
    if unknown:
        raise ValueError(
            f"evaluate_p3.datasets: unknown datasets {unknown}; the held-out ones are {known}"
        )
    if not datasets:
        raise ValueError("evaluate_p3.datasets is empty: nothing to evaluate")
    return list(datasets)


def _write_predictions(path, instances, scores, base_scores) -> None:
    from tagi_jax.evaluation import p3_eval

    with io.StringIO() as f:
        for i, instance in enumerate(instances):
            predicted = p3_eval.predict(scores[i])
            line = {
                "task": instance.task,
                "dataset": instance.dataset,
                "idx": instance.idx,
                "choices": list(instance.choices),
                "scores": [float(s) for s in scores[i]],
                "predicted": predicted,
                "gold": instance.gold,
                "correct": predicted == instance.gold,
            }
            if base_scores is not None:
                base_predicted = p3_eval.predict(base_scores[i])
                line |= {
                    "base_scores": [float(s) for s in base_scores[i]],
                    "base_predicted": base_predicted,
                    "base_correct": base_predicted == instance.gold,
                }
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
        paths.write_text(path, f.getvalue())


def _print_summary(label: str, summary: dict) -> None:
    for key, name in (("mtest11", "MTest11"), ("hypert5", "HyperT5")):
        avg = summary["averages"][key]
        value = "n/a" if avg["mean"] is None else f"{avg['mean']:.2f} (median {avg['median']:.2f})"
        note = f" PARTIAL {avg['count']}/{avg['expected']}, missing {avg['missing']}"
        print(f"{label}: {name} avg {value}{note if avg['partial'] else ''}")


def evaluate_p3(
    *,
    export_dir: str,
    p3_dir: str,
    output_dir: str,
    split: str = EVAL_SPLIT,
    datasets: Sequence[str] | None = None,
    score: str = "mean",
    batch_size: int = 32,
    input_length: int | None = None,
    target_length: int | None = None,
    vocabulary: str | None = None,
    compare_base: bool = False,
    max_instances_per_task: int | None = None,
) -> dict:
    """Rank-classification accuracy of the export in ``export_dir`` on the ``_score_eval``
    tasks of ``p3_dir`` (``render_layout``'s layout, or bigscience/P3's); returns what
    ``results.json`` holds.

    ``datasets``: list names (``super_glue/cb``, ``anli/r1``; None: the T0 held-out list); any
    absent from ``p3_dir`` are reported as missing and make the averages partial.
    ``score``: ``mean`` (per-token mean log-likelihood, the authors') or ``sum`` (T0's).
    ``batch_size``: prompts and (prompt, choice) rows per batch.
    Unset settings come from the export (``data.json`` / ``vocabulary.json``: what the student
    trained with): ``input_length`` / ``target_length`` (prompt and choice tokens: the
    ``inputs`` / ``targets`` feature lengths), ``vocabulary`` (an override must be the same
    vocabulary).
    ``compare_base``: also score the backbone alone (no adapters, no hypernetwork).
    ``max_instances_per_task``: the first N instances of each task (None: all), for quick runs.
    """
    from tqdm import tqdm

    from tagi_jax.artifacts import export_format
    from tagi_jax.data import vocab as vocab_lib
    from tagi_jax.evaluation import p3_eval

    start = time.time()
    export_dir, p3_dir = paths.absolute(export_dir), paths.absolute(p3_dir)
    output_dir = paths.absolute(output_dir)
    data = export_format.read_data(export_dir)  # a missing / incomplete export fails here
    if not paths.isdir(p3_dir):
        raise FileNotFoundError(f"evaluate_p3.p3_dir: P3 directory does not exist: {p3_dir}")
    if score not in p3_eval.SCORES:
        raise ValueError(f"evaluate_p3.score must be one of {p3_eval.SCORES}, got {score!r}")
    if batch_size < 1:
        raise ValueError(f"evaluate_p3.batch_size must be >= 1, got {batch_size}")
    trained_lengths = dict(data.get("feature_lengths") or {})
    # P3's lengths (paper Table 8) where an export does not record its own
    input_length = input_length or trained_lengths.get("inputs", 512)
    target_length = target_length or trained_lengths.get("targets", 64)
    vocabulary = export_format.vocabulary_for(
        export_format.vocabulary_spec(export_dir), vocabulary, "evaluate_p3.vocabulary"
    )
    held_out = p3_eval.held_out_datasets()
    datasets = _check_datasets(held_out if datasets is None else datasets)

    found = p3_eval.score_eval_tasks(p3_dir, datasets)
    missing = [d for d in datasets if d not in found]
    if not found:
        raise FileNotFoundError(
            f"{p3_dir} holds no _score_eval task of {datasets}: render them first "
            "(python -m tagi_jax.evaluation.p3_pipeline --shared_p3=... --out=...)"
        )
    task_dirs = [t for d in datasets for t in found.get(d, [])]
    instances = p3_eval.load_instances(
        p3_dir, task_dirs, split, max_per_task=max_instances_per_task
    )
    if not instances:
        raise ValueError(f"the {split!r} files of {len(task_dirs)} tasks in {p3_dir} are empty")

    vocab = vocab_lib.from_name(vocabulary)
    # Refuses parameters holding NaN or Inf, before anything is written to output_dir.
    loaded = export_format.load(export_dir)
    model, params = loaded.config, loaded.params
    print(
        f"evaluating {export_dir} on {len(instances)} instances of {len(task_dirs)} tasks "
        f"({len(found)} datasets; missing: {missing or 'none'}) from {p3_dir}, split {split!r}"
    )
    settings = {
        "input_length": input_length,
        "target_length": target_length,
        "batch_size": batch_size,
        "score": score,
        # ids the tokenizer never produces (T5's padded embedding rows) stay out of the softmax
        "vocab_size": min(vocab.vocab_size, model.t5.logits_width),
    }

    def run(use_adapters: bool, label: str):
        with tqdm(total=len(instances), desc=label, unit="ex", file=sys.stdout) as bar:
            return p3_eval.score_choices(
                model,
                params,
                instances,
                vocab,
                use_adapters=use_adapters,
                progress=bar.update,
                **settings,
            )

    scores = run(True, "TAGI")
    base_scores = run(False, "base") if compare_base else None

    summary = p3_eval.summarize(instances, [p3_eval.predict(s) for s in scores])
    report = {
        "export_dir": export_dir,
        "step": loaded.info.get("step"),
        "p3_dir": p3_dir,
        "split": split,
        "settings": {**settings, "vocabulary": vocabulary, "datasets": datasets},
        "missing_datasets": missing,
        **summary,
        "predictions_file": "predictions.jsonl",
    }
    base = None
    if base_scores is not None:
        base = p3_eval.summarize(instances, [p3_eval.predict(s) for s in base_scores])
        report["base"] = base

    paths.makedirs(output_dir)
    _write_predictions(paths.join(output_dir, "predictions.jsonl"), instances, scores, base_scores)
    paths.write_json(paths.join(output_dir, "results.json"), report, sort_keys=False)
    markdown = p3_eval.markdown_table(summary, f"TAGI ({export_dir}, {split}, score {score})")
    if base is not None:
        markdown += "\n" + p3_eval.markdown_table(base, "backbone alone, no adapters")
    paths.write_text(paths.join(output_dir, "results.md"), markdown)

    for dataset, entry in summary["per_dataset"].items():
        print(f"  {dataset}: mean {entry['mean']:.2f} median {entry['median']:.2f}")
    _print_summary("TAGI", summary)
    if base is not None:
        _print_summary("base", base)
    print(
        f"wrote {output_dir}/results.json, results.md, predictions.jsonl "
        f"in {time.time() - start:.0f}s"
    )
    return report


# --------------------------------------------------------------------------------------------
# CLI: rendering


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tagi_jax.evaluation.p3_pipeline",
        description="Render the shared raw P3 records into the P3 layout (render_layout).",
    )
    parser.add_argument("--shared_p3", required=True, help="shared/data/p3")
    parser.add_argument("--out", required=True, help="the P3 directory to write")
    parser.add_argument("--train_datasets", nargs="*", default=None, help="default: all present")
    parser.add_argument("--eval_datasets", nargs="*", default=None, help="default: all present")
    parser.add_argument("--max_examples", type=int, default=None)
    parser.add_argument("--max_templates", type=int, default=None)
    parser.add_argument(
        "--strict",
        action="store_true",
        help="a template that uses a field its records lack is an error, not a warning",
    )
    args = parser.parse_args(argv)
    try:
        counts = render_layout(
            args.shared_p3,
            args.out,
            train_datasets=args.train_datasets,
            eval_datasets=args.eval_datasets,
            max_examples=args.max_examples,
            max_templates=args.max_templates,
            strict=args.strict,
        )
    except (OSError, ValueError) as e:  # MissingFieldError, TemplateRenderError: ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(counts)} tasks ({sum(counts.values())} rows) to {args.out}")
    if counts.missing:
        # Not silent: the per-template warnings may have scrolled by.
        tasks = list(counts.missing)
        shown = ", ".join(tasks[:5]) + (f" (+{len(tasks) - 5} more)" if len(tasks) > 5 else "")
        print(
            f"warning: {counts.missing_renders} renders in {len(tasks)} task(s) used fields "
            f"their records lack, rendered as empty text ({shown}); --strict makes this an error",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
