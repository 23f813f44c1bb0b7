"""The paper's comparison table: several exported models scored on the same held-out tasks, with
what each costs at inference.

A row is one export and how it reads an example (``NIConfig.student_input`` and the input
length it was trained with). For every row, on the same examples:

* ROUGE-L and exact match (the official SNI definitions, ``ni_metrics``), overall, per
  category and per task;
* encoder tokens per example: the student's own input, plus, for a model that reads the
  instruction through the hypernetwork or fusion, the instruction's tokens shared by the
  examples of its task (it is encoded once per task, ``tagi.encode_task``);
* model FLOPs per example (``training.flops.inference_example_flops``: the count a train
  step's forward uses), with the answer's tokens as the decoder's length;
* examples per second, measured: greedy decoding of every example after one warm-up task
  (compilation excluded), the fastest of ``Settings.timed_passes`` passes, with TAGI's
  adapters and encoded instruction computed once per task and Tk-Instruct-style models
  reading the Definition in every example.

Token counts are the real ones (EOS included, cut at the evaluation lengths), not the padded
lengths, so the costs do not depend on how generous a length setting is.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import tempfile
import time

import jax
import numpy as np

from tagi_jax import paths
from tagi_jax.data.ni import NIConfig


@dataclasses.dataclass(frozen=True)
class Row:
    """One model of the table.

    Attributes:
      label: its name in the table ("TAGI", "metatrain", ...).
      export_dir: a ``python -m tagi_jax.export`` directory.
      student_input: what its student reads (``ni.STUDENT_INPUTS``): ``input_only`` for TAGI
        and the base, ``teacher_source`` (Definition + input) for metatrain.
      input_length: the student's input length in tokens (its training ``inputs`` length).
      about: one line saying what the row is, for the report.
    """

    label: str
    export_dir: str
    student_input: str
    input_length: int
    about: str = ""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every row shares: the tasks and the decoding."""

    task_dir: str
    split: str = "test"
    vocabulary: str = "byte"
    instruction_length: int = 128
    max_decode_len: int = 40
    batch_size: int = 32
    eval_instances_per_task: int = 100
    timed_passes: int = 3


def row_for_run(label: str, model_dir: str, export_dir: str, about: str = "") -> Row:
    """The row of a training run exported to ``export_dir``: its student input and input length
    come from the run's own ``run.json``, so it is scored as it was trained."""
    from tagi_jax import export

    data = export.read_run(model_dir)["data"]
    return Row(
        label=label,
        export_dir=export_dir,
        student_input=data["ni"]["student_input"],
        input_length=dict(data["feature_lengths"])["inputs"],
        about=about,
    )


def settings_for_run(model_dir: str, task_dir: str, split: str, **more) -> Settings:
    """Settings with the vocabulary, instruction length and answer length a TAGI training run
    used (its ``run.json``); ``more``: other ``Settings`` fields."""
    from tagi_jax import export

    data = export.read_run(model_dir)["data"]
    lengths = dict(data["feature_lengths"])
    return Settings(
        task_dir=task_dir,
        split=split,
        vocabulary=data["vocabulary"],
        instruction_length=lengths["hyper_inputs"],
        max_decode_len=lengths["targets"],
        **more,
    )


def _token_count(vocabulary, text: str, length: int) -> int:
    return min(len(vocabulary.encode(text)) + 1, length)  # + EOS, cut as encode_padded cuts


def score_row(row: Row, settings: Settings) -> dict:
    """Scores and costs ``row`` on ``settings.split``: a dict with ``overall``,
    ``per_category``, ``per_task`` (``ni_metrics.score``), ``predictions`` and ``examples``
    (task, id and references of each), ``cost`` and ``row``."""
    from tagi_jax.artifacts import export_format
    from tagi_jax.data import ni as ni_lib
    from tagi_jax.data import vocab as vocab_lib
    from tagi_jax.evaluation import ni_eval
    from tagi_jax.training import flops

    vocab = vocab_lib.from_name(settings.vocabulary)
    ni = NIConfig(
        num_pos_examples=0,
        student_input=row.student_input,
        eval_instances_per_task=settings.eval_instances_per_task,
    )
    examples = list(ni_lib.iter_examples(settings.task_dir, settings.split, ni, vocabulary=vocab))
    if not examples:
        raise ValueError(f"no {settings.split!r} examples in {settings.task_dir}")
    loaded = export_format.load(row.export_dir)
    model, params = loaded.config, loaded.params
    if vocab.vocab_size > model.t5.logits_width:
        raise ValueError(
            f"{row.label}: vocabulary {settings.vocabulary!r} has {vocab.vocab_size} ids, the "
            f"export {row.export_dir} predicts {model.t5.logits_width}"
        )
    per_task_count = collections.Counter(e["task_name"] for e in examples)
    tasks = sorted(per_task_count)
    rows = min(settings.batch_size, max(per_task_count.values()))
    lengths = {
        "input_length": row.input_length,
        "instruction_length": settings.instruction_length,
        "max_decode_len": settings.max_decode_len,
        "batch_size": rows,
    }
    # Warm-up on one task, so that the timed passes measure decoding, not compilation. The
    # fastest of `timed_passes` is kept: a pass takes seconds on a CPU, where a neighbour's
    # burst of work would otherwise decide the column.
    warm = [e for e in examples if e["task_name"] == tasks[0]][:rows]
    ni_eval.evaluate(model, params, warm, vocab, **lengths)
    times = []
    for _ in range(settings.timed_passes):
        start = time.perf_counter()
        results = ni_eval.evaluate(model, params, examples, vocab, **lengths)
        times.append(time.perf_counter() - start)
    seconds = min(times)

    input_tokens = np.mean([_token_count(vocab, e["inputs"], row.input_length) for e in examples])
    instruction_tokens = np.mean(
        [_token_count(vocab, e["hyper_inputs"], settings.instruction_length) for e in examples]
    )
    target_tokens = np.mean(
        [_token_count(vocab, e["references"][0], settings.max_decode_len) for e in examples]
    )
    per_task = len(examples) / len(tasks)
    hyper_parameters = sum(int(x.size) for x in jax.tree.leaves(params.get("hypernet", {})))
    counted = flops.inference_example_flops(
        model,
        input_tokens=float(input_tokens),
        target_tokens=float(target_tokens),
        instruction_tokens=float(instruction_tokens),
        examples_per_task=per_task,
        hypernetwork_parameters=hyper_parameters,
    )
    # the flops count's rule for what reads the instruction (adapters, fusion, cross-attention)
    reads_instruction = counted["instruction_per_task"] > 0
    encoder_tokens = input_tokens + (instruction_tokens / per_task if reads_instruction else 0.0)
    results["cost"] = {
        "encoder_tokens": float(encoder_tokens),
        "input_tokens": float(input_tokens),
        "instruction_tokens": float(instruction_tokens) if reads_instruction else 0.0,
        "target_tokens": float(target_tokens),
        "examples_per_task": per_task,
        "flops": counted,
        "examples_per_second": len(examples) / seconds,
        "seconds": seconds,
    }
    results["row"] = dataclasses.asdict(row)
    results["examples"] = [
        {"task_name": e["task_name"], "id": e["instance_id"], "references": e["references"]}
        for e in examples
    ]
    return results


def _mega(flops: float) -> str:
    return f"{flops / 1e6:.2f}"


def table(results: dict[str, dict], reference: str | None = None) -> list[str]:
    """The comparison as markdown lines, a row per model (``results``: label -> ``score_row``
    output, in table order). ``reference``: the label FLOPs are also given relative to."""
    header = (
        "| model | ROUGE-L | exact match | encoder tokens / example | MFLOPs / example "
        "| FLOPs vs " + (reference or "-") + " | examples / s |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    ref = results.get(reference, {}).get("cost", {}).get("flops", {}).get("total")
    for label, r in results.items():
        o, c = r["overall"], r["cost"]
        ratio = f"{c['flops']['total'] / ref:.2f}x" if ref else "-"
        lines.append(
            f"| {label} | {o['rougeL']:.1f} | {o['exact_match']:.1f} | "
            f"{c['encoder_tokens']:.1f} | {_mega(c['flops']['total'])} | {ratio} | "
            f"{c['examples_per_second']:.0f} |"
        )
    return lines


def category_table(results: dict[str, dict], metric: str = "rougeL") -> list[str]:
    """Per-category ``metric`` of every row, as markdown lines (a column per model)."""
    labels = list(results)
    categories = sorted(next(iter(results.values()))["per_category"])
    lines = [
        "| category | " + " | ".join(labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    for category in categories:
        cells = [f"{results[x]['per_category'][category][metric]:.1f}" for x in labels]
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return lines


def write(
    out_dir: str,
    results: dict[str, dict],
    *,
    reference: str | None,
    preamble: list[str] = (),
    curves: dict[str, list[tuple[int, float]]] | None = None,
    title: str = "",
    tasks: str = "held-out",
) -> dict[str, str]:
    """Writes ``results.md`` (the table, then per-category ROUGE-L and exact match),
    ``results.json`` (everything but the predictions), ``predictions.jsonl`` (a line per
    example and model) and ``results.png`` (``plots.write_figure``: per-category ROUGE-L and
    the training ``curves``, each stage's cross-entropy by step) into ``out_dir``; returns
    their paths. ``tasks`` names the tasks scored in the headings ("held-out",
    "validation")."""
    from tagi_jax.evaluation import plots

    paths.makedirs(out_dir)
    files = {
        name: paths.join(out_dir, name)
        for name in ("results.md", "results.json", "predictions.jsonl", "results.png")
    }
    md = [*preamble, *table(results, reference), ""]
    md += [f"## {tasks.capitalize()} ROUGE-L per category", "", *category_table(results), ""]
    md += [
        f"## {tasks.capitalize()} exact match per category",
        "",
        *category_table(results, "exact_match"),
    ]
    md += ["", "## The rows", ""]
    md += [f"- **{label}**: {r['row']['about']}" for label, r in results.items()]
    _write_text(files["results.md"], "\n".join(md) + "\n")
    summary = {
        label: {k: v for k, v in r.items() if k not in ("predictions", "examples")}
        for label, r in results.items()
    }
    _write_text(files["results.json"], json.dumps(summary, indent=2) + "\n")
    with io.StringIO() as f:
        for label, r in results.items():
            for example, prediction in zip(r["examples"], r["predictions"], strict=True):
                line = {"model": label, **example, "prediction": prediction}
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        _write_text(files["predictions.jsonl"], f.getvalue())
    figure = files["results.png"]
    with tempfile.TemporaryDirectory() as local:
        # matplotlib writes local files: a figure for cloud storage is drawn here, then copied
        plots.write_figure(
            paths.join(local, "results.png") if paths.is_uri(figure) else figure,
            {
                label: {k: v["rougeL"] for k, v in r["per_category"].items()}
                for label, r in results.items()
            },
            curves or {},
            title=title,
            curves_label="training cross-entropy",
            scores_label=f"{tasks} ROUGE-L",
        )
        if paths.is_uri(figure):
            paths.copyfile(paths.join(local, "results.png"), figure)
    return files


def _write_text(path: str, text: str) -> None:
    paths.write_text(path, text)  # atomic: a temporary file and a rename, or one object
