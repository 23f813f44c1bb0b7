"""Run directories, checkpoints, exports and metrics in cloud storage (``gs://``) as on local disk.

Every I/O test runs twice: on a local temporary directory and on a fake ``gs://`` bucket
(``tagi_jax.testing.fake_gcs``: an in-process GCS emulator on 127.0.0.1 that gcsfs, epath and
orbax's TensorStore all talk to; no network). The ``gs`` cases skip when the test dependencies
``gcp-storage-emulator`` / ``gcsfs`` are missing.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tagi_jax import paths
from tagi_jax.artifacts import backbone, export_format
from tagi_jax.convert import param_checkpoint
from tagi_jax.convert.tensor_store import CheckpointError
from tagi_jax.models import tagi, trainable
from tagi_jax.models.tagi_config import HyperConfig, TagiConfig
from tagi_jax.testing.tiny_t5 import TINY_T5
from tagi_jax.testing.trees import assert_trees_equal

CONFIG = TagiConfig(t5=TINY_T5, hyper=HyperConfig(rank=4, instruction_dim=16), fusion=False)
DATA = {"task": "tagi_suite_def", "feature_lengths": {"inputs": 32}, "vocabulary": "byte"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
    """A fresh directory: local, or a fresh prefix of the fake bucket."""
    if request.param == "local":
        return str(tmp_path)
    return f"{request.getfixturevalue('bucket')}/{uuid.uuid4().hex[:8]}"


def _student(config=CONFIG, seed=0):
    """A tiny student drawn with numpy (compiling ``tagi.init_params`` costs seconds)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda leaf: (0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype),
        tagi.abstract_params(config),
    )


def _write(path: str, text: str) -> None:
    paths.makedirs(paths.dirname(path))
    paths.write_text(path, text)


# --- names: no I/O ------------------------------------------------------------------------------


def test_absolute_leaves_uris_alone_and_makes_local_paths_absolute():
    assert paths.absolute("gs://b/run") == "gs://b/run"
    assert paths.absolute("gs://b/run/") == "gs://b/run"
    assert paths.absolute("gs://b//run/./x") == "gs://b/run/x"
    assert paths.absolute("gs://b") == "gs://b"
    assert paths.absolute("relative/x") == os.path.join(os.getcwd(), "relative", "x")
    assert os.path.abspath("gs://b/run") != "gs://b/run"  # what this module exists for
    assert paths.realpath("gs://b/x/") == "gs://b/x"
    assert paths.is_uri("gs://b/x") and paths.is_uri("s3://b") and not paths.is_uri("/gs:/b")
    assert paths.is_local("runs/x") and paths.scheme("GS://b") == "gs"


def test_joins_parents_and_containment_keep_the_scheme():
    assert paths.join("gs://b/run", "export", "t5") == "gs://b/run/export/t5"
    assert paths.join("gs://b/run/", "x") == "gs://b/run/x"
    assert paths.join("gs://b/e", "gs://c/base") == "gs://c/base"  # a URI part wins
    assert paths.join("gs://b/e", "/local/base") == "/local/base"  # so does an absolute one
    assert paths.join("/e", "gs://c/base") == "gs://c/base"
    assert paths.join("/e", "t5") == "/e/t5"
    assert paths.dirname("gs://b/run/export") == "gs://b/run"
    assert paths.dirname("gs://b/run") == "gs://b"
    assert paths.dirname("gs://b") == "gs://b"  # the bucket is its own parent, as / is
    assert paths.basename("gs://b/run/export/") == "export"
    assert paths.is_within("gs://b/run/export", "gs://b/run")
    assert paths.is_within("gs://b/run", "gs://b/run")
    assert not paths.is_within("gs://b/run2", "gs://b/run")
    assert not paths.is_within("/b/run/x", "gs://b/run")
    assert paths.is_within("/a/b", "/a") and not paths.is_within("/ab", "/a")
    assert paths.relpath("gs://b/run/x/y", "gs://b/run") == "x/y"
    with pytest.raises(ValueError, match="does not lie in"):
        paths.relpath("gs://b/x", "gs://b/run")


def test_hf_directories_must_be_local():
    assert paths.require_local("/models/t5", "a Hugging Face T5 directory") == "/models/t5"
    with pytest.raises(ValueError, match="must be a local directory.*parameter checkpoint"):
        paths.require_local("gs://b/t5", "a Hugging Face T5 directory")


def test_epath_is_told_to_use_gcsfs_not_tensorflow(monkeypatch):
    """With gcsfs installed, epath must not read gs:// through tf.io.gfile (TensorFlow is
    imported only inside tagi_jax.data); an explicit EPATH_USE_TF is left alone."""
    import importlib.util

    monkeypatch.delenv("EPATH_USE_TF", raising=False)
    paths._configure_epath_backend()
    expected = "false" if importlib.util.find_spec("gcsfs") else None
    assert os.environ.get("EPATH_USE_TF") == expected
    monkeypatch.setenv("EPATH_USE_TF", "true")
    paths._configure_epath_backend()
    assert os.environ["EPATH_USE_TF"] == "true"


def test_no_abspath_of_a_uri_in_the_converted_modules():
    """The modules that read and write run directories, exports and reports go through
    ``tagi_jax.paths``: ``os.path.abspath`` (which turns gs://b/x into <cwd>/gs:/b/x) and the
    other local-only calls are not used there."""
    from tagi_jax import export, predict, predictor
    from tagi_jax.convert import hf_export, peft_export
    from tagi_jax.evaluation import comparison, p3_pipeline, pipeline

    banned = ("os.path.", "os.makedirs", "os.replace", "os.walk", "os.listdir", "shutil.")
    modules = [backbone, export_format, param_checkpoint, hf_export, peft_export, export]
    modules += [predict, predictor, pipeline, p3_pipeline, comparison]
    for module in modules:
        source = inspect.getsource(module)
        used = [b for b in banned if b in source]
        assert not used, f"{module.__name__} uses {used}: use tagi_jax.paths"
        assert " open(" not in source, f"{module.__name__} opens files without tagi_jax.paths"


# --- files --------------------------------------------------------------------------------------


def test_atomic_json_and_text(root):
    file = paths.join(root, "run", "run.json")
    paths.makedirs(paths.dirname(file))
    paths.write_json(file, {"b": 1, "a": [1, 2]})
    assert paths.read_json(file) == {"a": [1, 2], "b": 1}
    assert paths.read_text(file).startswith('{\n  "a"')  # sorted, indented
    paths.write_json(file, {"step": 2})  # replaces
    assert paths.read_json(file) == {"step": 2}
    assert paths.listdir(paths.dirname(file)) == ["run.json"]  # no temporary file left
    _write(paths.join(root, "run", "notes.md"), "héllo\n")
    assert paths.read_text(paths.join(root, "run", "notes.md")) == "héllo\n"
    assert paths.read_bytes(paths.join(root, "run", "notes.md")) == "héllo\n".encode()
    with pytest.raises(FileNotFoundError):
        paths.read_json(paths.join(root, "run", "missing.json"))


def test_append_keeps_what_was_there(root):
    """metrics.jsonl across a resume: gcsfs's open(path, "a") would overwrite on gs://."""
    file = paths.join(root, "metrics.jsonl")
    paths.makedirs(root)
    paths.append_text(file, '{"step": 1}\n')
    paths.append_text(file, '{"step": 2}\n')
    assert paths.read_text(file) == '{"step": 1}\n{"step": 2}\n'


def test_a_failed_local_write_keeps_the_previous_file(tmp_path, monkeypatch):
    file = str(tmp_path / "metrics.json")
    paths.write_json(file, {"step": 1})
    mode = os.stat(file).st_mode & 0o777
    assert mode == 0o666 & ~paths._UMASK  # what open() would give, not mkstemp's 0600

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space"):
        paths.write_json(file, {"step": 2})
    assert paths.read_json(file) == {"step": 1}
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_directory_operations(root):
    top = paths.join(root, "d")
    _write(paths.join(top, "a.txt"), "a")
    _write(paths.join(top, "sub", "b.txt"), "bb")
    assert paths.exists(top) and paths.isdir(top) and not paths.isfile(top)
    assert paths.isfile(paths.join(top, "a.txt")) and not paths.isdir(paths.join(top, "a.txt"))
    assert not paths.exists(paths.join(root, "nothing")) and not paths.isdir(paths.join(root, "x"))
    assert not paths.islink(top)
    assert sorted(paths.listdir(top)) == ["a.txt", "sub"]
    assert paths.getsize(paths.join(top, "sub", "b.txt")) == 2
    walked = {paths.relpath(r, top): sorted(f) for r, _, f in paths.walk(top)}
    assert walked == {".": ["a.txt"], "sub": ["b.txt"]}
    with pytest.raises(FileNotFoundError):
        paths.listdir(paths.join(root, "nothing"))

    # swap: the new directory replaces the old one whole; the old one is gone afterwards
    new = paths.join(root, "new")
    _write(paths.join(new, "c.txt"), "c")
    _write(paths.join(new, "done"), "marker")
    paths.swap_dir(new, top, last=["done"])
    assert sorted(paths.listdir(top)) == ["c.txt", "done"]
    assert not paths.exists(new)
    assert sorted(paths.listdir(root)) == ["d"]  # no aside copy left behind
    # a local directory into a cloud one too (how HF / PEFT outputs reach gs://)
    local = paths.local_dir_for(paths.join(root, "hf"), ".tmp-")
    _write(paths.join(local, "config.json"), "{}")
    paths.swap_dir(local, paths.join(root, "hf"), last=["config.json"])
    assert paths.listdir(paths.join(root, "hf")) == ["config.json"]
    assert not os.path.exists(local)
    paths.rmtree(top)
    assert not paths.exists(top)
    paths.rmtree(top, missing_ok=True)


def test_copy_puts_the_marker_last(bucket, monkeypatch):
    """A copied directory (a cloud "rename") gets its completeness marker only after every
    other file, and a deleted one loses it first."""
    src = f"{bucket}/order-{uuid.uuid4().hex[:6]}"
    for name in ("tagi_config.json", "a", "params/x", "export.json"):
        _write(paths.join(src, name), name)
    copied = []
    real_copy = paths.copyfile
    monkeypatch.setattr(paths, "copyfile", lambda s, d: (copied.append(d), real_copy(s, d)))
    paths.move_dir(src, src + "-moved", last=["export.json", "tagi_config.json"])
    assert [paths.basename(d) for d in copied[-2:]] == ["export.json", "tagi_config.json"]
    assert not paths.exists(src)


# --- checkpoints and exports --------------------------------------------------------------------


def test_param_checkpoint_round_trip(root):
    params = _student()["t5"]
    directory = paths.join(root, "base")
    param_checkpoint.save(directory, TINY_T5, params)
    config, loaded = param_checkpoint.load(directory)
    assert config == TINY_T5
    assert_trees_equal(params, loaded)
    # a backbone source: the checkpoint itself, an export's t5/, a run's export/t5
    _, via_backbone = backbone.load_t5(directory)
    assert_trees_equal(params, via_backbone)
    assert backbone.fingerprint(directory) == backbone.fingerprint(directory)
    with pytest.raises(FileExistsError, match="already exists"):
        param_checkpoint.save(directory, TINY_T5, params)
    with pytest.raises(CheckpointError, match="does not exist"):
        param_checkpoint.load(paths.join(root, "nothing"))


def test_export_round_trip(root, tmp_path):
    params = _student()
    spiece = tmp_path / "spiece.model"
    spiece.write_bytes(b"not really a sentencepiece model")  # copied and hashed, not parsed
    out = paths.join(root, "exports", "e")
    data = export_format.data_settings(DATA)
    written = export_format.save(
        out, CONFIG, params, vocabulary=str(spiece), data=data, info={"step": 3}
    )
    assert written == paths.absolute(out)
    assert paths.isfile(paths.join(out, export_format.CONFIG_FILE))
    assert not paths.exists(out + ".tmp")
    loaded = export_format.load(out)
    assert_trees_equal(params, loaded.params)
    assert loaded.config == CONFIG and loaded.info["step"] == 3
    assert loaded.vocabulary_spec == paths.join(out, export_format.SPIECE_FILE)
    assert loaded.data == json.loads(json.dumps(data))

    # replaced only with overwrite, and then whole
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_format.save(out, CONFIG, params, vocabulary="byte", data=data)
    other = _student(seed=1)
    export_format.save(out, CONFIG, other, vocabulary="byte", data=data, overwrite=True)
    again = export_format.load(out)
    assert_trees_equal(other, again.params)
    assert again.vocabulary_spec == "byte"
    assert sorted(paths.listdir(paths.join(root, "exports"))) == ["e"]  # nothing set aside


def test_export_with_a_referenced_base(root):
    """The base stays where it is (here: beside the export) and is checked on load."""
    params = _student()
    base = paths.join(root, "base")
    param_checkpoint.save(base, TINY_T5, params["t5"])
    flat_base = {f"t5/{p}": v for p, v in trainable.flatten(params["t5"]).items()}
    reference = export_format.BaseReference(
        path=base,
        provided=frozenset(flat_base),
        fingerprint=export_format.fingerprint(flat_base),
    )
    out = paths.join(root, "e")
    data = export_format.data_settings(DATA)
    export_format.save(out, CONFIG, params, vocabulary="byte", data=data, base_reference=reference)
    assert not paths.exists(paths.join(out, export_format.BASE_DIR))
    assert paths.read_json(paths.join(out, export_format.BASE_FILE))["path"] == base
    assert_trees_equal(params, export_format.load(out).params)
    assert export_format.sources_of(out) == [paths.absolute(out), base]


def test_outputs_are_never_written_into_a_run(root):
    run = paths.join(root, "run")
    paths.makedirs(run)
    paths.write_json(paths.join(run, "run.json"), {"model": CONFIG.to_dict()})
    _write(paths.join(run, "metrics.jsonl"), '{"step": 1}\n')
    for out in (paths.join(run, "x"), run, root):
        with pytest.raises(export_format.OutputRefused, match="training run"):
            export_format.check_replaceable(out, "export")
    # the run's own export slot, for the training loop only
    slot = paths.join(run, "export")
    assert export_format.check_replaceable(slot, "export", allow_run_export=True) == slot
    with pytest.raises(export_format.OutputRefused, match="only the run writes"):
        export_format.check_replaceable(slot, "export")
    # not over what is not an export
    _write(paths.join(root, "notes", "todo.txt"), "keep me")
    with pytest.raises(export_format.OutputRefused, match="not a tagi_jax export"):
        export_format.check_replaceable(paths.join(root, "notes"), "export", overwrite=True)
    assert paths.read_text(paths.join(root, "notes", "todo.txt")) == "keep me"


def test_hf_export_to_cloud_and_hf_dirs_stay_local(root):
    """An HF directory can be written anywhere (staged locally, then copied, config.json
    last), but a backbone is read from one only when it is local (memory-mapped)."""
    from tagi_jax.convert import hf_export

    out = paths.join(root, "hf")
    params = _student()["t5"]
    assert hf_export.write_hf(TINY_T5, params, out, vocabulary="byte") == paths.absolute(out)
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= set(paths.listdir(out))
    if paths.is_uri(root):
        with pytest.raises(CheckpointError, match="must be a local directory"):
            backbone.load_t5(out)
    else:
        config, loaded = backbone.load_t5(out)
        assert config.d_model == TINY_T5.d_model
        np.testing.assert_allclose(
            np.asarray(loaded["token_embedder"]["embedding"]),
            np.asarray(params["token_embedder"]["embedding"]),
        )


def test_evaluation_report(root):
    from tagi_jax.evaluation import ni_metrics, pipeline

    examples = [
        {"task_name": f"task{i % 2}", "instance_id": str(i), "category": "c", "references": [r]}
        for i, r in enumerate(["yes", "no", "maybe", "so"])
    ]
    preds = ["yes", "zz", "maybe", "zz"]
    keys = ("references", "task_name", "category")
    results = ni_metrics.score(preds, *([e[k] for e in examples] for k in keys))
    results["predictions"] = preds
    out = paths.join(root, "eval")
    report = pipeline.write_report(out, examples, results, header={"split": "test"})
    assert paths.read_json(paths.join(out, "results.json"))["overall"] == report["overall"]
    lines = paths.read_text(paths.join(out, "predictions.jsonl")).splitlines()
    assert [json.loads(line)["prediction"] for line in lines] == preds
    assert "c" in paths.read_text(paths.join(out, "results.md"))


def test_checkpointer_round_trip(root, tmp_path, monkeypatch):
    """The trainer's checkpoints land where MODEL_DIR says (gs:// included) and restore."""
    import optax

    from tagi_jax.training import checkpointing
    from tagi_jax.training import state as state_lib

    monkeypatch.chdir(tmp_path)  # an abspath'd URI would land here, not in the repository
    model_dir = paths.join(root, "run")
    state = state_lib.init_state({"w": jnp.arange(12.0).reshape(3, 4)}, optax.adam(1e-3), 0)
    ckpt = checkpointing.Checkpointer(model_dir, config_json="model-a", keep=2)
    try:
        ckpt.save(1, state, examples=8)
        assert ckpt.latest_step() == 1
        # where it was asked to go (an abspath'd gs:// would be <cwd>/gs:/...)
        assert ckpt.directory == paths.join(paths.absolute(model_dir), "checkpoints")
        assert paths.isdir(paths.join(model_dir, "checkpoints", "1"))
        assert not os.path.exists(tmp_path / "gs:")
        restored, meta = ckpt.restore(state)
    finally:
        ckpt.close()
    assert meta["examples"] == 8
    assert_trees_equal(state.trainable, restored.trainable)


def test_local_paths_need_no_cloud_library(tmp_path):
    """Without gcsfs (nor the Google Cloud clients), local exports, checkpoints and JSON work,
    and nothing of it imports TensorFlow."""
    script = f"""
import sys

for name in ("gcsfs", "google.cloud.storage", "google.cloud.storage_control_v2"):
    sys.modules[name] = None  # as if not installed: import fails, find_spec says None
sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
from test_cloud_paths import CONFIG, DATA, _student
from tagi_jax.testing.trees import assert_trees_equal
from tagi_jax import paths
from tagi_jax.artifacts import export_format

out = {str(tmp_path / "e")!r}
params = _student()
export_format.save(out, CONFIG, params, vocabulary="byte", data=export_format.data_settings(DATA))
assert_trees_equal(params, export_format.load(out).params)
paths.write_json(out + "/../x.json", {{"a": 1}})
assert paths.read_json(out + "/../x.json") == {{"a": 1}}
bad = [m for m, v in sys.modules.items() if v and m.split(".")[0] in ("gcsfs", "tensorflow")]
assert not bad, bad
print("ok")
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    env.pop("EPATH_USE_TF", None)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
