"""The main job (the README's first command): a small TAGI trained on the built-in instruction
suite on a laptop CPU, then scored on tasks it never saw.

It runs the same pieces a user runs at scale, in one process:

1. writes the built-in suite (``tagi_jax.data.synthetic``): 54 training tasks, 18 validation
   and 19 held-out test tasks whose parameters never appear together in training;
2. ``runs/suite_base.gin`` (``python -m tagi_jax.train``): the base model, a byte-level T5
   trained from scratch on the training tasks' inputs alone;
3. ``runs/suite_tagi.gin``: TAGI on that frozen base; the hypernetwork reads each task's
   Definition and generates LoRA adapters;
4. ``python -m tagi_jax.export``: the self-contained inference checkpoint;
5. ``python -m tagi_jax.evaluate`` with ``runs/evaluate_suite_main_job.gin``: greedy decoding on
   the held-out tasks, ROUGE-L and exact match for (a) the base model with no adapters and
   (b) TAGI, adapters generated once per task.

Run: ``python -m tagi_jax.demos.main_job [--workdir runs/main_job] [--fresh]``; a second run
resumes finished stages from their checkpoints. ``--base_steps`` / ``--tagi_steps`` change the
run files' step counts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

from tagi_jax import train as train_cli


def _flags(gin_file: str, bindings: dict[str, object]) -> list[str]:
    return [f"--gin_file={gin_file}", *(f"--gin.{k}={v!r}" for k, v in bindings.items())]


def _stage(gin_file: str, bindings: dict[str, object]) -> None:
    """One ``python -m tagi_jax.train`` run, in this process."""
    from tagi_jax.training import stages

    with train_cli.configured(_flags(gin_file, bindings)):
        stages.run()


def _evaluate(gin_file: str, bindings: dict[str, object]) -> dict:
    """``python -m tagi_jax.evaluate``, in this process."""
    from tagi_jax.evaluation import pipeline

    with train_cli.configured(_flags(gin_file, bindings)):
        return pipeline.evaluate()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tagi_jax.demos.main_job", description=__doc__)
    parser.add_argument("--workdir", default=os.path.join("runs", "main_job"))
    parser.add_argument("--base_steps", type=int, default=None, help="default: suite_base.gin's")
    parser.add_argument("--tagi_steps", type=int, default=None, help="default: suite_tagi.gin's")
    parser.add_argument("--fresh", action="store_true", help="delete the workdir first")
    args = parser.parse_args(argv)
    from tagi_jax import export
    from tagi_jax.data import synthetic

    start = time.time()
    workdir = os.path.abspath(args.workdir)
    if args.fresh and os.path.exists(workdir):
        shutil.rmtree(workdir)
    suite_dir = os.path.join(workdir, "suite")
    try:
        summary = synthetic.write_suite(suite_dir)
    except synthetic.SuiteExistsError as e:
        # e.g. a suite of an older version: its trained stages would not match the tasks
        raise SystemExit(f"error: {e}\n(run again with --fresh to start over)") from e
    print(
        f"== built-in suite: {len(summary.train_tasks)} train, "
        f"{len(summary.validation_tasks)} validation, {len(summary.test_tasks)} held-out test "
        f"tasks in {suite_dir}",
        flush=True,
    )
    base_dir, tagi_dir = os.path.join(workdir, "base"), os.path.join(workdir, "tagi")
    steps = {"base": args.base_steps, "tagi": args.tagi_steps}

    def bindings(name: str, **more) -> dict[str, object]:
        out = {"MODEL_DIR": os.path.join(workdir, name), "DATA_DIR": suite_dir, **more}
        if steps[name] is not None:
            out["TRAIN_STEPS"] = steps[name]
        return out

    print("== 1/4 the base model: a T5 trained on the training tasks' inputs alone", flush=True)
    _stage("runs/suite_base.gin", bindings("base"))
    print("== 2/4 TAGI: the hypernetwork learns to adapt the frozen base from each Definition")
    _stage("runs/suite_tagi.gin", bindings("tagi", BASE_CHECKPOINT=base_dir))
    print("== 3/4 exporting the TAGI student", flush=True)
    export_dir = export.export_run(tagi_dir, os.path.join(workdir, "export"), overwrite=True)
    print("== 4/4 evaluating on the held-out tasks (a: base, no adapters; b: TAGI)", flush=True)
    eval_dir = os.path.join(workdir, "eval")
    report = _evaluate(
        "runs/evaluate_suite_main_job.gin",
        {"EXPORT_DIR": export_dir, "DATA_DIR": suite_dir, "OUTPUT_DIR": eval_dir},
    )
    b, s = report["base"]["overall"], report["overall"]
    print()
    print(
        f"held-out tasks: {len(summary.test_tasks)} ({s['count']} examples), ROUGE-L / exact match"
    )
    print(f"  (a) base model, no adapters: {b['rougeL']:5.1f} / {b['exact_match']:5.1f}")
    print(f"  (b) TAGI:                    {s['rougeL']:5.1f} / {s['exact_match']:5.1f}")
    print(f"checkpoints: {base_dir}/checkpoints, {tagi_dir}/checkpoints")
    print(f"metrics: {tagi_dir}/metrics.jsonl, TensorBoard: {tagi_dir}/tensorboard")
    print(f"export: {export_dir}; per-task tables: {eval_dir}/results.md")
    print(f"done in {time.time() - start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
