"""The seed spread of the main job's TAGI stage: is TAGI above TAGI with CE alone, beyond noise?

Trains TAGI (the full objective) and its CE-alone ablation again with other ``train.seed``
values on a finished main job's base, metatrain and LoRA teachers (their own seeds fixed), and
scores them on the validation tasks, never on test:

    bash launch/run_default.sh --ablations tagi_ce          # the seed-0 runs, if not done yet
    python benchmarks/main_job_seeds.py --workdir runs/main_job --seeds 1 2

Prints the validation ROUGE-L / exact match of every seed (seed 0: the main job's own runs)
and each model's mean and range. About 4 minutes per seed on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default=os.path.join("runs", "main_job"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    from tagi_jax import export
    from tagi_jax.demos import main_job
    from tagi_jax.evaluation import comparison

    workdir = os.path.abspath(args.workdir)
    suite = os.path.join(workdir, "suite")
    for needed in ("base", "metatrain", "teachers", "tagi", "tagi_ce"):
        if not os.path.isdir(os.path.join(workdir, needed)):
            raise SystemExit(
                f"error: {workdir}/{needed} is missing: run the main job with --ablations "
                "tagi_ce (or --ablations) first"
            )
    on_stages = {
        "DATA_DIR": suite,
        "BASE_CHECKPOINT": os.path.join(workdir, "base"),
        "TEACHER": os.path.join(workdir, "metatrain"),
        "LORA_TEACHERS": os.path.join(workdir, "teachers", "lora_teachers.safetensors"),
    }
    models = {"TAGI": ("tagi", {}), "TAGI, CE alone": ("tagi_ce", main_job.ABLATIONS["tagi_ce"][2])}
    runs = {(label, 0): os.path.join(workdir, name) for label, (name, _) in models.items()}
    for seed in args.seeds:
        for label, (name, extra) in models.items():
            model_dir = os.path.join(workdir, "seeds", f"{name}_seed{seed}")
            print(f"== {label}, seed {seed}", flush=True)
            main_job._stage(
                "runs/suite_tagi.gin",
                {"MODEL_DIR": model_dir, **on_stages, **extra, "train.seed": seed},
            )
            runs[(label, seed)] = model_dir

    settings = comparison.settings_for_run(runs[("TAGI", 0)], suite, "validation", timed_passes=1)
    scores: dict[str, list[tuple[int, float, float]]] = {label: [] for label in models}
    for (label, seed), model_dir in sorted(runs.items()):
        out_dir = os.path.join(workdir, "seeds", "export", f"{models[label][0]}_seed{seed}")
        out = export.export_run(model_dir, out_dir, overwrite=True)
        row = comparison.row_for_run(label, model_dir, out)
        overall = comparison.score_row(row, settings)["overall"]
        scores[label].append((seed, overall["rougeL"], overall["exact_match"]))
    print("\nvalidation ROUGE-L / exact match by seed of the TAGI stage")
    for label, rows in scores.items():
        cells = ", ".join(f"seed {s}: {r:.1f} / {e:.1f}" for s, r, e in rows)
        values = [r for _, r, _ in rows]
        print(
            f"{label}: {cells}; ROUGE-L mean {statistics.mean(values):.2f}, "
            f"range {min(values):.1f}-{max(values):.1f}"
        )


if __name__ == "__main__":
    main()
