"""The main job (the README's first command): the paper's experiment in miniature, on the
built-in instruction suite, on a laptop CPU.

It chains the stages a user runs at scale, each an ordinary run file of
``python -m tagi_jax.train``, in one process:

0. the built-in suite (``tagi_jax.data.synthetic``): training, validation and held-out test
   tasks whose parameters never appear together in training;
1. ``runs/suite_base.gin``: the base model, a byte-level T5 trained from scratch on the
   training tasks' inputs alone (it never sees an instruction);
2. ``runs/suite_metatrain.gin``: the base fine-tuned with the Definition concatenated to every
   input (Tk-Instruct's form), every parameter training: the strong baseline and TAGI's logit
   teacher;
3. ``runs/suite_lora_teachers.gin``: one instance-trained LoRA teacher per training task on
   the frozen base, all at once;
4. ``runs/suite_tagi.gin``: TAGI, the hypernetwork on the frozen base with the full objective:
   cross-entropy, KL from the metatrain teacher, alignment to the task's LoRA teacher;
5. ``python -m tagi_jax.export`` of every model, then the comparison on the held-out test
   tasks (``evaluation.comparison``): ROUGE-L, exact match, encoder tokens, FLOPs and measured
   examples per second, in ``<workdir>/results.md`` with ``results.png`` beside it.

``--ablations`` adds TAGI variants trained on the same budget (``ABLATIONS``: bindings on
``runs/suite_tagi.gin``). A second run reuses finished stages (checkpoints, the teachers'
bank); ``--fresh`` starts over. Choices of steps and rates were made on the validation tasks
(the run files say which numbers chose them); the test tasks are scored here only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

from tagi_jax import train as train_cli

# Each ablation is TAGI's stage with these bindings on runs/suite_tagi.gin (same steps, batch,
# rate and data): what the paper's ablation table removes, and HINT's generator in its place.
ABLATIONS: dict[str, tuple[str, str, dict[str, object]]] = {
    "tagi_ce": (
        "TAGI, CE alone",
        "no teachers: the labels' cross-entropy only",
        {
            "LossConfig.ce_weight": 1.0,
            "LossConfig.kl_weight": 0.0,
            "LossConfig.alignment_weight": 0.0,
            "train.teacher_checkpoint": None,
            "train.teacher_lora_bank": None,
        },
    ),
    "tagi_no_alignment": (
        "TAGI, no alignment",
        "CE + KL from the metatrain teacher, no LoRA teachers",
        {"LossConfig.alignment_weight": 0.0, "train.teacher_lora_bank": None},
    ),
    "tagi_no_fusion": (
        "TAGI, no fusion",
        "the full objective; the decoder does not read the instruction (adapters only)",
        {"TagiConfig.fusion": False},
    ),
    "hint_slots": (
        "TAGI, HINT's slots generator",
        "the full objective with HINT's per-(block, target) slot queries as the generator",
        {"HyperConfig.generator": "slots"},
    ),
}


class _Literal(str):
    """A gin value given as text on the command line (``--gin NAME=VALUE``): passed as written,
    not quoted as a Python string."""

    def __repr__(self) -> str:
        return str(self)


def _flags(gin_file: str, bindings: dict[str, object]) -> list[str]:
    return [f"--gin_file={gin_file}", *(f"--gin.{k}={v!r}" for k, v in bindings.items())]


def _stage(gin_file: str, bindings: dict[str, object]) -> None:
    """One ``python -m tagi_jax.train`` run, in this process."""
    from tagi_jax import configurables

    with train_cli.configured(_flags(gin_file, bindings)):
        configurables.run()


def _curve(model_dir: str) -> list[tuple[int, float]]:
    """The training cross-entropy a run logged (``metrics.jsonl``), as (step, value): the one
    term every stage has (TAGI's whole loss adds the KL and alignment terms)."""
    points = {}
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "cross_entropy" in record:
                points[int(record["step"])] = float(record["cross_entropy"])  # resumed: re-logs
    return sorted(points.items())


def _teacher_curve(teachers_dir: str) -> list[tuple[int, float]]:
    with open(os.path.join(teachers_dir, "lora_teachers.json")) as f:
        losses = json.load(f)["mean_loss"]
    return [(i + 1, float(x)) for i, x in enumerate(losses)]


class _Clock:
    """Wall time of each stage, printed as it ends and kept for the report."""

    def __init__(self):
        self.times: dict[str, float] = {}

    def run(self, name: str, fn):
        start = time.time()
        out = fn()
        self.times[name] = time.time() - start
        print(f"-- {name}: {self.times[name]:.0f}s", flush=True)
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tagi_jax.demos.main_job", description=__doc__)
    parser.add_argument("--workdir", default=os.path.join("runs", "main_job"))
    parser.add_argument("--fresh", action="store_true", help="delete the workdir first")
    parser.add_argument(
        "--ablations",
        nargs="?",
        const=",".join(ABLATIONS),
        default="",
        metavar="NAME,...",
        help=f"also train and score the ablations: all, or those named ({', '.join(ABLATIONS)})",
    )
    parser.add_argument("--base_steps", type=int, default=None, help="default: suite_base.gin's")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="metatrain's, TAGI's and the ablations' steps (one budget); default: the run files'",
    )
    parser.add_argument(
        "--teacher_steps", type=int, default=None, help="default: suite_lora_teachers.gin's"
    )
    parser.add_argument(
        "--split",
        default="test",
        choices=("test", "validation", "train"),
        help="the tasks scored: the held-out test tasks (the report), or the validation tasks "
        "every choice is made on (written to <workdir>/validation/), or the training tasks "
        "(how well the models fit them; <workdir>/train/)",
    )
    parser.add_argument(
        "--gin",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a gin binding for every training stage, e.g. T5Config.d_model=192 (repeatable; "
        "use a fresh --workdir: finished stages are reused as they are)",
    )
    parser.add_argument(
        "--timed_passes",
        type=int,
        default=3,
        help="decoding passes timed per model (the fastest gives examples / s)",
    )
    parser.add_argument(
        "--eval_instances_per_task",
        type=int,
        default=100,
        help="held-out instances scored per task (the suite has 32; fewer for a quick check)",
    )
    args = parser.parse_args(argv)
    ablations = [a for a in args.ablations.split(",") if a]
    unknown = [a for a in ablations if a not in ABLATIONS]
    if unknown:
        parser.error(f"--ablations: unknown {unknown}; known: {', '.join(ABLATIONS)}")
    if args.timed_passes < 1:
        parser.error("--timed_passes must be >= 1")
    extra_bindings = {}
    for binding in args.gin:
        name, sep, value = binding.partition("=")
        if not sep or not name.strip():
            parser.error(f"--gin {binding!r}: expected NAME=VALUE")
        extra_bindings[name.strip()] = _Literal(value.strip())
    from tagi_jax import export
    from tagi_jax.data import synthetic
    from tagi_jax.evaluation import comparison

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
    dirs = {
        name: os.path.join(workdir, name)
        for name in ("base", "metatrain", "teachers", "tagi", *ABLATIONS)
    }
    bank = os.path.join(dirs["teachers"], "lora_teachers.safetensors")
    clock = _Clock()

    def bindings(name: str, steps: int | None, **more) -> dict[str, object]:
        out = {"MODEL_DIR": dirs[name], "DATA_DIR": suite_dir, **more, **extra_bindings}
        if steps is not None:
            out["TRAIN_STEPS"] = steps
        return out

    on_base = {"BASE_CHECKPOINT": dirs["base"]}
    teachers = {**on_base, "TEACHER": dirs["metatrain"], "LORA_TEACHERS": bank}
    n = 5 + len(ablations)
    print(f"== 1/{n} base: a T5 trained on the training tasks' inputs alone", flush=True)
    clock.run("base", lambda: _stage("runs/suite_base.gin", bindings("base", args.base_steps)))
    print(f"== 2/{n} metatrain: the base fine-tuned on Definition + input", flush=True)
    clock.run(
        "metatrain",
        lambda: _stage("runs/suite_metatrain.gin", bindings("metatrain", args.steps, **on_base)),
    )
    print(f"== 3/{n} LoRA teachers: one per training task on the frozen base", flush=True)
    if os.path.exists(bank):
        print(f"(reusing {bank})")
    else:
        clock.run(
            "LoRA teachers",
            lambda: _stage(
                "runs/suite_lora_teachers.gin", bindings("teachers", args.teacher_steps, **on_base)
            ),
        )
    print(f"== 4/{n} TAGI: CE + KL from metatrain + alignment to the LoRA teachers", flush=True)
    clock.run(
        "TAGI", lambda: _stage("runs/suite_tagi.gin", bindings("tagi", args.steps, **teachers))
    )
    for i, name in enumerate(ablations):
        label, about, extra = ABLATIONS[name]
        print(f"== {5 + i}/{n} ablation {label}: {about}", flush=True)
        clock.run(
            label,
            lambda name=name, extra=extra: _stage(
                "runs/suite_tagi.gin", {**bindings(name, args.steps, **teachers), **extra}
            ),
        )

    what = {"test": "the held-out test", "validation": "the validation", "train": "the training"}
    print(f"== {n}/{n} exporting and scoring on {what[args.split]} tasks", flush=True)
    models = {
        "base": ("base", "the base: the input alone, no instruction"),
        "metatrain": ("metatrain", "Tk-Instruct's form: Definition + input in every example"),
        "TAGI": (
            "tagi",
            "adapters generated from the Definition once per task; the full objective",
        ),
        **{ABLATIONS[a][0]: (a, ABLATIONS[a][1]) for a in ablations},
    }
    settings = comparison.settings_for_run(
        dirs["tagi"],
        suite_dir,
        args.split,
        eval_instances_per_task=args.eval_instances_per_task,
        timed_passes=args.timed_passes,
    )
    results = {}
    for label, (name, about) in models.items():
        out = export.export_run(dirs[name], os.path.join(workdir, "export", name), overwrite=True)
        row = comparison.row_for_run(label, dirs[name], out, about)
        results[label] = clock.run(
            f"score {label}", lambda row=row: comparison.score_row(row, settings)
        )

    curves = {
        "base": _curve(dirs["base"]),
        "metatrain": _curve(dirs["metatrain"]),
        "LoRA teachers (mean)": _teacher_curve(dirs["teachers"]),
        "TAGI": _curve(dirs["tagi"]),
        **{ABLATIONS[a][0]: _curve(dirs[a]) for a in ablations},
    }
    first = next(iter(results.values()))
    tasks = getattr(summary, f"{args.split}_tasks")
    heading = [
        f"# The paper in miniature: the main job on the {args.split} tasks",
        "",
        f"{len(tasks)} {'held-out test' if args.split == 'test' else args.split} tasks of the "
        "built-in suite "
        f"({first['overall']['count']} examples; {len(summary.train_tasks)} training tasks). "
        "ROUGE-L and exact match are the official SNI definitions. Encoder tokens "
        "and FLOPs are per example at inference, with TAGI's instruction encoded once per task "
        f"(shared by {first['cost']['examples_per_task']:.0f} examples); examples / s is "
        "measured on this machine (greedy decoding, batch "
        f"{settings.batch_size}, the fastest of {settings.timed_passes} passes after a warm-up) "
        "and varies between runs; the other columns do not.",
        "",
    ]
    report_dir = workdir if args.split == "test" else os.path.join(workdir, args.split)
    paths = comparison.write(
        report_dir,
        results,
        reference="metatrain",
        preamble=heading,
        curves=curves,
        title=f"main job: {args.split} tasks, training curves",
        tasks="held-out" if args.split == "test" else args.split,
    )
    total = time.time() - start
    with open(paths["results.md"], "a", encoding="utf-8") as f:
        f.write("\n## Stage times (this run; reused stages are not listed)\n\n")
        f.writelines(f"- {name}: {seconds:.0f} s\n" for name, seconds in clock.times.items())
        f.write(f"- whole job: {total:.0f} s\n")
    print()
    print("\n".join(comparison.table(results, "metatrain")))
    print()
    _predictor_demo(os.path.join(workdir, "export", "tagi"), suite_dir, tasks[0])
    print()
    print(f"report: {paths['results.md']}, figure: {paths['results.png']}")
    print(f"checkpoints and metrics: {workdir}/<stage>/; exports: {workdir}/export/")
    print(f"done in {total:.0f}s")
    return 0


def _predictor_demo(export_dir: str, suite_dir: str, task_name: str, count: int = 3) -> None:
    """The exported student used as a user would (``tagi_jax.predictor``): a held-out task's
    Definition and a few of its inputs in, answers out."""
    from tagi_jax.data import ni as ni_lib
    from tagi_jax.predictor import Predictor

    task = ni_lib.load_task(os.path.join(suite_dir, "tasks", f"{task_name}.json"))
    definition = task["Definition"][0]
    instances = task["Instances"][:count]
    predictor = Predictor.load(export_dir, batch_size=count)
    answers = predictor.generate_ni(definition, [x["input"] for x in instances])
    print(f"the exported student on held-out {task_name} (tagi_jax.predictor):")
    print(f"  Definition: {definition}")
    for instance, answer in zip(instances, answers, strict=True):
        print(f"  {instance['input']!r} -> {answer!r} (reference {instance['output'][0]!r})")
    print(f"  try: python -m tagi_jax.predict --export {export_dir} --input rows.jsonl ...")


if __name__ == "__main__":
    raise SystemExit(main())
