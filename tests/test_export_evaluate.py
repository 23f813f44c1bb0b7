"""``tagi_jax.export`` and ``tagi_jax.evaluate`` on the tiny run: exact parameters, base
references, overwrite refusal, errors that name the path, and scores consistent with their
per-example records.

The run is the session's shared tiny run (conftest.tiny_run, read only); the second run on a
base, and the export and evaluate CLIs' error cases, run in this process. Processes of their
own only for one export and one evaluation, as users run them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tagi_jax import export
from tagi_jax.artifacts import backbone, export_format
from tagi_jax.models import tagi, trainable
from tagi_jax.testing.trees import assert_trees_equal
from tagi_jax.training import state as state_lib

ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module: str, *flags: str, timeout: int = 600):
    cmd = [sys.executable, "-m", module, *flags]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)


def _train(model_dir: str, suite: str, steps: int, *flags: str) -> str:
    """The trainer's CLI in this process (8 fake devices, data-parallel)."""
    from tagi_jax import configurables
    from tagi_jax import train as train_cli

    with train_cli.configured(
        [
            "--gin_file=runs/tiny_cpu.gin",
            f"--gin.MODEL_DIR='{model_dir}'",
            f"--gin.DATA_DIR='{suite}'",
            f"--gin.TRAIN_STEPS={steps}",
            "--gin.train.mesh_shape=(-1, 1)",
            *flags,
        ]
    ):
        configurables.train()
    return model_dir


def _batch(vocab_size: int):
    rng = np.random.default_rng(0)
    tokens = {k: rng.integers(2, vocab_size, (2, 12)).astype(np.int32) for k in tagi.BATCH_KEYS}
    tokens["encoder_input_tokens"][:, -3:] = 0  # some padding
    return {k: jnp.asarray(v) for k, v in tokens.items()}


@pytest.fixture(scope="module")
def suite(tiny_suite):
    return tiny_suite


@pytest.fixture(scope="module")
def run(tiny_run):
    """A finished tiny run with no base checkpoint (the backbone is the seed's init), 4 steps,
    its one checkpoint at step 4."""
    assert tiny_run.steps == 4
    return tiny_run.model_dir


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    return export.export_run(run, str(tmp_path_factory.mktemp("exports") / "e"))


@pytest.mark.slow
def test_export_layout_and_exact_parameters(run, exported):
    files = ("tagi_config.json", "params", "base.json", "export.json", "t5/t5_config.json")
    for name in (*files, "vocabulary.json", "data.json"):
        assert os.path.exists(os.path.join(exported, name)), name
    assert not os.path.exists(exported + ".tmp")
    with open(os.path.join(exported, "base.json")) as f:
        assert json.load(f) == {"path": "t5", "kind": "included"}  # the run had no base
    with open(os.path.join(exported, "export.json")) as f:
        info = json.load(f)
    assert info["step"] == 4 and info["model_dir"] == os.path.abspath(run)
    assert info["format_version"] == export_format.FORMAT_VERSION
    with open(os.path.join(exported, "vocabulary.json")) as f:
        assert json.load(f) == {"kind": "byte"}
    with open(os.path.join(run, "run.json")) as f:
        data = json.load(f)["data"]
    settings = export_format.read_data(exported)
    assert settings["task"] == data["task"]
    assert settings["feature_lengths"] == dict(data["feature_lengths"])
    assert settings["ni"]["student_input"] == data["ni"]["student_input"]
    assert settings["ni"]["num_pos_examples"] == 2  # resolved from the task's _def_pos2 variant

    loaded = export_format.load(exported)
    model, params = loaded.config, loaded.params
    assert loaded.vocabulary_spec == "byte" and loaded.data == settings
    # Independently: the checkpoint's trainable partition merged into the seed's frozen init.
    import orbax.checkpoint as ocp

    state = ocp.StandardCheckpointer().restore(os.path.join(run, "checkpoints", "4", "state"))
    # jitted, as the loop creates parameters (an eager init differs in the last bit)
    init = jax.jit(lambda key: tagi.init_params(model, key))(jax.random.key(0))
    _, frozen = state_lib.partition(init, trainable.trainable_mask(model, init))
    expected = state_lib.merge(state["trainable"], frozen, jax.tree.structure(init))
    assert_trees_equal(params, expected)
    # ... and the loop's own end-of-run export, through the model's logits.
    from_loop = _loop_export(run, model)
    assert_trees_equal(params, from_loop)
    batch = _batch(model.t5.vocab_size)
    logits, _ = tagi.forward(model, params, batch)
    reference, _ = tagi.forward(model, from_loop, batch)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(reference))
    # E/t5, and the export itself, are bases in their own right.
    for source in (os.path.join(exported, "t5"), exported, run):
        assert_trees_equal(backbone.load_t5(source)[1], params["t5"])
    # The loop's export and this one are the same format, read by the same reader.
    assert export_format.read_data(os.path.join(run, "export")) == settings


def _loop_export(model_dir, model):
    """The whole student the training loop exported at the end of the run."""
    loaded = export_format.load(os.path.join(model_dir, "export"))
    assert loaded.config == model
    return loaded.params


@pytest.mark.slow
def test_export_with_base_reference(run, suite, tmp_path):
    base = os.path.join(run, "export", "t5")
    second = _train(str(tmp_path / "second"), suite, 2, f"--gin.train.base_checkpoint='{base}'")
    out = str(tmp_path / "e")
    result = _run("tagi_jax.export", "--model_dir", second, "--out", out, "--base_by_reference")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reference" in result.stdout and "MiB" in result.stdout
    with open(os.path.join(out, "base.json")) as f:
        info = json.load(f)
    assert info["path"] == os.path.abspath(base) and info["kind"] == "reference"
    assert info["fingerprint"] == export_format.fingerprint(
        {f"t5/{p}": v for p, v in trainable.flatten(backbone.load_t5(base)[1]).items()}
    )
    assert not os.path.exists(os.path.join(out, "t5"))
    loaded = export_format.load(out)
    model, params = loaded.config, loaded.params
    assert_trees_equal(params, _loop_export(second, model))
    assert_trees_equal(params["t5"], backbone.load_t5(base)[1])
    # by default the backbone is copied in, so the directory works anywhere
    included = export.export_run(second, str(tmp_path / "inc"))
    with open(os.path.join(included, "base.json")) as f:
        assert json.load(f)["kind"] == "included"
    assert_trees_equal(export_format.load(included).params, params)
    # a base that changed since the export is refused (verify_base=False takes it anyway)
    changed = backbone.load_t5(base)[1]
    changed["decoder"]["final_layer_norm"]["scale"] = (
        changed["decoder"]["final_layer_norm"]["scale"] + 1.0
    )
    from tagi_jax.convert import param_checkpoint

    param_checkpoint.save(str(tmp_path / "changed"), model.t5, changed)
    moved = str(tmp_path / "moved")
    shutil.copytree(out, moved)
    with open(os.path.join(moved, "base.json"), "w") as f:
        json.dump(dict(info, path=str(tmp_path / "changed")), f)
    with pytest.raises(export_format.ExportError, match="changed"):
        export_format.load(moved)
    assert_trees_equal(export_format.load(moved, verify_base=False).params["t5"], changed)
    # a reference that went away is named
    with open(os.path.join(moved, "base.json"), "w") as f:
        json.dump({"path": str(tmp_path / "gone"), "kind": "reference"}, f)
    with pytest.raises(FileNotFoundError, match="gone"):
        export_format.load(moved)
    # a run whose backbone trained, or that has no base, cannot keep it by reference
    with pytest.raises(export_format.ExportError, match="no base checkpoint"):
        export.export_run(run, str(tmp_path / "ref"), base_by_reference=True)


@pytest.mark.slow
def test_overwrite_is_refused_unless_asked(run, exported, tmp_path, run_main):
    out = str(tmp_path / "e")
    shutil.copytree(exported, out)
    with pytest.raises(FileExistsError, match="overwrite"):
        export.export_run(run, out)
    code, _, err = run_main(export.main, ["--model_dir", run, "--out", out])
    assert code == 2 and out in err and "--overwrite" in err
    os.remove(os.path.join(out, "export.json"))  # so a rewrite shows
    export.export_run(run, out, step=4, overwrite=True)
    assert os.path.isfile(os.path.join(out, "export.json"))
    assert sorted(os.listdir(tmp_path)) == ["e"]  # no leftover e.tmp
    export_format.load(out)


@pytest.mark.slow
def test_bad_inputs_name_the_path(run, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        export.export_run(str(tmp_path / "nope"), str(tmp_path / "e"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="run.json"):
        export.export_run(str(empty), str(tmp_path / "e"))
    shutil.copy(os.path.join(run, "run.json"), empty / "run.json")
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        export.export_run(str(empty), str(tmp_path / "e"))
    (empty / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        export.export_run(str(empty), str(tmp_path / "e"))
    with pytest.raises(FileNotFoundError, match=r"step 99 .*available steps: 4"):
        export.export_run(run, str(tmp_path / "e"), step=99)
    with pytest.raises(FileNotFoundError, match="not_an_export"):
        export_format.load(str(tmp_path / "not_an_export"))
    with pytest.raises(export_format.ExportError, match="tagi_config.json"):
        export_format.load(str(empty))
    with pytest.raises(export_format.ExportError, match="a training run, not an export"):
        export_format.load(run)
    assert not os.path.exists(tmp_path / "e")


def _lines(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _check_consistent(output_dir: str, prefix: str = "") -> dict:
    """Per-example scores recomputed with ni_metrics match the file; aggregates are their means."""
    from tagi_jax.evaluation import ni_metrics

    with open(os.path.join(output_dir, "results.json")) as f:
        results = json.load(f)
    lines = _lines(os.path.join(output_dir, "predictions.jsonl"))
    summary = results["base"] if prefix else results
    for line in lines:
        pred, refs = line[f"{prefix}prediction"], line["references"]
        rouge = 100 * ni_metrics.best_over_references(ni_metrics.rouge_l, pred, refs)
        em = 100 * ni_metrics.best_over_references(ni_metrics.exact_match, pred, refs)
        assert line[f"{prefix}rougeL"] == pytest.approx(rouge, abs=1e-9)
        assert line[f"{prefix}exact_match"] == pytest.approx(em, abs=1e-9)
    overall = summary["overall"]
    assert overall["count"] == len(lines)
    assert overall["rougeL"] == pytest.approx(np.mean([x[f"{prefix}rougeL"] for x in lines]))
    assert overall["exact_match"] == pytest.approx(
        np.mean([x[f"{prefix}exact_match"] for x in lines])
    )
    for task, s in summary["per_task"].items():
        mine = [x[f"{prefix}rougeL"] for x in lines if x["task_name"] == task]
        assert s["count"] == len(mine) and s["rougeL"] == pytest.approx(np.mean(mine))
    assert sum(s["count"] for s in summary["per_category"].values()) == len(lines)
    return results


@pytest.mark.slow
def test_evaluate_cli(exported, suite, tmp_path):
    out = str(tmp_path / "eval")
    result = _run(
        "tagi_jax.evaluate",
        "--gin_file=runs/evaluate_suite.gin",
        f"--gin.EXPORT_DIR='{exported}'",
        f"--gin.DATA_DIR='{suite}'",
        f"--gin.OUTPUT_DIR='{out}'",
        "--gin.NIConfig.eval_instances_per_task=2",
        "--gin.evaluate.compare_base=True",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ROUGE-L" in result.stdout and "results.json" in result.stdout
    results = _check_consistent(out)
    _check_consistent(out, prefix="base_")
    lines = _lines(os.path.join(out, "predictions.jsonl"))
    from tagi_jax.data import ni

    examples = list(ni.iter_examples(suite, "test", ni.NIConfig(eval_instances_per_task=2)))
    assert [(x["task_name"], x["id"]) for x in lines] == [
        (e["task_name"], e["instance_id"]) for e in examples
    ]
    assert [x["references"] for x in lines] == [e["references"] for e in examples]
    assert results["split"] == "test" and results["step"] == 4
    # unset settings are the export's (tiny_cpu.gin's feature lengths and vocabulary)
    settings = results["settings"]
    assert (settings["input_length"], settings["instruction_length"]) == (256, 256)
    assert settings["max_decode_len"] == 40 and settings["vocabulary"] == "byte"
    # the run's one NIConfig (evaluate.ni: the gin-configured one) is what formatted the data
    assert results["settings"]["ni"]["eval_instances_per_task"] == 2
    assert results["settings"]["ni"]["num_pos_examples"] == 2  # unset: Def + 2 Pos
    with open(os.path.join(out, "results.md")) as f:
        table = f.read()
    assert "**overall**" in table and "no adapters" in table


@pytest.mark.slow
def test_evaluate_errors_exit_2(exported, suite, tmp_path, run_main):
    from tagi_jax import evaluate as evaluate_cli

    def evaluate(*flags):
        code, _, err = run_main(
            evaluate_cli.main,
            [
                "--gin_file=runs/evaluate_suite.gin",
                f"--gin.OUTPUT_DIR='{tmp_path / 'out'}'",
                *flags,
            ],
        )
        return types.SimpleNamespace(returncode=code, stderr=err)

    missing_export = evaluate(
        f"--gin.EXPORT_DIR='{tmp_path / 'no_export'}'", f"--gin.DATA_DIR='{suite}'"
    )
    assert missing_export.returncode == 2 and "no_export" in missing_export.stderr
    missing_data = evaluate(
        f"--gin.EXPORT_DIR='{exported}'", f"--gin.DATA_DIR='{tmp_path / 'no_data'}'"
    )
    assert missing_data.returncode == 2 and "no_data" in missing_data.stderr
    bad_split = evaluate(
        f"--gin.EXPORT_DIR='{exported}'", f"--gin.DATA_DIR='{suite}'", "--gin.evaluate.split='dev'"
    )
    assert bad_split.returncode == 2 and "dev_tasks.txt" in bad_split.stderr
    # the export's vocabulary is the student's: another one is refused, naming both
    spm = tmp_path / "spiece.model"
    spm.write_bytes(b"not the student's vocabulary")
    other_vocabulary = evaluate(
        f"--gin.EXPORT_DIR='{exported}'",
        f"--gin.DATA_DIR='{suite}'",
        f"--gin.evaluate.vocabulary='{spm}'",
    )
    assert other_vocabulary.returncode == 2, other_vocabulary.stderr
    assert "not the vocabulary the student was trained with (byte" in other_vocabulary.stderr
    assert not os.path.exists(tmp_path / "out")


def test_report_of_a_known_prediction_set(suite, tmp_path):
    """Half the predictions are a reference, half are junk: EM is exactly 50, and the report's
    files agree with each other (the tiny run itself scores ~0, a weak check on its own)."""
    from tagi_jax.data import ni
    from tagi_jax.evaluation import ni_metrics, pipeline

    config = ni.NIConfig(student_input="input_only", eval_instances_per_task=2)
    examples = list(ni.iter_examples(suite, "test", config))
    preds = [e["references"][0] if i % 2 else "zz" for i, e in enumerate(examples)]
    keys = ("references", "task_name", "category")
    results = ni_metrics.score(preds, *([e[k] for e in examples] for k in keys))
    results["predictions"] = preds
    out = str(tmp_path / "report")
    report = pipeline.write_report(out, examples, results, header={"split": "test"})
    written = _check_consistent(out)
    assert written["overall"] == report["overall"] and written["split"] == "test"
    assert written["overall"]["exact_match"] == pytest.approx(50.0)
    assert 50.0 <= written["overall"]["rougeL"] < 100.0


@pytest.mark.parametrize("name", ["evaluate_suite.gin", "evaluate_sni.gin"])
def test_gin_files_parse_and_bind(name):
    """As tests/test_gin_configs.py parses every file: the file's import registers `evaluate`."""
    gin.clear_config()
    try:
        gin.add_config_file_search_path(os.path.join(ROOT, "gin_configs"))
        macros = ("MODEL_DIR", "DATA_DIR", "EXPORT_DIR", "OUTPUT_DIR")
        gin.parse_config_files_and_bindings(
            [os.path.join(ROOT, "gin_configs", "runs", name)], [f"{m} = '/{m}'" for m in macros]
        )
        assert str(gin.query_parameter("evaluate.export_dir")) == "%EXPORT_DIR"
        assert gin.query_parameter("%EXPORT_DIR") == "/EXPORT_DIR"
        # the vocabulary and the lengths are the export's, not restated by the run file
        for setting in ("vocabulary", "input_length", "instruction_length"):
            with pytest.raises(ValueError):
                gin.query_parameter(f"evaluate.{setting}")
    finally:
        gin.clear_config()
