"""Hugging Face checkpoint reading and writing: formats, round trips and bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from tagi_jax.convert import hf_t5, param_checkpoint  # noqa: E402
from tagi_jax.convert.tensor_store import CheckpointError  # noqa: E402
from tagi_jax.models import t5  # noqa: E402
from tagi_jax.testing import hf_t5_reference as hf_reference  # noqa: E402

pytestmark = pytest.mark.needs_torch


@pytest.fixture(scope="module")
def v11_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("v1_1"))
    hf_reference.write_hf_t5(directory, "v1_1", seed=5)
    return directory


def _logits(config, params, vocab_size):
    enc, dec = hf_reference.padded_batch(vocab_size)
    return np.asarray(t5.forward(config, params, jnp.asarray(enc), jnp.asarray(dec)))


@pytest.mark.parametrize("variant", hf_reference.VARIANTS)
@pytest.mark.parametrize("scan_layers", [False, True])
def test_load_save_from_pretrained_round_trip(tmp_path, variant, scan_layers):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    reference = hf_reference.write_hf_t5(src, variant, seed=7)
    config, params = hf_t5.load(src, scan_layers=scan_layers)
    hf_t5.save(config, params, dst)
    reloaded = hf_reference.load_reference(dst)
    enc, dec = hf_reference.padded_batch(config.vocab_size)
    original = hf_reference.reference_logits(reference, enc, dec)
    np.testing.assert_allclose(
        hf_reference.reference_logits(reloaded, enc, dec), original, atol=1e-6, rtol=0
    )
    # and the saved directory reads back into the same parameters
    config2, params2 = hf_t5.load(dst, scan_layers=scan_layers)
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_sharded_safetensors_index(tmp_path, v11_dir):
    full_config, full_params = hf_t5.load(v11_dir)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(os.path.join(v11_dir, "config.json"), sharded)
    model = hf_reference.load_reference(v11_dir)
    model.save_pretrained(str(sharded), max_shard_size="100KB")
    assert os.path.exists(sharded / "model.safetensors.index.json")
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    config, params = hf_t5.load(str(sharded))
    assert config == full_config
    jax.tree.map(np.testing.assert_array_equal, params, full_params)


def test_pytorch_bin(tmp_path, v11_dir):
    model = hf_reference.load_reference(v11_dir)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(os.path.join(v11_dir, "config.json"), bin_dir)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, bin_dir / "pytorch_model.bin")
    config, params = hf_t5.load(str(bin_dir))
    ref_config, ref_params = hf_t5.load(v11_dir)
    assert config == ref_config
    jax.tree.map(np.testing.assert_array_equal, params, ref_params)


def test_bfloat16_safetensors(tmp_path, v11_dir):
    model = hf_reference.load_reference(v11_dir).to(torch.bfloat16)
    bf_dir = tmp_path / "bf16"
    bf_dir.mkdir()
    shutil.copy(os.path.join(v11_dir, "config.json"), bf_dir)
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        state.pop(alias)
    save_file(state, str(bf_dir / "model.safetensors"), metadata={"format": "pt"})
    config, params = hf_t5.load(str(bf_dir), param_dtype="bfloat16")
    leaf = params["encoder"]["layers_0"]["attention"]["query"]["kernel"]
    assert leaf.dtype == jnp.bfloat16
    expected = state["encoder.block.0.layer.0.SelfAttention.q.weight"].float().numpy().T
    np.testing.assert_array_equal(np.asarray(leaf, dtype=np.float32), expected)
    # bf16 parameters write back as bf16 tensors that transformers reads
    out = tmp_path / "bf16_out"
    hf_t5.save(config, params, str(out))
    reloaded = hf_reference.load_reference(str(out))
    assert reloaded.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("vocab_size", [32100, 32128])
def test_real_vocabulary_sizes(tmp_path, vocab_size):
    hf_reference.write_hf_t5(
        str(tmp_path), "v1_1", vocab_size=vocab_size, num_layers=1, num_decoder_layers=1
    )
    config, params = hf_t5.load(str(tmp_path))
    assert config.vocab_size == vocab_size
    assert params["token_embedder"]["embedding"].shape == (vocab_size, 64)
    assert params["decoder"]["logits_dense"]["kernel"].shape == (64, vocab_size)


# --- bad input ---------------------------------------------------------------------------


def test_missing_directory_is_not_a_hub_lookup(tmp_path):
    missing = str(tmp_path / "nope" / "t5-base")
    with pytest.raises(CheckpointError, match="does not exist"):
        hf_t5.load(missing)


def test_missing_config(tmp_path, v11_dir):
    shutil.copy(os.path.join(v11_dir, "model.safetensors"), tmp_path)
    with pytest.raises(CheckpointError, match="config.json"):
        hf_t5.load(str(tmp_path))


def test_unreadable_config(tmp_path, v11_dir):
    shutil.copy(os.path.join(v11_dir, "model.safetensors"), tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        hf_t5.load(str(tmp_path))


def test_missing_weights(tmp_path, v11_dir):
    shutil.copy(os.path.join(v11_dir, "config.json"), tmp_path)
    with pytest.raises(CheckpointError, match="no weights"):
        hf_t5.load(str(tmp_path))


def test_not_t5(tmp_path, v11_dir):
    shutil.copy(os.path.join(v11_dir, "model.safetensors"), tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "bart", "architectures": ["BartModel"]})
    )
    with pytest.raises(CheckpointError, match="not a T5 checkpoint"):
        hf_t5.load(str(tmp_path))


def test_shape_mismatch_names_tensor(tmp_path, v11_dir):
    shutil.copy(os.path.join(v11_dir, "model.safetensors"), tmp_path)
    hf = json.loads(Path(v11_dir, "config.json").read_text())
    hf["d_ff"] = 96
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=r"DenseReluDense\.wi_0\.weight.*shape"):
        hf_t5.load(str(tmp_path))


def test_vocab_mismatch_names_tensor(tmp_path, v11_dir):
    shutil.copy(os.path.join(v11_dir, "model.safetensors"), tmp_path)
    hf = json.loads(Path(v11_dir, "config.json").read_text())
    hf["vocab_size"] = 300
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(
        CheckpointError, match=r"(shared|lm_head)\.weight.*\(288, 64\).*\(300, 64\)"
    ):
        hf_t5.load(str(tmp_path))


def test_missing_tensor_is_named(tmp_path, v11_dir):
    from safetensors.numpy import load_file, save_file

    state = load_file(os.path.join(v11_dir, "model.safetensors"))
    del state["decoder.block.1.layer.1.EncDecAttention.v.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(os.path.join(v11_dir, "config.json"), tmp_path)
    with pytest.raises(
        CheckpointError, match=r"decoder\.block\.1\.layer\.1\.EncDecAttention\.v\.weight"
    ):
        hf_t5.load(str(tmp_path))


def test_truncated_weight_file(tmp_path, v11_dir):
    data = Path(v11_dir, "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    shutil.copy(os.path.join(v11_dir, "config.json"), tmp_path)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        hf_t5.load(str(tmp_path))


# --- orbax parameter checkpoints --------------------------------------------------------


@pytest.mark.slow
def test_cli_writes_orbax_checkpoint(tmp_path, v11_dir):
    out = tmp_path / "orbax"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = ""
    cmd = [sys.executable, "-m", "tagi_jax.convert.hf_t5", "--hf_dir", v11_dir, "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    config, params = param_checkpoint.load(str(out))
    ref_config, ref_params = hf_t5.load(v11_dir)
    assert config == ref_config
    jax.tree.map(np.testing.assert_array_equal, params, ref_params)
    # a second conversion into the same directory must not replace the checkpoint
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2
    assert "already exists" in again.stderr


def test_cli_reports_bad_path(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "tagi_jax.convert.hf_t5",
        "--hf_dir",
        str(tmp_path / "x"),
        "--out",
        str(tmp_path / "o"),
    ]
    env = dict(os.environ, XLA_FLAGS="")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_param_checkpoint_missing(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        param_checkpoint.load(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="t5_config.json"):
        param_checkpoint.load(str(tmp_path / "empty"))


def test_bf16_tensor_view_is_exact():
    # ml_dtypes.bfloat16 is the dtype our safetensors reader maps BF16 to
    x = np.array([1.5, -2.25, 3e-3], dtype=ml_dtypes.bfloat16)
    assert x.view(np.uint16).view(ml_dtypes.bfloat16).tolist() == x.tolist()
