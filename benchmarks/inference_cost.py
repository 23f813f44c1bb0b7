"""Inference cost of TAGI against Tk-Instruct: examples per second and model FLOPs per example.

The paper (tagi_spec.md §8, §9.1) reports TAGI at x0.39 the FLOPs of Tk-Instruct on SNI, per
task of 100 examples. This script measures both sides at a T5 shape (random weights: the cost
does not depend on their values) on SNI "Def + 2 Pos" lengths:

* **Tk-Instruct** (the Metatrain baseline): the plain T5 reads ``Definition + 2 positive
  examples + input`` concatenated, for every example (``t5.greedy_decode``);
* **TAGI** (``gin_configs/methods/paper.gin``, fusion on): the student reads the input alone.
  Per task the instruction (Definition + 2 positive examples) is encoded and the adapters
  generated once (``tagi.encode_task``) and reused for every example of the task; the decoder
  cross-attends to ``[instruction states ; input states]`` (``tagi.greedy_decode``). The
  per-task cost is spread over the task's examples, in both time and FLOPs, and is also
  printed on its own.

Examples: the first ``--examples_per_task`` instances of the first ``--tasks`` tasks of the
split (SNI test instances start with the official evaluation ones), one batch per task as
``evaluation/comparison.py`` runs them. Token ids are random; only their counts come from the
data. Each stream is padded to its longest example (rounded up to a multiple of 8), one
compilation per variant.

**Lengths** (``--lengths``). There is no T5 SentencePiece model offline, so by default
(``words``) a text's T5 length is estimated as ``ceil(words x --tokens_per_word) + 1`` (EOS),
with whitespace-separated words and 1.3 tokens per word, the usual rule of thumb for English
subword vocabularies of ~32k pieces; the estimate applies alike to both variants, so the
ratios depend on it much less than the absolute numbers. ``spm`` counts with a real
SentencePiece model (``--spm``, e.g. a T5 checkpoint's ``spiece.model``). ``fixed`` imposes
``--fixed_lengths instruction,input,target`` (the Tk-Instruct source is then instruction +
input). The spec's 1024-token source (§2.3) is a cap, not a length: SNI sources average ~220
estimated tokens, so padding to it would mostly measure padding. Counts are cut at 1024
(source, instruction) and 128 (target) as the authors' collator cuts.

**Decoding length.** Random weights make the two models emit EOS at different steps (or at
once), which would compare different amounts of work. Both variants therefore decode exactly
``--decode_steps`` tokens (default: the split's mean target length, EOS included, rounded up):
the backbone config gets ``eos_token_id = -1``, an id ``argmax`` never returns, so
``t5.greedy_loop``'s early exit never fires and its loop runs ``max_decode_len`` steps, the
same incremental-decoding code the evaluation uses.

**Timing**, as ``comparison.py``: a warm-up pass (compilation), then ``--passes`` timed passes
of each variant, interleaved so that a neighbour's burst of load hits both alike, each blocked
on its results (``jax.block_until_ready``); the fastest pass counts. Inputs are placed on the
device beforehand for both. A pass over the per-task encoding alone gives its separate time.

**FLOPs**: ``training.flops.inference_example_flops`` (2 per multiply-add, counted from the
architecture, checked against XLA in the tests) at the mean real lengths (tokens, not padding)
and at the padded lengths the timed code runs; plus the paper's setting: all tasks of the split
at their mean lengths, 100 examples per task.

  python benchmarks/inference_cost.py                           # base, 2 tasks x 8 examples
  python benchmarks/inference_cost.py --size tiny --passes 1    # quick check
  python benchmarks/inference_cost.py --examples_per_task 16 --json /tmp/inference_cost.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np

from tagi_jax import configurables, gin_configs
from tagi_jax.data import ni
from tagi_jax.models import lora, t5, tagi
from tagi_jax.training import flops

HERE = os.path.dirname(os.path.abspath(__file__))
GIN = gin_configs.root()
SNI_DIR = os.path.join(HERE, "..", "..", "shared", "data", "sni")
MAX_SOURCE, MAX_TARGET = 1024, 128  # the authors' collator's cuts (tagi_spec.md §2.3)
PAPER_EXAMPLES_PER_TASK = 100  # the paper counts FLOPs per task of 100 examples (§8)
PAD_MULTIPLE = 8


# --- lengths -----------------------------------------------------------------------------


def _counter(args):
    """``count(text) -> tokens`` (EOS included) for ``--lengths``."""
    if args.lengths == "words":
        return lambda text: math.ceil(len(text.split()) * args.tokens_per_word) + 1
    if args.lengths == "spm":
        import sentencepiece

        model = sentencepiece.SentencePieceProcessor(model_file=args.spm)
        return lambda text: len(model.encode(text)) + 1
    return None


def _lengths(example: dict, count, fixed) -> dict[str, int]:
    """Token counts of one example's streams: the hypernetwork's instruction, TAGI's input,
    Tk-Instruct's source and the first reference (what an evaluation scores against)."""
    if fixed is not None:
        instruction, inputs, target = fixed
        source = instruction + inputs - 1  # one EOS for the concatenation
    else:
        instruction, inputs = count(example["hyper_inputs"]), count(example["inputs"])
        source, target = count(example["teacher_inputs"]), count(example["references"][0])
    return {
        "instruction": min(instruction, MAX_SOURCE),
        "input": min(inputs, MAX_SOURCE),
        "source": min(source, MAX_SOURCE),
        "target": min(target, MAX_TARGET),
    }


def load_examples(args) -> dict[str, list[dict]]:
    """``{task: [lengths of each example]}`` of every task of the split, in split order: the
    first ``--examples_per_task`` are timed, all of them (up to 100) give the paper's
    setting."""
    config = ni.NIConfig(
        num_pos_examples=2,
        student_input="input_only",  # TAGI's student; the source is Tk-Instruct's input
        eval_instances_per_task=PAPER_EXAMPLES_PER_TASK,
    )
    count = _counter(args)
    fixed = None
    if args.lengths == "fixed":
        fixed = tuple(int(x) for x in args.fixed_lengths.split(","))
    tasks: dict[str, list[dict]] = {}
    for example in ni.iter_examples(args.data_dir, args.split, config):
        tasks.setdefault(example["task_name"], []).append(_lengths(example, count, fixed))
    return tasks


def _padded(length: float) -> int:
    return int(math.ceil(length / PAD_MULTIPLE) * PAD_MULTIPLE)


def _mean(rows, key) -> float:
    return float(statistics.mean(r[key] for r in rows))


# --- models and inputs -------------------------------------------------------------------


def build(size: str, scan_layers: bool):
    """TAGI as the paper describes it at ``size``, with a backbone that never stops early,
    and its random parameters."""
    gin.clear_config()
    gin.parse_config_file(os.path.join(GIN, "models", f"t5_1_1_{size}.gin"))
    gin.parse_config_file(os.path.join(GIN, "methods", "paper.gin"))
    config = configurables.tagi_config()
    backbone = config.t5.replace(dropout_rate=0.0, scan_layers=scan_layers, eos_token_id=-1)
    config = config.replace(t5=backbone)
    params = jax.jit(functools.partial(tagi.init_params, config))(jax.random.key(0))
    # The B generators start at zero (zero_b init): make the adapters live, so nothing could be
    # skipped for being zero (XLA does not, but the measurement should not rely on it).
    params["hypernet"] = jax.tree.map(lambda x: x + 1e-3, params["hypernet"])
    return config, params


def _tokens(rng, lengths, padded: int, width: int) -> np.ndarray:
    """Random ids (2.. so never padding or EOS) over each row's length, padding after."""
    out = np.zeros((len(lengths), padded), np.int32)
    for row, n in enumerate(lengths):
        out[row, :n] = rng.integers(2, width, n)
    return out


def make_inputs(config, timed: dict[str, list[dict]], pads: dict[str, int], batch: int):
    """Per task: Tk-Instruct's source batches, TAGI's input batches, its instruction
    ``[1, length]`` and the instruction broadcast to a batch (the fused memory's mask)."""
    rng = np.random.default_rng(0)
    width = config.t5.logits_width
    tasks = []
    for rows in timed.values():
        instruction = _tokens(rng, [rows[0]["instruction"]], pads["instruction"], width)
        chunks = []
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            # pad every batch to `batch` rows, as ni_eval does: one compilation for all
            chunk = chunk + [chunk[-1]] * (batch - len(chunk))
            chunks.append(
                {
                    "source": _tokens(rng, [r["source"] for r in chunk], pads["source"], width),
                    "input": _tokens(rng, [r["input"] for r in chunk], pads["input"], width),
                }
            )
        tasks.append(
            {
                "instruction": jnp.asarray(instruction),
                "hyper": jnp.asarray(np.repeat(instruction, batch, axis=0)),
                "chunks": [
                    {**c, "source": jnp.asarray(c["source"]), "input": jnp.asarray(c["input"])}
                    for c in chunks
                ],
            }
        )
    return tasks


# --- the timed passes --------------------------------------------------------------------


def tk_instruct_pass(config, params, tasks, steps):
    outs = []
    for task in tasks:
        for chunk in task["chunks"]:
            outs.append(
                t5.greedy_decode(config.t5, params["t5"], chunk["source"], max_decode_len=steps)
            )
    return outs


def tagi_pass(config, params, tasks, steps, per_row_adapters=False):
    outs = []
    for task in tasks:
        # once per task: the instruction's states (fusion) and its adapters
        states, adapters = tagi.encode_task(config, params, task["instruction"])
        if per_row_adapters:
            # one row of adapters per example: greedy_decode then projects the instruction's
            # part of the fused memory for every row (what --per_row_adapters measures)
            adapters = lora.take(adapters, jnp.zeros(task["hyper"].shape[0], jnp.int32))
        for chunk in task["chunks"]:
            batch = {"encoder_input_tokens": chunk["input"], "hyper_input_tokens": task["hyper"]}
            outs.append(
                tagi.greedy_decode(
                    config,
                    params,
                    batch,
                    max_decode_len=steps,
                    # the task's adapters, one row: greedy_decode expands them over the batch
                    # and projects the task's part of the fused memory once
                    adapters=adapters,
                    instruction_states=states,
                )
            )
    return outs


def encode_pass(config, params, tasks, steps):
    del steps
    return [tagi.encode_task(config, params, task["instruction"]) for task in tasks]


def _run(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


# --- report ------------------------------------------------------------------------------


def _machine() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "jax_backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="base", help="t5_1_1_<size>.gin: base, small, tiny")
    parser.add_argument("--tasks", type=int, default=2, help="first N tasks of the split")
    parser.add_argument("--examples_per_task", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=32, help="rows per decode call")
    parser.add_argument("--passes", type=int, default=3, help="timed passes; fastest counts")
    parser.add_argument("--split", default="test", choices=("test", "train"))
    parser.add_argument("--data_dir", default=SNI_DIR)
    parser.add_argument("--lengths", default="words", choices=("words", "spm", "fixed"))
    parser.add_argument("--tokens_per_word", type=float, default=1.3)
    parser.add_argument("--spm", help="a SentencePiece model, for --lengths spm")
    parser.add_argument("--fixed_lengths", help="instruction,input,target for --lengths fixed")
    parser.add_argument("--decode_steps", type=int, help="default: the split's mean target")
    parser.add_argument("--scan_layers", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--per_row_adapters",
        action="store_true",
        help="give TAGI's decoding one row of adapters per example (the slower form) instead of "
        "the task's one row",
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.lengths == "spm" and not args.spm:
        parser.error("--lengths spm needs --spm PATH")
    if args.lengths == "fixed" and not args.fixed_lengths:
        parser.error("--lengths fixed needs --fixed_lengths instruction,input,target")
    if min(args.tasks, args.examples_per_task, args.batch_size, args.passes) < 1:
        parser.error("--tasks, --examples_per_task, --batch_size and --passes must be >= 1")
    wall = time.perf_counter()

    all_tasks = load_examples(args)
    if args.tasks > len(all_tasks):
        parser.error(f"--tasks {args.tasks}: the {args.split} split has {len(all_tasks)}")
    names = list(all_tasks)[: args.tasks]
    timed = {n: all_tasks[n][: args.examples_per_task] for n in names}
    short = {n: len(r) for n, r in timed.items() if len(r) < args.examples_per_task}
    if short:
        print(f"note: fewer instances than --examples_per_task in {short}")
    every = [r for rows in all_tasks.values() for r in rows]
    steps = args.decode_steps or math.ceil(_mean(every, "target"))
    timed_rows = [r for rows in timed.values() for r in rows]
    mean = {k: _mean(timed_rows, k) for k in ("instruction", "input", "source", "target")}
    pads = {k: _padded(max(r[k] for r in timed_rows)) for k in ("instruction", "input", "source")}
    batch = min(args.batch_size, max(len(r) for r in timed.values()))
    examples = len(timed_rows)
    per_task = examples / len(timed)

    machine = _machine()
    config, params = build(args.size, args.scan_layers)
    plain = config.replace(fusion=False, hyper=dataclasses.replace(config.hyper, targets=()))
    n_t5 = sum(int(x.size) for x in jax.tree.leaves(params["t5"]))
    n_hyper = sum(int(x.size) for x in jax.tree.leaves(params["hypernet"]))
    how = {
        "words": f"estimated as ceil(words x {args.tokens_per_word}) + EOS",
        "spm": f"counted with {args.spm}",
        "fixed": f"fixed {args.fixed_lengths}",
    }[args.lengths]
    print(
        f"machine: {machine['cpu_count']} CPUs ({machine['cpus_usable']} usable, load "
        f"{machine['load_average_1m']:.2f}), jax {machine['jax']} backend {machine['jax_backend']} "
        f"({machine['device']} x{machine['device_count']})"
    )
    print(
        f"model: t5_1_1_{args.size} ({n_t5:,} params, scan_layers={args.scan_layers}) + "
        f"hypernetwork {n_hyper:,} (paper.gin: rank {config.hyper.rank}, "
        f"{len(config.hyper.targets)} targets, fusion {config.fusion}); random weights"
    )
    print(
        f"data: {args.split} split of {os.path.normpath(args.data_dir)}, timed {len(timed)} tasks "
        f"x {args.examples_per_task} examples ({', '.join(names)}), batch {batch}"
    )
    print(f"lengths (tokens, {how}):")
    print(
        f"  mean   instruction {mean['instruction']:.1f}, input {mean['input']:.1f}, "
        f"Tk-Instruct source {mean['source']:.1f}, target {mean['target']:.1f}"
    )
    print(
        f"  padded instruction {pads['instruction']}, input {pads['input']}, "
        f"Tk-Instruct source {pads['source']}; decode steps {steps} (forced, both variants)"
    )

    tasks = make_inputs(config, timed, pads, batch)
    variants = {
        "Tk-Instruct": functools.partial(tk_instruct_pass, config, params, tasks, steps),
        "TAGI": functools.partial(tagi_pass, config, params, tasks, steps, args.per_row_adapters),
        "encode": functools.partial(encode_pass, config, params, tasks, steps),
    }
    first = {name: _run(fn) for name, fn in variants.items()}  # warm-up: compiles
    times = {name: [] for name in variants}
    for _ in range(args.passes):
        for name, fn in variants.items():
            times[name].append(_run(fn))
    best = {name: min(t) for name, t in times.items()}

    def counted(model, lengths, per_task_examples):
        return flops.inference_example_flops(
            model,
            input_tokens=lengths["input"],
            target_tokens=steps,
            instruction_tokens=lengths["instruction"],
            examples_per_task=per_task_examples,
            hypernetwork_parameters=n_hyper,
        )

    def both(lengths, per_task_examples):
        tk = counted(plain, {**lengths, "input": lengths["source"]}, per_task_examples)
        return tk, counted(config, lengths, per_task_examples)

    tk_flops, tagi_flops = both(mean, per_task)
    tk_padded, tagi_padded = both({k: float(v) for k, v in pads.items()}, per_task)
    split_mean = {k: _mean(every, k) for k in ("instruction", "input", "source")}
    tk_paper, tagi_paper = both(split_mean, PAPER_EXAMPLES_PER_TASK)

    encode_per_task = best["encode"] / len(timed)
    rows = {
        "Tk-Instruct": {
            "encoder_tokens": mean["source"],
            "flops": tk_flops,
            "flops_padded": tk_padded["total"],
            "seconds": best["Tk-Instruct"],
        },
        "TAGI": {
            "encoder_tokens": mean["input"] + mean["instruction"] / per_task,
            "flops": tagi_flops,
            "flops_padded": tagi_padded["total"],
            "seconds": best["TAGI"],
            "instruction_per_task_seconds": encode_per_task,
            "instruction_per_example_seconds": encode_per_task / per_task,
        },
    }
    for name, row in rows.items():
        row.update(
            decode_steps=steps,
            examples=examples,
            examples_per_second=examples / row["seconds"],
            seconds_per_example=row["seconds"] / examples,
            first_pass_seconds=first[name],
            pass_seconds=times[name],
        )
    tk, tg = rows["Tk-Instruct"], rows["TAGI"]
    flops_ratio = tg["flops"]["total"] / tk["flops"]["total"]
    padded_ratio = tg["flops_padded"] / tk["flops_padded"]
    time_ratio = tg["seconds_per_example"] / tk["seconds_per_example"]
    paper_ratio = tagi_paper["total"] / tk_paper["total"]

    print(
        f"\ntimed: warm-up + fastest of {args.passes} passes of {examples} examples "
        f"(first passes, with compilation: Tk-Instruct {first['Tk-Instruct']:.1f}s, TAGI "
        f"{first['TAGI']:.1f}s)\n"
    )
    print(
        "| model | encoder tokens / example | decode steps | MFLOPs / example "
        "| MFLOPs / example (padded) | examples / s | ms / example |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(
            f"| {name} | {row['encoder_tokens']:.1f} | {steps} | {row['flops']['total'] / 1e6:,.0f}"
            f" | {row['flops_padded'] / 1e6:,.0f} | {row['examples_per_second']:.2f} "
            f"| {row['seconds_per_example'] * 1e3:.1f} |"
        )
    print(
        f"| TAGI / Tk-Instruct | x{tg['encoder_tokens'] / tk['encoder_tokens']:.2f} | | "
        f"x{flops_ratio:.2f} | x{padded_ratio:.2f} | | x{time_ratio:.2f} |"
    )
    parts = tagi_flops
    print(
        f"\nTAGI per example, MFLOPs: encoder {parts['encoder'] / 1e6:,.0f}, decoder "
        f"{parts['decoder'] / 1e6:,.0f}, adapters {parts['adapters'] / 1e6:,.0f}, instruction "
        f"(per task / {per_task:g} examples) {parts['instruction_per_task'] / 1e6:,.0f}"
    )
    print(
        f"TAGI per task: instruction encoding + adapters {encode_per_task * 1e3:.1f} ms, "
        f"{parts['instruction_per_task'] * per_task / 1e6:,.0f} MFLOPs; per example "
        f"{encode_per_task / per_task * 1e3:.1f} ms ({encode_per_task * len(timed) / tg['seconds']:.0%}"
        " of TAGI's time)"
    )
    print(
        f"paper's setting (all {len(all_tasks)} {args.split} tasks at their mean lengths, "
        f"{PAPER_EXAMPLES_PER_TASK} examples per task): TAGI {tagi_paper['total'] / 1e6:,.0f} vs "
        f"Tk-Instruct {tk_paper['total'] / 1e6:,.0f} MFLOPs / example, x{paper_ratio:.2f}"
    )
    # The paper's only FLOPs ratio is SNI's x0.39 vs Tk-Instruct (Table 2, per task of 100
    # examples); its only time ratio is P3's x0.88 vs Metatrain at batch size 1 (Table 3).
    print(
        f"\nTAGI / Tk-Instruct: FLOPs x{flops_ratio:.2f} ({per_task:g} examples / task; "
        f"x{paper_ratio:.2f} at {PAPER_EXAMPLES_PER_TASK}), time x{time_ratio:.2f} "
        f"(paper: x0.39 FLOPs on SNI; time only on P3, x0.88 vs Metatrain)"
    )
    elapsed = time.perf_counter() - wall
    print(f"wall time {elapsed:.0f}s (CPU timings are noisy on a shared machine)")

    if args.json:
        result = {
            "args": vars(args),
            "machine": machine,
            "model": {"size": args.size, "t5_params": n_t5, "hypernet_params": n_hyper},
            "tasks": names,
            "lengths": {
                "how": how,
                "mean": mean,
                "padded": pads,
                "split_mean": split_mean,
                "decode_steps": steps,
                "batch": batch,
            },
            "rows": rows,
            "ratios": {
                "flops": flops_ratio,
                "flops_padded": padded_ratio,
                "time_per_example": time_ratio,
                "flops_paper_setting": paper_ratio,
            },
            "paper_setting": {"Tk-Instruct": tk_paper, "TAGI": tagi_paper},
            "wall_seconds": elapsed,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
