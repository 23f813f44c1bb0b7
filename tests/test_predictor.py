"""The one export format's reader and ``tagi_jax.predictor`` / ``python -m tagi_jax.predict``:
text in, text out, the instruction encoded once per task, the same answers as decoding each row
on its own, NI formatting as training's, and a reader that does not import the trainer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tagi_jax.artifacts import export_format
from tagi_jax.data import ni
from tagi_jax.data.tokens import encode_padded
from tagi_jax.models import tagi
from tagi_jax.models.tagi_config import HyperConfig, TagiConfig
from tagi_jax.predictor import Predictor, decode_text
from tagi_jax.testing.tiny_t5 import TINY_T5

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
LENGTHS = {"inputs": 24, "hyper_inputs": 32, "teacher_inputs": 40, "targets": 6}
NI_SETTINGS = {
    "task": "tagi_suite_def",
    "feature_lengths": LENGTHS,
    "vocabulary": "byte",
}


def _student(fusion: bool, seed: int = 0):
    """A tiny student whose adapters matter: the zero-initialised B generators get noise."""
    config = TagiConfig(t5=TINY_T5, hyper=HyperConfig(rank=4, instruction_dim=16), fusion=fusion)
    params = tagi.init_params(config, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 1000))
    params["hypernet"] = jax.tree.map(
        lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape, x.dtype), params["hypernet"]
    )
    return config, params


@pytest.fixture(scope="module", params=[True, False], ids=["fusion", "no_fusion"])
def exported(request, tmp_path_factory):
    config, params = _student(request.param)
    out = str(tmp_path_factory.mktemp("export") / "e")
    data = export_format.data_settings(NI_SETTINGS)
    export_format.save(out, config, params, vocabulary="byte", data=data, info={"step": 7})
    return out, config, params


def _by_row(config, params, vocab, instructions, inputs, max_decode_len):
    """Reference: every row decoded alone, its adapters generated from its own instruction."""
    answers = []
    for instruction, text in zip(instructions, inputs, strict=True):
        batch = {
            "encoder_input_tokens": jnp.asarray(encode_padded(vocab, [text], LENGTHS["inputs"])),
            "hyper_input_tokens": jnp.asarray(
                encode_padded(vocab, [instruction], LENGTHS["hyper_inputs"])
            ),
        }
        tokens = tagi.greedy_decode(config, params, batch, max_decode_len=max_decode_len)
        answers.append(decode_text(vocab, np.asarray(tokens)[0]))
    return answers


def test_export_round_trip_and_settings(exported):
    out, config, params = exported
    loaded = export_format.load(out)
    assert loaded.config == config and loaded.vocabulary_spec == "byte"
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert loaded.info["step"] == 7
    assert loaded.data["feature_lengths"] == LENGTHS
    assert loaded.data["hypernetwork_reads"] == "definition"  # the _def variant: 0 demos
    assert loaded.ni_config().pos_examples == 0


def test_generate_matches_row_by_row_decoding_and_encodes_once_per_task(exported):
    out, config, params = exported
    predictor = Predictor.load(out, batch_size=4)
    assert predictor.input_length == LENGTHS["inputs"]  # defaults from the export
    assert predictor.max_decode_len == LENGTHS["targets"]
    instructions = ["Definition: copy the input.", "Definition: reverse it."]
    inputs = ["abc", "hello", "xyz", "moon", "tree", "sun", "a b"]
    rows = [instructions[i % 2] for i in range(len(inputs))]  # tasks interleaved
    answers = predictor.generate(rows, inputs)
    expected = _by_row(config, params, predictor.vocabulary, rows, inputs, LENGTHS["targets"])
    assert answers == expected
    assert any(a for a in answers)  # not all empty: the comparison means something
    assert predictor.encodings == 2  # one per distinct instruction, whatever the row order
    predictor.generate(instructions[0], inputs[:3])
    assert predictor.encodings == 2  # cached across calls
    assert predictor.generate(instructions[1], "moon") == expected[3]  # a str in, a str out
    with pytest.raises(ValueError, match="2 instructions for 3 inputs"):
        predictor.generate(instructions, inputs[:3])


def test_adapters_are_the_hypernetworks(exported):
    out, config, params = exported
    predictor = Predictor.load(out)
    instruction = "Definition: copy the input."
    ids = encode_padded(predictor.vocabulary, [instruction], LENGTHS["hyper_inputs"])
    expected = tagi.generate_adapters(config, params, jnp.asarray(ids))
    got = predictor.adapters(instruction)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert float(jnp.abs(got.b[got.targets[0]]).max()) > 0  # the adapters are not zero


def test_format_ni_is_trainings(exported):
    out, _, _ = exported
    predictor = Predictor.load(out)
    demos = [{"input": "a", "output": "a"}]
    task = {"Definition": ["Copy the input."], "Positive Examples": demos}
    # the export trained on the _def variant (no demonstrations) with NIConfig's default
    # student input (definition + input)
    expected = ni.format_instance(task, {"input": "cat", "output": []}, num_pos_examples=0)
    assert predictor.format_ni("Copy the input.", "cat", demos) == (
        expected["hyper_inputs"],
        expected["inputs"],
    )
    assert "Positive Example" not in expected["hyper_inputs"]
    assert expected["inputs"].startswith("Definition: Copy the input.")


def _predict(*flags):
    cmd = [sys.executable, "-m", "tagi_jax.predict", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_predict_cli(exported, tmp_path):
    out, config, params = exported
    rows = [
        {"instruction": "Definition: copy the input.", "input": "abc", "id": "r1"},
        {"definition": "Copy the input.", "input": "hello"},
        {"instruction": "Definition: copy the input.", "input": "xyz"},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    preds = tmp_path / "preds.jsonl"
    result = _predict("--export", out, "--input", str(path), "--output", str(preds))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 instruction encodings for 3 rows" in result.stdout
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["r1", 2, 3]
    predictor = Predictor.load(out)
    instruction, text = predictor.format_ni("Copy the input.", "hello")
    assert [x["prediction"] for x in lines] == predictor.generate(
        ["Definition: copy the input.", instruction, "Definition: copy the input."],
        ["abc", text, "xyz"],
    )
    # bad rows: one error line naming the line; no output written
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"input": "no instruction"}) + "\n")
    result = _predict("--export", out, "--input", str(bad), "--output", str(tmp_path / "x"))
    assert result.returncode == 2 and f"{bad}:2" in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "x").exists()
    # an existing output is not overwritten unless asked
    result = _predict("--export", out, "--input", str(path), "--output", str(preds))
    assert result.returncode == 2 and "--overwrite" in result.stderr


@pytest.mark.slow
def test_reader_and_predictor_do_not_import_the_trainer(exported):
    out, _, _ = exported
    code = (
        "import sys; from tagi_jax.predictor import Predictor; "
        f"p = Predictor.load({out!r}); p.generate('Definition: x.', ['a']); "
        "bad = [m for m in sys.modules if m.startswith('tagi_jax.training')]; "
        "assert not bad, bad; print('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_bad_exports_are_named(exported, tmp_path):
    out, _, _ = exported
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Predictor.load(str(tmp_path / "nowhere"))
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    os.remove(broken / "data.json")
    with pytest.raises(export_format.ExportError, match="data.json"):
        Predictor.load(str(broken))
    (broken / "tagi_config.json").write_text("{}")
    with pytest.raises(export_format.ExportError, match="tagi_config.json: KeyError"):
        Predictor.load(str(broken))


@pytest.mark.slow
def test_beam_search_through_the_predictor(exported):
    """``beam_size > 1`` returns the best beam of ``beam_search`` (with per-task adapters
    expanded over the batch); beam 1 is greedy."""
    from tagi_jax.models import beam_search

    out, config, params = exported
    predictor = Predictor.load(out, batch_size=2)
    instruction, inputs = "Definition: copy the input.", ["abc", "moon"]
    beams = predictor.generate(instruction, inputs, beam_size=3, alpha=0.6)
    ids = encode_padded(predictor.vocabulary, [instruction] * 2, LENGTHS["hyper_inputs"])
    batch = {
        "encoder_input_tokens": jnp.asarray(
            encode_padded(predictor.vocabulary, inputs, LENGTHS["inputs"])
        ),
        "hyper_input_tokens": jnp.asarray(ids),
    }
    tokens, scores = beam_search.beam_search(
        config, params, batch, beam_size=3, max_decode_len=LENGTHS["targets"], alpha=0.6
    )
    assert beams == [decode_text(predictor.vocabulary, np.asarray(t)[0]) for t in tokens]
    assert np.all(np.diff(np.asarray(scores), axis=1) <= 0)  # best first
    assert predictor.generate(instruction, inputs, beam_size=1) == predictor.generate(
        instruction, inputs
    )
    with pytest.raises(ValueError, match="beam_size"):
        predictor.generate(instruction, inputs, beam_size=0)
