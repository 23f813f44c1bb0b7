"""P3 rank classification (tagi_jax.evaluation.p3_eval / p3_pipeline): scores checked by hand on
shared P3 records, the paper's averaging, shared prompt encoding, the CLI, and the P3 training
chain (LoRA teachers -> metatrain -> finetune -> evaluate_p3) at toy size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tagi_jax.data.tokens import encode_padded
from tagi_jax.evaluation import p3_eval, p3_pipeline
from tagi_jax.models import lora, tagi
from tagi_jax.models.tagi_config import HyperConfig, TagiConfig
from tagi_jax.testing.tiny_t5 import TINY_T5

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_P3 = os.path.abspath(os.path.join(ROOT, "..", "shared", "data", "p3"))
pytestmark = pytest.mark.skipif(
    not os.path.isdir(SHARED_P3), reason=f"shared P3 data not found at {SHARED_P3}"
)
ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
INPUT_LEN, TARGET_LEN = 192, 32


def _byte_vocab():
    from tagi_jax.data import vocab

    return vocab.from_name("byte")


def _model(fusion: bool = True):
    """The tiny student with a hypernetwork whose B generators are not zero, so the generated
    adapters change the logits (a zero-B student would equal the backbone)."""
    config = TagiConfig(t5=TINY_T5, hyper=HyperConfig(rank=4, instruction_dim=16), fusion=fusion)
    params = jax.jit(lambda key: tagi.init_params(config, key))(jax.random.key(0))
    rng = np.random.default_rng(1)
    params["hypernet"] = jax.tree.map(
        lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype), params["hypernet"]
    )
    return config, params


@pytest.fixture(scope="module")
def copa(tmp_path_factory):
    """COPA's first original-task template on 3 records, in the P3 score_eval layout."""
    out = str(tmp_path_factory.mktemp("copa"))
    counts = p3_pipeline.render_layout(
        SHARED_P3,
        out,
        train_datasets=[],
        eval_datasets=["super_glue/copa"],
        max_examples=3,
        max_templates=1,
    )
    assert len(counts) == 1 and next(iter(counts)).endswith("_score_eval")
    found = p3_eval.score_eval_tasks(out, ["super_glue/copa"])
    return p3_eval.load_instances(out, found["super_glue/copa"], "validation")


# ---------------------------------------------------------------------------------------------
# Names and aggregation


def test_task_names_map_back_to_datasets():
    from tagi_jax.data import p3

    cases = {
        p3.task_name("anli", "GPT-3 style", "_r2") + "_score_eval": ("anli/r2", "GPT_3_style"),
        p3.task_name("super_glue_wsc.fixed", "does the pronoun refer to"): (
            "super_glue/wsc.fixed",
            "does_the_pronoun_refer_to",
        ),
        p3.task_name("super_glue_cb", "MNLI crowdsource"): ("super_glue/cb", "MNLI_crowdsource"),
        p3.task_name("cos_e_v1.11", "explain why human"): ("cos_e/v1.11", "explain_why_human"),
        p3.task_name("winogrande_winogrande_xl", "Replace"): (
            "winogrande/winogrande_xl",
            "Replace",
        ),
    }
    for task, (dataset, template) in cases.items():
        name = p3_eval.parse_task_name(task)
        assert (name.dataset, name.template) == (dataset, template), task
    assert p3_eval.parse_task_name("anli_x_r1").held_out
    assert not p3_eval.parse_task_name("ag_news_classify").held_out
    with pytest.raises(ValueError, match="no_such_dataset_x"):
        p3_eval.parse_task_name("no_such_dataset_x")


# T5-LM-TAGI Base, paper Table 11 (tagi_spec.md §9.3), without the ANLI mean column.
TABLE_11_BASE = {
    "anli/r1": 31.5,
    "anli/r2": 31.7,
    "anli/r3": 33.1,
    "hellaswag": 25.0,
    "super_glue/cb": 44.5,
    "super_glue/copa": 54.7,
    "super_glue/rte": 53.7,
    "super_glue/wic": 52.3,
    "super_glue/wsc.fixed": 60.5,
    "winogrande/winogrande_xl": 50.8,
    "story_cloze/2016": 64.0,
}


def _per_task(accuracies: dict[str, float]) -> dict:
    """Three templates per dataset around the given accuracy (their mean and median)."""
    out = {}
    for dataset, acc in accuracies.items():
        for k, value in enumerate((acc - 1.5, acc + 1.5, acc)):
            out[f"{dataset}#{k}"] = {"dataset": dataset, "template": str(k), "accuracy": value}
    return out


def test_averages_match_the_paper():
    datasets = p3_eval.per_dataset(_per_task(TABLE_11_BASE))
    assert datasets["super_glue/cb"]["templates"] == 3
    np.testing.assert_allclose(datasets["super_glue/cb"]["mean"], 44.5)
    np.testing.assert_allclose(datasets["super_glue/cb"]["median"], 44.5)
    skewed = p3_eval.per_dataset(
        {
            str(k): {"dataset": "x", "template": str(k), "accuracy": a}
            for k, a in enumerate([1, 2, 9])
        }
    )
    assert skewed["x"]["mean"] == 4.0 and skewed["x"]["median"] == 2.0
    avg = p3_eval.averages(datasets)
    assert round(avg["mtest11"]["mean"], 2) == 45.62 and avg["mtest11"]["count"] == 11
    assert round(avg["hypert5"]["mean"], 2) == 46.70 and avg["hypert5"]["count"] == 8
    for entry in avg.values():
        assert not entry["partial"] and entry["missing"] == []
    assert "story_cloze/2016" not in avg["hypert5"]["datasets"]
    assert "anli" in avg["hypert5"]["datasets"]

    # the shared data has no HellaSwag or StoryCloze: partial, named, never the full average
    absent = ("hellaswag", "story_cloze/2016")
    shared = p3_eval.per_dataset(
        _per_task({d: v for d, v in TABLE_11_BASE.items() if d not in absent})
    )
    avg = p3_eval.averages(shared)
    m, h = avg["mtest11"], avg["hypert5"]
    assert m["partial"] and m["missing"] == ["hellaswag", "story_cloze/2016"]
    assert (m["count"], m["expected"]) == (9, 11)
    np.testing.assert_allclose(m["mean"], np.mean([v["mean"] for v in shared.values()]))
    assert h["partial"] and h["missing"] == ["hellaswag"] and (h["count"], h["expected"]) == (7, 8)
    # one ANLI round missing: the ANLI member averages the rounds present
    two_rounds = {d: v for d, v in datasets.items() if d != "anli/r3"}
    h = p3_eval.averages(two_rounds)["hypert5"]
    assert h["partial"] and h["missing"] == ["anli/r3"] and h["count"] == 8
    table = p3_eval.markdown_table({"per_dataset": shared, "averages": avg}, "t")
    assert "partial: missing hellaswag, story_cloze/2016" in table


# ---------------------------------------------------------------------------------------------
# Scoring


@pytest.fixture(scope="module")
def full_forward(copa):
    """Every (prompt, choice) row through one plain ``tagi.forward`` that generates adapters for
    each row from its own prompt: the reference for the scorer."""
    config, params = _model()
    vocab = _byte_vocab()
    rows = [(k, c) for k, i in enumerate(copa) for c in i.choices]
    prompts = encode_padded(vocab, [copa[k].prompt for k, _ in rows], INPUT_LEN)
    targets = encode_padded(vocab, [c for _, c in rows], TARGET_LEN)
    batch = {
        "encoder_input_tokens": jnp.asarray(prompts),
        "hyper_input_tokens": jnp.asarray(prompts),
        "decoder_input_tokens": jnp.asarray(np.pad(targets[:, :-1], ((0, 0), (1, 0)))),
    }
    logits, aux = jax.jit(tagi.forward, static_argnums=0)(config, params, batch)
    assert aux["adapters"].batch_size == len(rows)
    return {
        "config": config,
        "params": params,
        "vocab": vocab,
        "rows": rows,
        "targets": targets,
        "log_probs": np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)),
        "adapters": aux["adapters"],
    }


SETTINGS = dict(input_length=INPUT_LEN, target_length=TARGET_LEN, batch_size=4)


@pytest.mark.slow
def test_scores_match_a_hand_computation(copa, full_forward):
    f = full_forward
    instance = copa[0]
    assert instance.dataset == "super_glue/copa" and len(instance.choices) == 2
    assert instance.gold in (0, 1)
    # by hand, for the first instance: log p of each choice token (EOS included, pads not)
    by_hand = []
    for r, (owner, choice) in enumerate(f["rows"]):
        if owner != 0:
            continue
        target = f["targets"][r]
        n = int((target > 0).sum())
        assert target[n - 1] == 1 and n == min(len(choice.encode()) + 1, TARGET_LEN)  # + EOS
        total = float(sum(f["log_probs"][r, t, target[t]] for t in range(n)))
        by_hand.append({"sum": total, "mean": total / n})
    got = {}
    for score in ("mean", "sum"):
        got[score] = p3_eval.score_choices(
            f["config"], f["params"], copa, f["vocab"], score=score, **SETTINGS
        )
        assert [len(s) for s in got[score]] == [len(i.choices) for i in copa]
        expected = [h[score] for h in by_hand]
        np.testing.assert_allclose(got[score][0], expected, rtol=1e-5, atol=1e-5)
        assert p3_eval.predict(got[score][0]) == int(np.argmax(expected))
    predictions = [p3_eval.predict(s) for s in got["mean"]]
    (entry,) = p3_eval.accuracy_per_task(copa, predictions).values()
    correct = sum(p == i.gold for p, i in zip(predictions, copa, strict=True))
    assert entry["accuracy"] == pytest.approx(100.0 * correct / len(copa))
    assert entry["count"] == len(copa) == 3
    assert p3_eval.predict(np.array([0.5, 0.5, 0.1])) == 0  # ties go to the first choice


@pytest.mark.slow
def test_shared_prompt_encoding_equals_per_choice_forward(copa, full_forward):
    """Prompts encoded once and expanded to their choices (batches of 4 rows: two prompts, then
    one and padding) give the scores of full forwards generating adapters for every row."""
    f = full_forward
    shared = p3_eval.score_choices(f["config"], f["params"], copa, f["vocab"], **SETTINGS)
    targets = f["targets"]
    picked = np.take_along_axis(f["log_probs"], targets[..., None], axis=-1)[..., 0]
    reference = np.where(targets > 0, picked, 0).sum(-1) / (targets > 0).sum(-1)
    np.testing.assert_allclose(np.concatenate(shared), reference, rtol=1e-5, atol=1e-5)
    # the generated adapters are not zero (else sharing them would prove little)
    name = f["adapters"].targets[0]
    assert np.abs(np.asarray(f["adapters"].b[name])).max() > 1e-3
    # choices of one prompt carry that prompt's adapters: lora.take of the owner row
    taken = lora.take(f["adapters"], jnp.asarray([0, 2]))
    np.testing.assert_array_equal(taken.a[name][:, 1], f["adapters"].a[name][:, 2])
    with pytest.raises(ValueError, match="more than the 1 rows"):
        p3_eval.score_choices(
            f["config"], f["params"], copa, f["vocab"], input_length=8, target_length=8,
            batch_size=1,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The P3 chain at toy size, and the CLI

TINY_FLAGS = (
    "--gin_file=models/t5_1_1_tiny.gin",
    "--gin.T5Config.vocab_size=264",
    "--gin.T5Config.logits_vocab_size=None",
    "--gin.VOCABULARY='byte'",
    f"--gin.DataConfig.feature_lengths=(('inputs', {INPUT_LEN}), ('hyper_inputs', {INPUT_LEN}), "
    f"('teacher_inputs', {INPUT_LEN}), ('targets', {TARGET_LEN}))",
)


# 8 fake devices in the test process: data-parallel over all of them, a row each.
MESH = ("--gin.train.mesh_shape=(-1, 1)", "--gin.BATCH_SIZE=8")


def _stage(*flags):
    from tagi_jax import configurables
    from tagi_jax import train as train_cli

    with train_cli.configured(list(flags)):
        return configurables.run()


def _tiny_base(directory: str) -> str:
    """A random tiny T5 as a parameter checkpoint: the 'student's base' of the chain."""
    from tagi_jax import configurables
    from tagi_jax import train as train_cli
    from tagi_jax.convert import param_checkpoint
    from tagi_jax.models import t5

    with train_cli.configured(["--gin_file=models/t5_1_1_tiny.gin", *TINY_FLAGS[1:3]]):
        config = configurables.t5_config()
    param_checkpoint.save(directory, config, t5.init_params(config, jax.random.key(3)))
    return directory


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Render -> LoRA teachers -> metatrain -> finetune -> export, each a couple of steps."""
    from tagi_jax import export

    root = tmp_path_factory.mktemp("p3_chain")
    p3_dir = str(root / "p3")
    counts = p3_pipeline.render_layout(
        SHARED_P3,
        p3_dir,
        train_datasets=["rotten_tomatoes", "ag_news"],
        eval_datasets=["super_glue/cb"],
        max_examples=4,
        max_templates=2,
    )
    assert sum(name.endswith("_score_eval") for name in counts) == 2 and len(counts) == 6
    base = _tiny_base(str(root / "base"))
    common = (f"--gin.P3_DIR='{p3_dir}'", f"--gin.BASE_CHECKPOINT='{base}'", "--gin.TRAIN_STEPS=2")
    bank = _stage(
        "--gin_file=runs/lora_teachers_p3.gin",
        f"--gin.MODEL_DIR='{root / 'teachers'}'",
        *common,
        *TINY_FLAGS[3:],
        "--gin.LoraTeacherConfig.rank=4",
        "--gin.LoraTeacherConfig.alpha=8.0",
        "--gin.train_lora_teachers.rows_per_group=2",
        "--gin.train_lora_teachers.log_every=1",
    )
    metatrain = str(root / "metatrain")
    _stage(
        "--gin_file=runs/metatrain_p3.gin",
        *TINY_FLAGS,
        f"--gin.MODEL_DIR='{metatrain}'",
        *common,
        *MESH,
        "--gin.OptimizerConfig.warmup_steps=1",
        "--gin.train.log_every=1",
    )
    finetune = str(root / "finetune")
    _stage(
        "--gin_file=runs/finetune_p3.gin",
        "--gin_file=methods/tiny_hyper.gin",
        *TINY_FLAGS,
        f"--gin.MODEL_DIR='{finetune}'",
        *common,
        f"--gin.TEACHER='{metatrain}'",
        f"--gin.LORA_TEACHERS='{bank}'",
        *MESH,
        "--gin.train.grad_accum_steps=1",
        "--gin.train.log_every=1",
        "--gin.LossConfig.vocab_size=259",  # the byte vocabulary's ids
    )
    exported = export.export_run(finetune, str(root / "export"))
    return {"p3_dir": p3_dir, "bank": bank, "finetune": finetune, "export": exported}


@pytest.mark.slow
def test_p3_chain_trains_and_evaluates(chain, tmp_path):
    from tagi_jax.distill import lora_teachers

    bank = lora_teachers.TeacherBank.load(chain["bank"])
    # one teacher per training dataset, named as the finetune stage looks them up
    assert sorted(bank.names) == ["ag_news", "rotten_tomatoes"] and bank.group_by == "category"
    with open(os.path.join(chain["finetune"], "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    for term in ("cross_entropy", "kl", "alignment"):
        assert np.isfinite(last[term]) and last[term] > 0, term

    out = str(tmp_path / "eval")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tagi_jax.evaluate",
            "--gin_file=runs/evaluate_p3.gin",
            f"--gin.EXPORT_DIR='{chain['export']}'",
            f"--gin.P3_DIR='{chain['p3_dir']}'",
            f"--gin.OUTPUT_DIR='{out}'",
            "--gin.evaluate_p3.batch_size=8",
            "--gin.evaluate_p3.compare_base=True",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(out, "results.json")) as f:
        report = json.load(f)
    assert set(report["per_dataset"]) == {"super_glue/cb"}
    assert report["per_dataset"]["super_glue/cb"]["templates"] == 2
    assert len(report["per_task"]) == 2 and "base" in report
    # the export's settings: what the student trained with
    assert report["settings"]["vocabulary"] == "byte"
    assert report["settings"]["input_length"] == INPUT_LEN
    assert report["settings"]["target_length"] == TARGET_LEN
    mtest = report["averages"]["mtest11"]
    assert mtest["partial"] and mtest["count"] == 1 and len(mtest["missing"]) == 10
    assert "super_glue/rte" in report["missing_datasets"]
    with open(os.path.join(out, "predictions.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == 8  # 2 templates x 4 examples
    for line in lines:
        assert len(line["scores"]) == len(line["choices"]) == 3  # CB: 3 answers
        assert line["predicted"] == int(np.argmax(line["scores"]))
        assert line["correct"] == (line["predicted"] == line["gold"])
    acc = np.mean([line["correct"] for line in lines]) * 100
    np.testing.assert_allclose(np.mean([t["accuracy"] for t in report["per_task"].values()]), acc)
    assert "MTest11" in result.stdout and "PARTIAL" in result.stdout
    assert os.path.isfile(os.path.join(out, "results.md"))


@pytest.mark.slow
def test_cli_missing_p3_dir_is_one_error_line(chain, tmp_path, capsys):
    from tagi_jax import evaluate

    gin.clear_config()
    try:
        rc = evaluate.main(
            [
                "--gin_file=runs/evaluate_p3.gin",
                f"--gin.EXPORT_DIR='{chain['export']}'",
                f"--gin.P3_DIR='{tmp_path / 'nowhere'}'",
                f"--gin.OUTPUT_DIR='{tmp_path / 'out'}'",
            ]
        )
    finally:
        gin.clear_config()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("error:") and "nowhere" in err[0]
    assert not os.path.exists(tmp_path / "out")


def test_evaluate_dispatches_on_the_bound_job():
    from tagi_jax import evaluate

    assert evaluate.bound_jobs("evaluate_p3.p3_dir = 'x'\nEXPORT_DIR = 'e'") == ["evaluate_p3"]
    assert evaluate.bound_jobs("evaluate.task_dir = 'x'\n# evaluate_p3.x = 1") == ["evaluate"]
    assert evaluate.bound_jobs("import tagi_jax.evaluation.p3_pipeline\nA = 1") == []
