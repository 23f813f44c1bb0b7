"""Bad inputs to the export, evaluation and P3 rendering: nothing a user types loses a run,
writes or uses non-finite parameters, or renders a template's missing field silently.

Each case calls the CLI's ``main(argv)`` in-process (no subprocess: each would import JAX and
TensorFlow again) and checks the exit status, the one ``error:`` line and that nothing on disk
changed. The artifacts are the smallest real ones: a tiny student written by
``export_format.save``, a "run directory" that is only what makes one (``run.json``,
``checkpoints/``, metrics, TensorBoard events; no training), an export whose parameters were
poisoned through orbax, below ``save``'s checks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import gin
import jax
import numpy as np
import pytest

from tagi_jax import evaluate, export, predict
from tagi_jax.artifacts import export_format
from tagi_jax.data import p3
from tagi_jax.evaluation import p3_pipeline
from tagi_jax.models import tagi, trainable
from tagi_jax.models.tagi_config import HyperConfig, TagiConfig
from tagi_jax.predictor import Predictor
from tagi_jax.testing.tiny_t5 import TINY_T5

# Long enough for the NI evaluation's checks to pass and reach the export's parameters.
LENGTHS = {"inputs": 256, "hyper_inputs": 256, "targets": 8}
NI_SETTINGS = {"task": "tagi_suite_def", "feature_lengths": LENGTHS, "vocabulary": "byte"}
POISONED = "hypernet"  # the tree whose first tensor gets a NaN (or an Inf)
CONFIG = TagiConfig(t5=TINY_T5, hyper=HyperConfig(rank=4, instruction_dim=16), fusion=False)


# --- artifacts ---------------------------------------------------------------------------------


def _student():
    """A tiny student drawn with numpy (compiling ``tagi.init_params`` costs seconds)."""
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda leaf: (0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype),
        tagi.abstract_params(CONFIG),
    )
    return CONFIG, params


def _save(out, config, params, **kwargs):
    data = export_format.data_settings(NI_SETTINGS)
    return export_format.save(out, config, params, vocabulary="byte", data=data, **kwargs)


def _fake_run(path) -> str:
    """What makes a directory a training run, and what losing one would cost."""
    os.makedirs(os.path.join(path, "checkpoints", "4", "state"))
    with open(os.path.join(path, "checkpoints", "4", "state", "blob"), "wb") as f:
        f.write(b"trained weights")
    os.makedirs(os.path.join(path, "tensorboard"))
    with open(os.path.join(path, "tensorboard", "events.out.tfevents.1"), "wb") as f:
        f.write(b"events")
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.write('{"step": 4, "loss": 1.0}\n')
    with open(os.path.join(path, "run.json"), "w") as f:
        json.dump({"model": CONFIG.to_dict(), "data": NI_SETTINGS, "seed": 0}, f)
    return str(path)


def _snapshot(root) -> dict[str, str]:
    """Every path under ``root`` with its content's hash (directories: "dir")."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(directory, name), root)] = "dir"
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return found


@pytest.fixture(scope="module")
def student():
    return _student()


@pytest.fixture(scope="module")
def exported(student, tmp_path_factory):
    config, params = student
    return _save(str(tmp_path_factory.mktemp("export") / "e"), config, params, info={"step": 4})


@pytest.fixture(scope="module")
def poisoned(exported, tmp_path_factory):
    """A copy of ``exported`` with a NaN in one tensor, written by orbax itself: ``save``
    refuses to write it, as a bit flip, a foreign tool or an older tagi_jax would not."""
    import orbax.checkpoint as ocp

    out = str(tmp_path_factory.mktemp("poisoned") / "e")
    shutil.copytree(exported, out)
    params_dir = os.path.join(out, export_format.PARAMS_DIR)
    checkpointer = ocp.StandardCheckpointer()
    flat = dict(checkpointer.restore(params_dir))
    name = sorted(p for p in flat if p.startswith(POISONED))[0]
    value = np.array(flat[name])
    value.flat[0] = np.nan
    flat[name] = value
    shutil.rmtree(params_dir)
    checkpointer.save(params_dir, flat)
    checkpointer.wait_until_finished()
    return out, name


@pytest.fixture()
def workspace(tmp_path, exported):
    """A run, its sibling, a file, a foreign directory, an export copy with a stray file, a
    downloaded-looking HF model and a directory that only looks like a PEFT output."""
    runs = tmp_path / "runs"
    _fake_run(runs / "run")
    _fake_run(runs / "sibling")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("mine")
    shutil.copytree(exported, tmp_path / "export_plus")
    (tmp_path / "export_plus" / "README.md").write_text("mine")
    hub = tmp_path / "t5_download"
    hub.mkdir()
    for name in ("config.json", "model.safetensors", "README.md", ".gitattributes"):
        (hub / name).write_text("{}")
    return tmp_path


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# --- case 1: --out never loses a run or anything that is not a previous output ------------------

# (id, argv with {ws} = workspace and {e} = the export, what the error says, the path it names)
OUT_CASES = [
    (
        "run_is_out",
        "--model_dir {ws}/runs/run --out {ws}/runs/run --overwrite",
        "it is a training run directory",
        "{ws}/runs/run",
    ),
    (
        "parent_of_runs_is_out",
        "--model_dir {ws}/runs/run --out {ws}/runs --overwrite",
        "it contains the training run",
        "{ws}/runs",
    ),
    (
        "out_inside_checkpoints",
        "--model_dir {ws}/runs/run --out {ws}/runs/run/checkpoints --overwrite",
        "it lies inside the training run",
        "{ws}/runs/run/checkpoints",
    ),
    (
        "out_is_the_runs_own_export",
        "--model_dir {ws}/runs/run --out {ws}/runs/run/export --overwrite",
        "it is the export of the training run",
        "{ws}/runs/run/export",
    ),
    (
        "new_out_inside_a_run",
        "--model_dir {ws}/runs/run --out {ws}/runs/sibling/e",
        "it lies inside the training run",
        "{ws}/runs/sibling/e",
    ),
    (
        "out_is_a_file",
        "--model_dir {ws}/runs/run --out {ws}/notes.txt --overwrite",
        "it is a file",
        "{ws}/notes.txt",
    ),
    (
        "out_is_a_foreign_directory",
        "--model_dir {ws}/runs/run --out {ws}/mine --overwrite",
        "not a tagi_jax export (no export.json or tagi_config.json)",
        "{ws}/mine",
    ),
    (
        "out_is_an_export_holding_other_files",
        "--model_dir {ws}/runs/run --out {ws}/export_plus --overwrite",
        "holds what a tagi_jax export does not (README.md)",
        "{ws}/export_plus",
    ),
    (
        "peft_out_is_a_run",
        "--peft --export {e} --instruction x --out {ws}/runs/run --overwrite",
        "it is a training run directory",
        "{ws}/runs/run",
    ),
    (
        "peft_out_is_an_hf_model",
        "--peft --export {e} --instruction x --out {ws}/t5_download --overwrite",
        "not a PEFT LoRA directory (no adapter_config.json)",
        "{ws}/t5_download",
    ),
    (
        "hf_out_is_its_own_export",
        "--hf --export {e} --out {e} --overwrite",
        "which this output is made from",
        "{e}",
    ),
    (
        "hf_out_inside_its_own_export",
        "--hf --export {e} --out {e}/t5 --overwrite",
        "which this output is made from",
        "{e}/t5",
    ),
    (
        "hf_out_is_a_downloaded_model",
        "--hf --export {e} --out {ws}/t5_download --overwrite",
        "holds what a Hugging Face T5 does not (.gitattributes, README.md)",
        "{ws}/t5_download",
    ),
    (
        "hf_out_inside_a_run",
        "--hf --model_dir {ws}/runs/run --out {ws}/runs/run/hf",
        "it lies inside the training run",
        "{ws}/runs/run/hf",
    ),
]


@pytest.mark.parametrize(
    "argv, says, names", [c[1:] for c in OUT_CASES], ids=[c[0] for c in OUT_CASES]
)
def test_export_cli_refuses_out(argv, says, names, workspace, exported, capsys):
    def fill(text: str) -> str:
        return text.format(ws=workspace, e=exported)

    before, export_before = _snapshot(workspace), _snapshot(exported)
    assert export.main(fill(argv).split()) == 2
    line = _error_line(capsys)
    assert says in line and f"refusing to write {fill(names)}:" in line, line
    assert _snapshot(workspace) == before and _snapshot(exported) == export_before


@pytest.mark.parametrize(
    "out, kwargs",
    [
        ("new", {}),
        ("empty", {}),
        ("home/exports/e", {}),  # home/checkpoints holds models, not a run's steps
        ("runs/run/export", {"allow_run_export": True}),  # what the training loop writes
    ],
    ids=["new_path", "empty_dir", "beside_a_checkpoints_dir_of_models", "runs_own_export"],
)
def test_check_replaceable_lets_through(out, kwargs, workspace):
    (workspace / "empty").mkdir()
    (workspace / "home" / "checkpoints" / "t5-base").mkdir(parents=True)
    path = str(workspace / out)
    assert export_format.check_replaceable(path, "export", **kwargs) == path


def test_save_replaces_only_a_previous_export_and_the_runs_own(student, exported, tmp_path):
    """The rule lets through what it must: a previous export (swapped in only once complete,
    no leftovers) and ``<run>/export``, which the training loop writes (its call unchanged)."""
    config, params = student
    out = tmp_path / "e"
    shutil.copytree(exported, out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        _save(str(out), config, params)
    _save(str(out), config, params, info={"step": 9}, overwrite=True)
    assert export_format.read_info(str(out))["step"] == 9
    assert sorted(os.listdir(tmp_path)) == ["e"]  # no e.tmp, no .e.old-*

    run = _fake_run(tmp_path / "run")
    rest = _snapshot(run)
    for step in (1, 2):  # written, then replaced, as a finished run and its resumption do
        _save(os.path.join(run, "export"), config, params, info={"step": step}, overwrite=True)
    assert export_format.read_info(os.path.join(run, "export"))["step"] == 2
    after = _snapshot(run)
    assert {k: v for k, v in after.items() if not k.startswith("export")} == rest
    assert sorted(os.listdir(run)) == [
        "checkpoints",
        "export",
        "metrics.jsonl",
        "run.json",
        "tensorboard",
    ]


def test_stale_tmp_is_removed_only_when_it_is_a_half_written_export(student, tmp_path):
    config, params = student
    (tmp_path / "e.tmp").mkdir()
    (tmp_path / "e.tmp" / "thesis.tex").write_text("mine")
    with pytest.raises(export_format.OutputRefused, match=r"e\.tmp: it is not a half-written"):
        _save(str(tmp_path / "e"), config, params)
    assert (tmp_path / "e.tmp" / "thesis.tex").read_text() == "mine"
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("kind", ["--hf", "--peft"])
def test_cli_replaces_a_previous_output_of_its_kind(kind, exported, tmp_path, capsys):
    """What the writers write passes the rule: a previous output is replaced, with --overwrite."""
    argv = [kind, "--export", exported, "--instruction", "Reverse.", "--out", str(tmp_path / "o")]
    assert export.main(argv) == 0
    assert export.main(argv) == 2
    assert "--overwrite" in _error_line(capsys)
    assert export.main([*argv, "--overwrite"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["o"]


# --- case 2: non-finite parameters are neither written nor used ---------------------------------


def _nan_params(params):
    flat = dict(trainable.flatten(params))
    name = sorted(p for p in flat if p.startswith(POISONED))[0]
    value = np.array(flat[name])
    value.flat[0] = np.inf
    flat[name] = value
    return export_format.unflatten(flat, jax.tree.structure(params)), name


@pytest.mark.parametrize("overwrite", [False, True], ids=["new_out", "over_a_previous_export"])
def test_save_refuses_nonfinite_params(student, exported, tmp_path, overwrite):
    config, params = student
    bad, name = _nan_params(params)
    out = tmp_path / "e"
    if overwrite:
        shutil.copytree(exported, out)
    before = _snapshot(tmp_path)
    with pytest.raises(export_format.NonFiniteParamsError) as error:
        _save(str(out), config, bad, overwrite=overwrite)
    message = str(error.value)
    assert f"not writing {out}: 1 of " in message and name in message, message
    assert _snapshot(tmp_path) == before  # nothing written, the previous export intact


@pytest.mark.parametrize(
    "loader",
    [export_format.load, Predictor.load],
    ids=["export_format.load", "Predictor.load"],
)
def test_load_refuses_nonfinite_params(poisoned, loader):
    path, name = poisoned
    with pytest.raises(export_format.NonFiniteParamsError) as error:
        loader(path)
    assert f"refusing to load {path}: 1 of" in str(error.value) and name in str(error.value)


def _predict_argv(path, workspace):
    rows = workspace / "rows.jsonl"
    rows.write_text(json.dumps({"instruction": "Reverse.", "input": "cat"}) + "\n")
    return ["--export", path, "--input", str(rows), "--output", str(workspace / "out.jsonl")]


def _evaluate_argv(path, workspace):
    from tagi_jax.data import synthetic

    suite = workspace / "suite"
    synthetic.write_suite(str(suite), instances_per_train_task=2, instances_per_test_task=2)
    return [
        "--gin_file=runs/evaluate_suite.gin",
        f"--gin.EXPORT_DIR='{path}'",
        f"--gin.DATA_DIR='{suite}'",
        f"--gin.OUTPUT_DIR='{workspace / 'out'}'",
        "--gin.NIConfig.eval_instances_per_task=1",
    ]


NONFINITE_CLIS = [
    (
        "export_peft",
        export.main,
        lambda e, ws: f"--peft --export {e} --instruction x --out {ws}/out",
    ),
    ("export_hf", export.main, lambda e, ws: f"--hf --export {e} --out {ws}/out"),
    ("predict", predict.main, _predict_argv),
    ("evaluate", evaluate.main, _evaluate_argv),
]


@pytest.mark.parametrize(
    "main, argv", [c[1:] for c in NONFINITE_CLIS], ids=[c[0] for c in NONFINITE_CLIS]
)
def test_clis_refuse_nonfinite_export(main, argv, poisoned, tmp_path, capsys):
    path, name = poisoned
    argv = argv(path, tmp_path)
    argv = argv.split() if isinstance(argv, str) else argv
    try:
        assert main(argv) == 2
    finally:
        gin.clear_config()
    line = _error_line(capsys)
    assert f"refusing to load {path}: 1 of" in line and name in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.jsonl").exists()


# --- case 3: a P3 template using a field its records lack ---------------------------------------

RTE_RAW = "p3/raw/super_glue_rte/validation.jsonl"
BROKEN = {
    # a misspelt field: every prompt would lose the premise
    "misspelt": "{{ premisse }}\nDoes it follow that {{ hypothesis }}? ||| {{ answer_choices[label] }}",
    # the answer choices too draw on the record
    "in_choices": "{{ premise }} {{ hypothesis }}? ||| {{ answer_choices[label] }}",
}
FINE = {
    # an optional field, tested: not a use
    "optional": "{% if context %}{{ context }} {% endif %}{{ premise }} {{ hypothesis }}? ||| "
    "{{ answer_choices[label] }}",
    "defaulted": "{{ premise }} {{ source | default('') }} {{ hypothesis }} ||| "
    "{{ answer_choices[label] }}",
}


def _templates_yaml(path, templates: dict[str, str]) -> str:
    entries = {}
    for name, jinja in templates.items():
        choices = "{{ lable_yes }} ||| No" if name == "in_choices" else "Yes ||| No"
        entries[name] = {
            "id": f"id-{name}",
            "name": name,
            "jinja": jinja,
            "answer_choices": choices,
            "metadata": {"original_task": True, "choices_in_prompt": False, "metrics": []},
        }
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump({"dataset": "super_glue", "subset": "rte", "templates": entries}, f)
    return str(path)


@pytest.fixture()
def rte(shared_data_dir, tmp_path):
    raw = tmp_path / "raw.jsonl"
    with open(os.path.join(shared_data_dir, RTE_RAW)) as f:
        raw.write_text("".join(f.readlines()[:6]))
    return str(raw)


@pytest.mark.parametrize("name", sorted(BROKEN), ids=sorted(BROKEN))
def test_render_dataset_warns_once_and_counts_missing_fields(name, rte, tmp_path, caplog):
    templates = _templates_yaml(tmp_path / "t.yaml", {name: BROKEN[name], **FINE})
    with caplog.at_level(logging.WARNING, logger=p3.__name__):
        counts = p3.render_dataset(rte, templates, tmp_path / "out", dataset_name="rte")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    field = "premisse" if name == "misspelt" else "lable_yes"
    assert len(warnings) == 1 and f"template {name!r}" in warnings[0], warnings
    assert f"'{field}' that 6 records lack" in warnings[0]
    (task,) = counts.missing
    assert task == p3.task_name("rte", name) and counts.missing_renders == 6
    assert counts.missing[task]["fields"] == [field]
    assert set(counts) == {p3.task_name("rte", t) for t in (name, *FINE)}  # still written

    with pytest.raises(p3.MissingFieldError) as error:
        p3.render_dataset(rte, templates, tmp_path / "strict", dataset_name="rte", strict=True)
    message = str(error.value)
    assert f"template {name!r}" in message and "dataset rte" in message and field in message


def test_render_strict_names_template_dataset_and_field(rte):
    templates = p3.load_templates(
        _templates_yaml(os.path.join(os.path.dirname(rte), "t.yaml"), BROKEN)
    )
    (template,) = [t for t in templates if t.name == "misspelt"]
    record = next(p3.read_jsonl(rte))
    with pytest.raises(p3.MissingFieldError, match=r"dataset super_glue/rte uses field\(s\) 'prem"):
        p3.render(template, record, strict=True)
    assert p3.render(template, record)["inputs_pretokenized"].startswith("Does it follow")


def test_real_templates_use_no_missing_field(shared_data_dir):
    """Every promptsource template of the shared data on its first records, strictly: the
    check has no false alarms (optional fields tested with {% if %} and the like)."""
    root = os.path.join(shared_data_dir, "p3")
    with open(os.path.join(root, "manifest.json")) as f:
        manifest = json.load(f)
    rendered = 0
    for entry in manifest:
        with open(os.path.join(root, entry["file"])) as f:
            records = [json.loads(line) for line in f.readlines()[:25]]
        for template in p3.load_templates(os.path.join(root, entry["templates"])):
            for index, record in enumerate(records):
                p3.render(template, record, index=index, strict=True)
                rendered += 1
    assert rendered > 2000


@pytest.fixture()
def shared_p3_lookalike(rte, tmp_path):
    """The shared P3 folder's layout with one training dataset whose template is misspelt."""
    root = tmp_path / "shared_p3"
    (root / "raw").mkdir(parents=True)
    shutil.copy(rte, root / "raw" / "rt.jsonl")
    _templates_yaml(root / "templates.yaml", {"misspelt": BROKEN["misspelt"], **FINE})
    manifest = [
        {
            "name": "rotten_tomatoes",
            "role": "train",
            "file": "raw/rt.jsonl",
            "promptsource_dataset": "rotten_tomatoes",
            "promptsource_subset": None,
            "templates": "templates.yaml",
        }
    ]
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.mark.parametrize("strict", [False, True], ids=["warns", "strict"])
def test_render_layout_cli(strict, shared_p3_lookalike, tmp_path, capsys):
    argv = ["--shared_p3", str(shared_p3_lookalike), "--out", str(tmp_path / "p3")]
    argv += ["--eval_datasets"] + (["--strict"] if strict else [])
    status = p3_pipeline.main(argv)
    if strict:
        assert status == 2
        line = _error_line(capsys)
        assert "template 'misspelt'" in line and "dataset rotten_tomatoes" in line, line
        assert "'premisse'" in line
    else:
        assert status == 0
        err = capsys.readouterr().err
        assert "warning: 6 renders in 1 task(s) used fields their records lack" in err, err
        assert "rotten_tomatoes_misspelt" in err
