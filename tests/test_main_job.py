"""The main job's whole chain at toy size (two steps per stage): the stages hand their weights
to each other, the full objective's every term is live, and the report has its rows and costs.
The job's numbers are the README's; here only that nothing between the stages is silently
broken.

The job runs as the README runs it, ``python -m tagi_jax.demos.main_job``, in a child process
with one CPU device (the run files' ``mesh/cpu_1.gin``), not this session's eight fake ones.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from tagi_jax.demos import main_job

TOY = [
    "--base_steps",
    "2",
    "--steps",
    "2",
    "--teacher_steps",
    "2",
    "--eval_instances_per_task",
    "2",
]


def _last_metrics(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return json.loads(f.read().splitlines()[-1])


def _run_job(*args: str) -> str:
    """Runs the main job; returns its output (the test fails with it if the job fails)."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if "host_platform_device_count" not in f)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-m", "tagi_jax.demos.main_job", *args, *TOY],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, f"main job failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("main_job"))
    out = _run_job("--workdir", workdir)
    assert "| TAGI |" in out  # the table is printed, not only written
    return workdir


@pytest.mark.slow
def test_the_report_has_every_row_and_cost(job):
    with open(os.path.join(job, "results.json")) as f:
        results = json.load(f)
    assert list(results) == ["base", "metatrain", "TAGI"]
    for label, r in results.items():
        assert 0.0 <= r["overall"]["rougeL"] <= 100.0, label
        assert r["overall"]["count"] == 2 * 19, label  # 2 instances of each held-out task
        cost = r["cost"]
        assert cost["examples_per_second"] > 0 and cost["flops"]["total"] > 0, label
    meta, tagi = results["metatrain"]["cost"], results["TAGI"]["cost"]
    # metatrain reads the Definition in every example; TAGI once per task
    assert meta["input_tokens"] > 2 * tagi["input_tokens"]
    assert tagi["encoder_tokens"] < meta["encoder_tokens"]
    assert tagi["flops"]["instruction_per_task"] > 0 and tagi["flops"]["adapters"] > 0
    assert tagi["flops"]["total"] < meta["flops"]["total"]
    with open(os.path.join(job, "results.md")) as f:
        report = f.read()
    for row in ("| base |", "| metatrain |", "| TAGI |", "per category", "Stage times"):
        assert row in report
    with open(os.path.join(job, "results.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(job, "predictions.jsonl")) as f:
        assert sum(1 for _ in f) == 3 * 2 * 19


@pytest.mark.slow
def test_tagi_trains_on_every_term_of_the_full_objective(job):
    metrics = _last_metrics(os.path.join(job, "tagi"))
    for term in ("term/cross_entropy", "term/kl", "term/alignment"):
        assert term in metrics, f"{term} missing from TAGI's metrics: {sorted(metrics)}"
        assert math.isfinite(metrics[term]) and metrics[term] > 0, (term, metrics[term])
    with open(os.path.join(job, "tagi", "run.json")) as f:
        run = json.load(f)
    assert run["base_checkpoint"] == os.path.join(job, "base")
    # the metatrain teacher reads the Definition; the LoRA teachers' bank covers training tasks
    with open(os.path.join(job, "teachers", "lora_teachers.json")) as f:
        teachers = json.load(f)
    assert len(teachers["groups"]) == 54 and len(teachers["mean_loss"]) == 2


@pytest.mark.slow
def test_a_second_run_reuses_the_stages_and_adds_the_ablations(job):
    """... scored on the validation tasks this time, into their own report."""
    bank = os.path.join(job, "teachers", "lora_teachers.safetensors")
    bank_time = os.path.getmtime(bank)
    # one ablation of ABLATIONS: each is the same stage with other bindings
    out = _run_job("--workdir", job, "--ablations", "tagi_ce", "--split", "validation")
    assert f"(reusing {bank})" in out
    assert os.path.getmtime(bank) == bank_time
    for name in ("base", "metatrain", "tagi"):  # finished: not trained a step further
        assert _last_metrics(os.path.join(job, name))["step"] == 2, name
    with open(os.path.join(job, "validation", "results.json")) as f:
        results = json.load(f)
    assert list(results) == ["base", "metatrain", "TAGI", main_job.ABLATIONS["tagi_ce"][0]]
    assert results["TAGI"]["overall"]["count"] == 2 * 18  # the validation tasks
    assert os.path.isfile(os.path.join(job, "validation", "results.png"))
    with open(os.path.join(job, "results.json")) as f:
        assert list(json.load(f)) == ["base", "metatrain", "TAGI"]  # the test report stays
    ce = _last_metrics(os.path.join(job, "tagi_ce"))
    assert "term/kl" not in ce or ce["term/kl"] == 0.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gin", "T5Config.d_model"], "expected NAME=VALUE"),
        (["--ablations", "tagi_ce,no_such"], "unknown ['no_such']"),
    ],
)
def test_bad_flags_are_one_usage_error(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main_job.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
