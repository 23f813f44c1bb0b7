"""PEFT LoRA and Hugging Face exports: parity with our model under transformers + peft, the
tokenizers' ids, refusals and atomic writes."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from tagi_jax.convert import hf_export, hf_t5, peft_export  # noqa: E402
from tagi_jax.models import lora, t5, tagi  # noqa: E402
from tagi_jax.models.tagi_config import HyperConfig, TagiConfig  # noqa: E402
from tagi_jax.testing import hf_t5_reference as hf_reference  # noqa: E402
from tagi_jax.testing import sentencepiece_model  # noqa: E402
from tagi_jax.testing.tiny_t5 import TINY_T5  # noqa: E402

pytestmark = pytest.mark.needs_torch

TOL = 1e-4
HYPERNET_SCALE = 0.5
INSTRUCTION = np.array([[17, 42, 99, 5, 230, 7, 61, 1, 0, 0]], np.int32)


def make_config(fusion=False, t5_config=TINY_T5, **hyper):
    hyper = {"rank": 4, "instruction_dim": 16, **hyper}
    return TagiConfig(t5=t5_config, hyper=HyperConfig(**hyper), fusion=fusion)


@functools.cache
def _params(config):
    # Fusion adds no parameters: a fusion student shares its twin's.
    if config.fusion:
        return _params(config.replace(fusion=False))
    # Random values drawn with numpy into the abstract tree: compiling `init_params` costs tens
    # of seconds on a busy CPU. Every hypernetwork weight is random, so the generated B is not
    # zero (as it is at a zero_b init) and the adapters move the logits.
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "scale":  # layer norms
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "kernel":
            value = rng.standard_normal(shape) / np.sqrt(shape[-2])
        elif name == "embedding":
            value = rng.standard_normal(shape)
        else:
            value = 0.1 * rng.standard_normal(shape)
        if path[0].key == "hypernet":
            value = HYPERNET_SCALE * value
        return value.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, tagi.abstract_params(config))


def make_params(config):
    """A student whose generated B is not zero (zero_b init): noise on the hypernetwork.
    Cached: initialisation dominates these tests' time on a busy CPU."""
    return _params(config)


# The reference side runs at full float32 matmul precision, as torch does on CPU; XLA's
# default differs from it by ~1e-4 once the adapters move the logits.
_forward = jax.jit(tagi.forward, static_argnums=0)
_t5_forward = jax.jit(t5.forward, static_argnums=0)


def student_logits(config, params, enc, dec, instruction=INSTRUCTION):
    rows = enc.shape[0]
    batch = {
        "encoder_input_tokens": jnp.asarray(enc),
        "hyper_input_tokens": jnp.asarray(np.repeat(instruction, rows, axis=0)),
        "decoder_input_tokens": jnp.asarray(dec),
    }
    with jax.default_matmul_precision("highest"):
        return np.asarray(_forward(config, params, batch)[0])


def base_logits(config, params, enc, dec):
    with jax.default_matmul_precision("highest"):
        return np.asarray(_t5_forward(config.t5, params["t5"], jnp.asarray(enc), jnp.asarray(dec)))


def load_peft(out, base=None):
    base_model = hf_reference.load_reference(base or os.path.join(out, "base"))
    return peft.PeftModel.from_pretrained(base_model, out).eval()


def assert_close(got, want):
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


# --- PEFT ----------------------------------------------------------------------------------

TARGET_SETS = {
    "default": {},
    "mlp_and_outputs_scanned": dict(
        t5_config=TINY_T5.replace(scan_layers=True),
        targets=(
            "enc_self.k",
            "enc_self.o",
            "dec_self.o",
            "dec_cross.k",
            "enc_ffn.wo",
            "dec_ffn.wi_0",
        ),
        lora_scale=0.5,
        divide_b_by_sqrt_rank=True,
    ),
}


@pytest.mark.parametrize("case", sorted(TARGET_SETS))
def test_peft_logits_equal_the_student(tmp_path, case):
    config = make_config(**TARGET_SETS[case])
    params = make_params(config)
    out = peft_export.write_peft(
        config, params, INSTRUCTION, str(tmp_path / "p"), vocabulary="byte"
    )
    enc, dec = hf_reference.padded_batch(config.t5.vocab_size)
    want = student_logits(config, params, enc, dec)
    model = load_peft(out)
    # the adapters matter: otherwise parity would say nothing
    with model.disable_adapter():
        base = hf_reference.reference_logits(model, enc, dec)
    assert np.abs(want - base).max() > 1e-2
    assert_close(hf_reference.reference_logits(model, enc, dec), want)

    # LoRA sits on exactly the adapted projections, one per block
    lora_modules = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    expected = {
        f"base_model.model.{n}"
        for t in config.hyper.targets
        for n in peft_export.hf_module_names(config, t)
    }
    assert lora_modules == expected
    with open(os.path.join(out, "adapter_config.json")) as f:
        adapter_config = json.load(f)
    assert adapter_config["lora_alpha"] / adapter_config["r"] == config.hyper.lora_scale
    assert adapter_config["task_type"] == "SEQ_2_SEQ_LM"
    with open(os.path.join(out, "instruction.json")) as f:
        record = json.load(f)
    assert record["instruction_ids"] == INSTRUCTION[0].tolist()
    assert record["instruction"] == hf_export.decode_ids("byte", INSTRUCTION[0])


def test_auto_peft_model_finds_the_base_and_tokenizer(tmp_path):
    config = make_config()
    params = make_params(config)
    out = peft_export.write_peft(
        config, params, INSTRUCTION, str(tmp_path / "p"), vocabulary="byte"
    )
    model = peft.AutoPeftModelForSeq2SeqLM.from_pretrained(out).eval()
    enc, dec = hf_reference.padded_batch(config.t5.vocab_size)
    assert_close(
        hf_reference.reference_logits(model, enc, dec), student_logits(config, params, enc, dec)
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("ab").input_ids == [ord("a") + 3, ord("b") + 3, 1]


def test_peft_with_a_given_base_dir(tmp_path):
    config = make_config()
    params = make_params(config)
    base = hf_export.write_hf(config.t5, params["t5"], str(tmp_path / "base"), vocabulary="byte")
    out = peft_export.write_peft(
        config, params, INSTRUCTION[0], str(tmp_path / "p"), vocabulary="byte", base_dir=base
    )
    assert not os.path.exists(os.path.join(out, "base"))
    with open(os.path.join(out, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == base
    enc, dec = hf_reference.padded_batch(config.t5.vocab_size)
    assert_close(
        hf_reference.reference_logits(load_peft(out, base), enc, dec),
        student_logits(config, params, enc, dec),
    )
    # a base inside the export would be deleted by overwriting it
    with pytest.raises(ValueError, match="must lie outside the export directory"):
        peft_export.write_peft(
            config,
            params,
            INSTRUCTION,
            str(tmp_path),
            vocabulary="byte",
            base_dir=base,
            overwrite=True,
        )
    # a base of another architecture is refused, naming the difference
    other_base = str(tmp_path / "b2")
    hf_reference.write_hf_t5(other_base, "v1_1", num_decoder_layers=2)
    with pytest.raises(ValueError, match="num_decoder_layers"):
        peft_export.write_peft(
            config,
            params,
            INSTRUCTION,
            str(tmp_path / "p2"),
            vocabulary="byte",
            base_dir=other_base,
        )


def test_fusion_students_are_refused_with_the_reason(tmp_path):
    fused = make_config(fusion=True)
    params = make_params(fused)
    with pytest.raises(ValueError, match="fusion.*decoder also cross-attends"):
        peft_export.write_peft(fused, params, INSTRUCTION, str(tmp_path / "p"), vocabulary="byte")
    with pytest.raises(ValueError, match="fusion"):
        hf_export.write_task_hf(fused, params, INSTRUCTION, str(tmp_path / "h"), vocabulary="byte")
    hier = make_config(t5_config=TINY_T5.replace(instruction_cross_attention=True))
    hier_params = {"t5": None}  # refused before any parameter is read
    for fused_states in (False, True):
        with pytest.raises(ValueError, match="instruction_cross_attention"):
            peft_export.write_peft(
                hier.replace(fusion=fused_states),
                hier_params,
                INSTRUCTION,
                str(tmp_path / "p"),
                vocabulary="byte",
                fused_states=fused_states,
            )
    with pytest.raises(ValueError, match="instruction_cross_attention"):
        hf_export.write_hf(hier.t5, hier_params["t5"], str(tmp_path / "h"), vocabulary="byte")
    with pytest.raises(ValueError, match="fusion is off"):
        peft_export.write_peft(
            make_config(),
            params,
            INSTRUCTION,
            str(tmp_path / "p"),
            vocabulary="byte",
            fused_states=True,
        )
    assert not os.listdir(tmp_path)  # nothing half-written


def test_fused_states_run_in_transformers(tmp_path):
    from safetensors.torch import load_file
    from transformers.modeling_outputs import BaseModelOutput

    config = make_config(fusion=True)
    params = make_params(config)
    out = peft_export.write_peft(
        config, params, INSTRUCTION, str(tmp_path / "p"), vocabulary="byte", fused_states=True
    )
    enc, dec = hf_reference.padded_batch(config.t5.vocab_size)
    model = load_peft(out)
    # the recipe of the peft_export docstring
    fused = load_file(os.path.join(out, "instruction_states.safetensors"))
    ids, mask = torch.tensor(enc, dtype=torch.long), torch.tensor(enc != 0, dtype=torch.long)
    dec_mask = dec != 0
    dec_mask[:, 0] = True
    with torch.no_grad():
        encoded = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        rows = ids.shape[0]
        memory = torch.cat([fused["instruction_states"].expand(rows, -1, -1), encoded], dim=1)
        memory_mask = torch.cat([fused["instruction_mask"].expand(rows, -1), mask], dim=1)
        logits = model(
            encoder_outputs=BaseModelOutput(last_hidden_state=memory),
            attention_mask=memory_mask,
            decoder_input_ids=torch.tensor(dec, dtype=torch.long),
            decoder_attention_mask=torch.tensor(dec_mask),
        ).logits.numpy()
    assert_close(logits, student_logits(config, params, enc, dec))


# --- HF T5 ---------------------------------------------------------------------------------


def test_hf_export_of_the_backbone_and_of_a_merged_task(tmp_path):
    config = make_config()
    params = make_params(config)
    enc, dec = hf_reference.padded_batch(config.t5.vocab_size)

    plain = hf_export.write_hf(config.t5, params["t5"], str(tmp_path / "plain"), vocabulary="byte")
    model = hf_reference.load_reference(plain)
    assert_close(
        hf_reference.reference_logits(model, enc, dec), base_logits(config, params, enc, dec)
    )

    _, adapters = tagi.encode_task(config, params, INSTRUCTION)
    merged = hf_export.write_hf(
        config.t5,
        params["t5"],
        str(tmp_path / "merged"),
        vocabulary="byte",
        adapters=adapters,
        student=config,
    )
    want = student_logits(config, params, enc, dec)
    assert_close(hf_reference.reference_logits(hf_reference.load_reference(merged), enc, dec), want)
    task = hf_export.write_task_hf(
        config, params, INSTRUCTION, str(tmp_path / "task"), vocabulary="byte"
    )
    assert_close(hf_reference.reference_logits(hf_reference.load_reference(task), enc, dec), want)

    two = lora.take(adapters, np.array([0, 0]))
    with pytest.raises(ValueError, match="adapters hold 2 rows"):
        hf_export.write_hf(
            config.t5, params["t5"], str(tmp_path / "two"), vocabulary="byte", adapters=two
        )


BYTE_SAMPLE = "Héllo, wörld! 你好 🙂\tend"


def test_byte_tokenizer_ids_equal_seqio(tmp_path):
    from tagi_jax.data import vocab

    hf_export.write_tokenizer("byte", str(tmp_path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = vocab.get_vocabulary("byte")
    assert tokenizer(BYTE_SAMPLE).input_ids == ours.encode(BYTE_SAMPLE) + [ours.eos_id]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert len(tokenizer) == ours.vocab_size == hf_export.vocabulary_size("byte")
    ids = ours.encode(BYTE_SAMPLE)
    assert hf_export.decode_ids("byte", ids + [1, 0]) == ours.decode(ids) == BYTE_SAMPLE


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    words = ["task", "answer", "question", "the", "sentence", "translate", "größe", "classify"]
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, 8)) + f" {i}" for i in range(600)]
    return sentencepiece_model.train(lines, str(tmp_path_factory.mktemp("spm")), vocab_size=80)


def test_sentencepiece_tokenizer_ids_equal_seqio(tmp_path, spm_dir):
    from tagi_jax.data import vocab

    ours = vocab.get_vocabulary("sentencepiece", spm_dir)
    config = make_config()
    assert config.t5.vocab_size >= ours.vocab_size
    params = make_params(config)
    out = hf_export.write_hf(config.t5, params["t5"], str(tmp_path / "hf"), vocabulary=spm_dir)
    assert os.path.isfile(os.path.join(out, "spiece.model"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    for text in ("translate the sentence größe 12", "  classify ÿ unknown 你 task", "answer"):
        assert tokenizer(text).input_ids == ours.encode(text) + [ours.eos_id], text
    assert len(tokenizer) == ours.vocab_size == hf_export.vocabulary_size(spm_dir)
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == ours.vocab_size - 1
    ids = ours.encode("translate the sentence")
    assert hf_export.decode_ids(spm_dir, ids + [1, 0]) == ours.decode(ids)
    # the model file itself names the vocabulary too
    instruction = np.array([ours.encode("classify the sentence") + [1]])
    peft_out = peft_export.write_peft(
        config,
        params,
        instruction,
        str(tmp_path / "p"),
        vocabulary=os.path.join(spm_dir, "spiece.model"),
    )
    assert transformers.AutoTokenizer.from_pretrained(peft_out)("task").input_ids == ours.encode(
        "task"
    ) + [1]


# --- bad input and atomic writes -----------------------------------------------------------


def test_bad_vocabularies_and_instructions(tmp_path):
    config = make_config()
    params = make_params(config)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        hf_export.write_hf(
            config.t5, params["t5"], str(tmp_path / "a"), vocabulary=str(tmp_path / "nowhere")
        )
    small = TINY_T5.replace(vocab_size=200)
    with pytest.raises(ValueError, match="emits 259 ids but the model's vocab_size is 200"):
        hf_export.write_hf(small, params["t5"], str(tmp_path / "b"), vocabulary="byte")
    for bad, message in (
        (np.repeat(INSTRUCTION, 2, 0), r"one non-empty row \[1, length\]"),
        (np.zeros((1, 4), np.int32), "all padding"),
        (INSTRUCTION.astype(np.float32), "integer ids"),
        (INSTRUCTION + 300, r"outside the instruction encoder's vocabulary \[0, 288\)"),
    ):
        with pytest.raises(ValueError, match=message):
            peft_export.write_peft(config, params, bad, str(tmp_path / "c"), vocabulary="byte")
    with pytest.raises(ValueError, match="targets is empty"):
        peft_export.write_peft(
            make_config(targets=()), params, INSTRUCTION, str(tmp_path / "d"), vocabulary="byte"
        )
    assert not os.listdir(tmp_path)


def test_overwrite_is_refused_unless_asked_and_writes_are_atomic(tmp_path, monkeypatch):
    config = make_config()
    params = make_params(config)
    out = str(tmp_path / "hf")
    hf_export.write_hf(config.t5, params["t5"], out, vocabulary="byte")
    before = set(os.listdir(out))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        hf_export.write_hf(config.t5, params["t5"], out, vocabulary="byte")
    # an HF directory is no PEFT output: never replaced by one, overwrite or not
    with pytest.raises(ValueError, match="not a PEFT LoRA directory"):
        peft_export.write_peft(config, params, INSTRUCTION, out, vocabulary="byte", overwrite=True)

    # a failure half-way leaves the old export as it was and no temporary directory behind
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_t5, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        hf_export.write_hf(config.t5, params["t5"], out, vocabulary="byte", overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        peft_export.write_peft(config, params, INSTRUCTION, str(tmp_path / "p"), vocabulary="byte")
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    assert set(os.listdir(out)) == before
    monkeypatch.undo()

    # asked to, it replaces the old export with the new one
    other = jax.tree.map(lambda x: x + 1.0, params["t5"])
    hf_export.write_hf(config.t5, other, out, vocabulary="byte", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    _, reloaded = hf_t5.load(out)
    jax.tree.map(np.testing.assert_array_equal, reloaded, other)
    # an empty directory (e.g. made by a job scheduler) is not an export to protect
    empty = tmp_path / "empty"
    empty.mkdir()
    hf_export.write_hf(config.t5, params["t5"], str(empty), vocabulary="byte")
    assert os.path.isfile(empty / "model.safetensors")


def test_export_cli_writes_peft_and_hf_from_an_export(tmp_path, capsys):
    """``python -m tagi_jax.export --peft / --hf`` read an export (the one format) and tokenize
    the instruction with its vocabulary; a fusion student's PEFT export is refused, naming why."""
    from tagi_jax import export
    from tagi_jax.artifacts import export_format

    data = export_format.data_settings(
        {"task": "tagi_suite_def", "feature_lengths": (("hyper_inputs", 32),), "vocabulary": "byte"}
    )
    exports = {}
    for fusion in (False, True):
        config = make_config(fusion=fusion)
        exports[fusion] = export_format.save(
            str(tmp_path / f"export_{fusion}"),
            config,
            make_params(config),
            vocabulary="byte",
            data=data,
        )
    instruction = "Definition: copy the input."
    out = tmp_path / "peft"
    argv = ["--peft", "--export", exports[False], "--instruction", instruction, "--out", str(out)]
    assert export.main(argv) == 0
    with open(out / "instruction.json") as f:
        record = json.load(f)
    ids = export._instruction_tokens(export_format.load(exports[False]), instruction)
    assert record["instruction_ids"] == ids[0].tolist()
    assert record["instruction"] == instruction
    assert (out / "adapter_model.safetensors").is_file() and (
        out / "base" / "config.json"
    ).is_file()
    refused = ["--peft", "--export", exports[True], "--instruction", instruction]
    assert export.main([*refused, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "fusion" in err and not (tmp_path / "refused").exists()
    assert export.main(["--peft", "--export", exports[False], "--out", str(tmp_path / "x")]) == 2
    assert "--instruction" in capsys.readouterr().err
    hf = tmp_path / "hf"
    assert export.main(["--hf", "--export", exports[True], "--out", str(hf)]) == 0
    model = transformers.T5ForConditionalGeneration.from_pretrained(str(hf))
    assert model.config.d_model == TINY_T5.d_model
