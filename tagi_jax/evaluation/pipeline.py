"""The evaluation behind ``python -m tagi_jax.evaluate`` (gin: ``evaluate``, registered in
``tagi_jax.configurables``): score an export on natural-instructions tasks.

Reads an export (``tagi_jax.artifacts.export_format``), takes its defaults from it, formats a
split of a natural-instructions directory (SNI's layout or the built-in suite of
``tagi_jax.data.synthetic.write_suite``) with ``ni.iter_examples``, decodes greedily with
adapters generated once per task (``ni_eval.evaluate``) and writes to ``OUTPUT_DIR`` (local or
``gs://...``; the export may be in cloud storage too):

* ``results.json``: ``overall``, ``per_category`` and ``per_task`` ROUGE-L / exact match (percent)
  and the settings; with ``evaluate.compare_base = True`` also ``base``, the backbone alone.
* ``predictions.jsonl``: one line per example: ``task_name``, ``id``, ``category``,
  ``prediction``, ``references`` and the example's ``rougeL`` / ``exact_match``.
* ``results.md``: the per-category tables (``ni_metrics.markdown_table``).

Flags are ``tagi_jax.train``'s (``--gin_file``, ``--gin_bindings``, ``--gin.NAME=VALUE``). Bad
input (missing export or data directory, unknown split, ...) is one ``error:`` line, exit code 2.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import time
from collections.abc import Callable

from tagi_jax import paths
from tagi_jax.data.ni import NIConfig


def _summary(results: dict) -> dict:
    return {k: results[k] for k in ("overall", "per_category", "per_task")}


def _example_scores(prediction: str, references: list[str]) -> dict[str, float]:
    from tagi_jax.evaluation import ni_metrics

    return {
        "rougeL": 100.0
        * ni_metrics.best_over_references(ni_metrics.rouge_l, prediction, references),
        "exact_match": 100.0
        * ni_metrics.best_over_references(ni_metrics.exact_match, prediction, references),
    }


def write_report(
    output_dir: str,
    examples: list[dict],
    results: dict,
    base: dict | None = None,
    *,
    header: dict | None = None,
    title: str = "TAGI",
) -> dict:
    """Writes ``predictions.jsonl``, ``results.json`` and ``results.md`` for ``results`` (and
    ``base``: the backbone alone), ``ni_eval.evaluate`` outputs over ``examples``; returns the
    ``results.json`` content (``header`` first)."""
    from tagi_jax.evaluation import ni_metrics

    header = header or {}
    paths.makedirs(output_dir)
    predictions_path = paths.join(output_dir, "predictions.jsonl")
    with io.StringIO() as f:
        for i, example in enumerate(examples):
            line = {
                "task_name": example["task_name"],
                "id": example["instance_id"],
                "category": example["category"],
                "prediction": results["predictions"][i],
                "references": example["references"],
                **_example_scores(results["predictions"][i], example["references"]),
            }
            if base is not None:
                scores = _example_scores(base["predictions"][i], example["references"])
                line |= {
                    "base_prediction": base["predictions"][i],
                    "base_rougeL": scores["rougeL"],
                    "base_exact_match": scores["exact_match"],
                }
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
        paths.write_text(predictions_path, f.getvalue())
    report = {
        **header,
        **_summary(results),
        "predictions_file": paths.basename(predictions_path),
    }
    if base is not None:
        report["base"] = _summary(base)
    paths.write_json(paths.join(output_dir, "results.json"), report, sort_keys=False)
    markdown = ni_metrics.markdown_table(results, title)
    if base is not None:
        markdown += "\n" + ni_metrics.markdown_table(base, "backbone alone, no adapters")
    paths.write_text(paths.join(output_dir, "results.md"), markdown)

    return report


def _ni_for_export(data: dict, ni: NIConfig | Callable[[dict], NIConfig] | None) -> NIConfig:
    """``ni`` if an ``NIConfig``; else the export's NIConfig (``ni`` called with its fields,
    when a function: gin's puts the run file's ``NIConfig.*`` bindings on top)."""
    if isinstance(ni, NIConfig):
        return ni
    trained = data.get("ni") or {}
    return NIConfig(**trained) if ni is None else ni(trained)


def evaluate(
    *,
    export_dir: str,
    output_dir: str,
    task_dir: str,
    split: str = "test",
    ni: NIConfig | Callable[[dict], NIConfig] | None = None,
    vocabulary: str | None = None,
    input_length: int | None = None,
    instruction_length: int | None = None,
    max_decode_len: int | None = None,
    batch_size: int = 32,
    beam_size: int = 1,
    length_penalty_alpha: float = 0.6,
    compare_base: bool = False,
) -> dict:
    """Evaluates the export in ``export_dir`` on ``split`` of ``task_dir``; returns what
    ``results.json`` holds.

    Unset settings come from the export (``data.json``: what the student trained with):
    ``vocabulary`` (an override must be the same vocabulary), ``input_length``,
    ``instruction_length`` and ``max_decode_len`` (the feature lengths), and ``ni``, how the
    examples are formatted: the export's ``NIConfig`` (under gin, with the run file's
    ``NIConfig.<field>`` bindings on top; or a function of the export's fields that gives it): ``student_input``, ``num_pos_examples`` (demonstrations in the
    instruction: the paper evaluates a Def-trained student on Def + 2 Pos too),
    ``eval_instances_per_task`` (the first 100 of each task; on the ``train`` split
    ``max_train_instances_per_task``, the seeded draw training uses), ``max_source_length``.
    ``beam_size`` 1 is greedy decoding (the paper's); larger beams use t5x's length penalty
    ``length_penalty_alpha``.
    ``compare_base``: also decode with the backbone alone (no adapters, no instruction).
    """
    from tagi_jax.artifacts import export_format
    from tagi_jax.data import ni as ni_lib
    from tagi_jax.data import vocab as vocab_lib
    from tagi_jax.evaluation import ni_eval

    start = time.time()
    export_dir, task_dir = paths.absolute(export_dir), paths.absolute(task_dir)
    output_dir = paths.absolute(output_dir)
    data = export_format.read_data(export_dir)  # a missing / incomplete export fails here
    ni = _ni_for_export(data, ni)
    if not paths.isdir(task_dir):
        raise FileNotFoundError(f"task directory does not exist: {task_dir}")
    if batch_size < 1:
        raise ValueError(f"evaluate.batch_size must be >= 1, got {batch_size}")
    lengths = {**data.get("feature_lengths", {})}
    input_length = input_length or lengths.get("inputs", 1024)
    instruction_length = instruction_length or lengths.get("hyper_inputs", 1024)
    max_decode_len = max_decode_len or lengths.get("targets", 128)
    if ni.streams_shorter_than_budget({"inputs": input_length}):
        raise ValueError(
            f"evaluate.input_length={input_length} is shorter than NIConfig.max_source_length="
            f"{ni.max_source_length}: the student's source would lose its input after the budget "
            "dropped demonstrations to keep it"
        )
    ni_lib.read_split(task_dir, split)  # an unknown split fails here, naming the files looked for
    vocabulary = export_format.vocabulary_for(
        export_format.vocabulary_spec(export_dir), vocabulary, "evaluate.vocabulary"
    )
    vocab = vocab_lib.from_name(vocabulary)
    examples = list(ni_lib.iter_examples(task_dir, split, ni, vocabulary=vocab))

    # Refuses parameters holding NaN or Inf, before anything is written to output_dir.
    loaded = export_format.load(export_dir)
    model, params = loaded.config, loaded.params
    per_task = collections.Counter(e["task_name"] for e in examples)
    # Every batch is padded to batch_size rows (one compilation for the whole evaluation):
    # no more rows than the largest task has, or small tasks decode mostly padding.
    rows = min(batch_size, max(per_task.values()))
    print(
        f"evaluating {export_dir} on {len(examples)} examples of {len(per_task)} tasks "
        f"({task_dir}, split {split!r}), batch {rows}"
    )
    settings = {
        "input_length": input_length,
        "instruction_length": instruction_length,
        "max_decode_len": max_decode_len,
        "batch_size": rows,
    }
    decoding = {"beam_size": beam_size, "alpha": length_penalty_alpha, "progress": True}
    results = ni_eval.evaluate(
        model, params, examples, vocab, use_adapters=True, **settings, **decoding
    )
    base = None
    if compare_base:
        base = ni_eval.evaluate(
            model, params, examples, vocab, use_adapters=False, **settings, progress=True
        )

    header = {
        "export_dir": export_dir,
        "step": loaded.info.get("step"),
        "task_dir": task_dir,
        "split": split,
        "settings": {
            "ni": {**dataclasses.asdict(ni), "num_pos_examples": ni.pos_examples},
            "vocabulary": vocabulary,
            "input_length": input_length,
            "instruction_length": instruction_length,
            "max_decode_len": max_decode_len,
            "beam_size": beam_size,
            "length_penalty_alpha": length_penalty_alpha,
        },
    }
    report = write_report(
        output_dir, examples, results, base, header=header, title=f"TAGI ({export_dir}, {split})"
    )

    o = results["overall"]
    print(f"TAGI: ROUGE-L {o['rougeL']:.2f}  EM {o['exact_match']:.2f}  ({o['count']} examples)")
    if base is not None:
        b = base["overall"]
        print(f"base: ROUGE-L {b['rougeL']:.2f}  EM {b['exact_match']:.2f}  (no adapters)")
    print(
        f"wrote {output_dir}/results.json, results.md, predictions.jsonl "
        f"in {time.time() - start:.0f}s"
    )
    return report
