"""Properties of the T5 backbone that need no reference implementation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tagi_jax.models import t5
from tagi_jax.models.t5_config import T5Config
from tagi_jax.testing.tiny_t5 import TINY_T5

CONFIG = TINY_T5.replace(dropout_rate=0.1)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, CONFIG.vocab_size, (3, 20)).astype(np.int32)
    enc[0, 12:] = 0
    dec = rng.integers(2, CONFIG.vocab_size, (3, 9)).astype(np.int32)
    dec[:, 0] = 0
    dec[1, 6:] = 0
    return jnp.asarray(enc), jnp.asarray(dec)


def _stack(params, config):
    """Loop layout → scan layout (leading layers axis)."""
    out = {k: v for k, v in params.items() if k not in ("encoder", "decoder")}
    for stack, num in (("encoder", config.num_layers), ("decoder", config.num_decoder_layers)):
        tree = {k: v for k, v in params[stack].items() if not k.startswith("layers_")}
        blocks = [params[stack][f"layers_{i}"] for i in range(num)]
        tree["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
        out[stack] = tree
    return out


@pytest.fixture(scope="module")
def params():
    return t5.init_params(CONFIG, jax.random.key(0))


def test_logical_axes_cover_every_parameter(params):
    specs = t5.param_logical_axes(CONFIG)
    names = {
        "batch",
        "length",
        "embed",
        "mlp",
        "heads",
        "kv",
        "joined_kv",
        "vocab",
        "relpos_buckets",
        "layers",
    }
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(flat_specs) == len(jax.tree.leaves(params))
    for spec, leaf in zip(flat_specs, jax.tree.leaves(params), strict=True):
        assert len(spec) == leaf.ndim
        assert set(spec) <= names
    scanned = t5.param_logical_axes(CONFIG.replace(scan_layers=True))
    assert scanned["encoder"]["layers"]["attention"]["query"][
        "kernel"
    ] == jax.sharding.PartitionSpec("layers", "embed", "joined_kv")


@pytest.mark.parametrize("remat_policy", ["none", "full", "dots_with_no_batch_dims"])
def test_scan_and_remat_equal_the_loop(params, remat_policy):
    enc, dec = _batch()
    expected = t5.forward(CONFIG, params, enc, dec)
    config = CONFIG.replace(scan_layers=True, remat_policy=remat_policy)
    stacked = _stack(params, CONFIG)
    assert jax.tree.structure(stacked) == jax.tree.structure(t5.abstract_params(config))
    got = t5.forward(config, stacked, enc, dec)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_remat_gradients_equal(params):
    enc, dec = _batch()

    def loss(config, p):
        return jnp.mean(t5.forward(config, p, enc, dec) ** 2)

    g_plain = jax.grad(functools.partial(loss, CONFIG))(params)
    g_remat = jax.grad(functools.partial(loss, CONFIG.replace(remat_policy="full")))(params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g_plain, g_remat
    )


def test_incremental_decoding_equals_teacher_forcing(params):
    """Logits from the key/value cache, one step at a time, equal the full forward pass."""
    enc, _ = _batch(1)
    rng = np.random.default_rng(4)
    dec = jnp.asarray(rng.integers(2, CONFIG.vocab_size, (3, 7)), jnp.int32).at[:, 0].set(0)
    full = t5.forward(CONFIG, params, enc, dec)
    encoded = t5.encode(CONFIG, params, enc)
    cache = t5.init_decode_cache(CONFIG, params, encoded, enc, max_decode_len=7)
    for i in range(7):
        step, cache = t5.decode_step(CONFIG, params, cache, encoded, enc, dec[:, i : i + 1], i)
        np.testing.assert_allclose(np.asarray(step), np.asarray(full[:, i]), atol=1e-5, rtol=0)


def test_dropout_only_with_rng(params):
    enc, dec = _batch()
    a = t5.forward(CONFIG, params, enc, dec)
    b = t5.forward(CONFIG, params, enc, dec)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = t5.forward(CONFIG, params, enc, dec, dropout_rng=jax.random.key(1))
    d = t5.forward(CONFIG, params, enc, dec, dropout_rng=jax.random.key(2))
    assert np.abs(np.asarray(c) - np.asarray(a)).max() > 1e-3
    assert np.abs(np.asarray(c) - np.asarray(d)).max() > 1e-3


def test_padding_does_not_leak(params):
    """Changing tokens under padding changes nothing at real positions."""
    enc, dec = _batch()
    logits = t5.forward(CONFIG, params, enc, dec)
    longer_enc = jnp.concatenate([enc, jnp.zeros((3, 5), jnp.int32)], axis=1)
    longer_dec = jnp.concatenate([dec, jnp.zeros((3, 4), jnp.int32)], axis=1)
    longer = t5.forward(CONFIG, params, longer_enc, longer_dec)
    np.testing.assert_allclose(np.asarray(longer[:, :9]), np.asarray(logits), atol=1e-5, rtol=0)


def test_bfloat16_compute_tolerance(params):
    """bf16 compute (fp32 params) stays close to fp32.

    Stated tolerance: max |Δlogit| ≤ 0.15·std(fp32 logits), and per position the L1 distance
    between the two softmax distributions ≤ 0.05. (Measured on this model: about 0.08 and
    0.02; bf16 keeps 8 mantissa bits, so about 0.4% relative error per op.)
    """
    config = CONFIG.replace(dropout_rate=0.0)
    enc, dec = _batch(2)
    a = np.asarray(t5.forward(config, params, enc, dec))
    b_logits = t5.forward(config.replace(dtype="bfloat16"), params, enc, dec)
    assert b_logits.dtype == jnp.float32
    b = np.asarray(b_logits)
    assert np.abs(a - b).max() <= 0.15 * a.std()
    l1 = np.abs(np.asarray(jax.nn.softmax(a) - jax.nn.softmax(b))).sum(-1)
    assert l1.max() <= 0.05
    # and bf16 really ran: results are not bitwise fp32
    assert np.abs(a - b).max() > 0


def test_greedy_decode_compiles_once(params):
    enc, _ = _batch()
    t5._greedy_decode_jit.clear_cache()
    first = t5.greedy_decode(CONFIG, params, enc, max_decode_len=6)
    second = t5.greedy_decode(CONFIG, params, enc + 1, max_decode_len=6)
    assert first.shape == second.shape == (3, 6)
    assert t5._greedy_decode_jit._cache_size() == 1


def test_rejects_bad_input(params):
    enc, dec = _batch()
    with pytest.raises(TypeError, match="LoraAdapters"):
        t5.forward(CONFIG, params, enc, dec, adapters={"q": 1})
    with pytest.raises(ValueError, match="encoder_input_tokens"):
        t5.forward(CONFIG, params, enc[0], dec)
    with pytest.raises(ValueError, match="integer"):
        t5.forward(CONFIG, params, enc.astype(jnp.float32), dec)
    with pytest.raises(ValueError, match="batch size"):
        t5.forward(CONFIG, params, enc[:2], dec)
    with pytest.raises(ValueError, match="max_decode_len"):
        t5.greedy_decode(CONFIG, params, enc, max_decode_len=0)


def test_config_validation():
    with pytest.raises(ValueError, match="d_model"):
        T5Config(d_model=0)
    with pytest.raises(ValueError, match="dense_act_fn"):
        T5Config(dense_act_fn="tanh")
    with pytest.raises(ValueError, match="remat_policy"):
        T5Config(remat_policy="sometimes")
    with pytest.raises(ValueError, match="not a T5"):
        T5Config.from_hf_dict({"model_type": "gpt2"})
    hf = CONFIG.to_hf_dict()
    assert T5Config.from_hf_dict(hf, dropout_rate=0.1) == CONFIG


# --- logits_vocab_size: the head predicts only the tokenizer's ids -------------------------

N_LOGITS = 250  # of TINY_T5's 288 rows
HEADS = {
    "untied": CONFIG.replace(dropout_rate=0.0),
    "tied": CONFIG.replace(dropout_rate=0.0, tie_word_embeddings=True, scale_decoder_outputs=True),
}


@pytest.fixture(scope="module", params=sorted(HEADS))
def head(request):
    """(unrestricted config, restricted config, params), for a tied and an untied head."""
    config = HEADS[request.param]
    params = t5.init_params(config, jax.random.key(3))
    return config, config.replace(logits_vocab_size=N_LOGITS), params


def _restricted_batch():
    enc, dec = _batch(5)
    return enc, jnp.where(dec >= N_LOGITS, 2, dec)  # decoder inputs the restricted head can emit


def test_restricted_logits_are_the_first_columns(head):
    config, restricted, params = head
    # Same parameters (the checkpoint shape is kept; only the logits are narrower).
    shapes = jax.tree.map(jnp.shape, params)
    assert jax.tree.map(jnp.shape, t5.init_params(restricted, jax.random.key(3))) == shapes
    enc, dec = _restricted_batch()
    full = np.asarray(t5.forward(config, params, enc, dec))
    narrow = np.asarray(t5.forward(restricted, params, enc, dec))
    assert full.shape[-1] == config.vocab_size and config.logits_width == config.vocab_size
    assert narrow.shape == full.shape[:-1] + (N_LOGITS,) and restricted.logits_width == N_LOGITS
    # The logits are cut after the same matmul (cheaper than copying a sliced kernel), so
    # they are exactly the full model's first columns.
    np.testing.assert_array_equal(narrow, full[..., :N_LOGITS])


def test_restricted_greedy_never_emits_extra_ids(head):
    """Even when the rows past ``logits_vocab_size`` would win every argmax."""
    config, restricted, params = head
    rng = np.random.default_rng(0)
    extra = config.vocab_size - N_LOGITS
    if config.tie_word_embeddings:
        table = np.asarray(params["token_embedder"]["embedding"]).copy()
        table[N_LOGITS:] = 1e3 * rng.standard_normal((extra, table.shape[1]))
        params = {**params, "token_embedder": {"embedding": jnp.asarray(table)}}
    else:
        kernel = np.asarray(params["decoder"]["logits_dense"]["kernel"]).copy()
        kernel[:, N_LOGITS:] = 1e3 * rng.standard_normal((kernel.shape[0], extra))
        decoder = {**params["decoder"], "logits_dense": {"kernel": jnp.asarray(kernel)}}
        params = {**params, "decoder": decoder}
    enc, _ = _restricted_batch()
    unrestricted = np.asarray(t5.greedy_decode(config, params, enc, max_decode_len=6))
    assert (unrestricted[:, 0] >= N_LOGITS).all()  # the extra rows do dominate
    tokens = np.asarray(t5.greedy_decode(restricted, params, enc, max_decode_len=6))
    assert tokens.shape == (3, 6) and tokens.max() < N_LOGITS
    # Greedy picks the argmax of the restricted teacher-forced logits at every step.
    dec = jnp.concatenate([jnp.zeros((3, 1), jnp.int32), jnp.asarray(tokens[:, :-1])], axis=1)
    logits = np.asarray(t5.forward(restricted, params, enc, dec))
    alive = np.cumsum(tokens == config.eos_token_id, axis=1) - (tokens == config.eos_token_id)
    np.testing.assert_array_equal(
        np.where(alive == 0, logits.argmax(-1), 0), np.where(alive == 0, tokens, 0)
    )


def test_restricted_incremental_decoding_equals_teacher_forcing(head):
    _, restricted, params = head
    enc, dec = _restricted_batch()
    # Incremental decoding attends to every token it generated: no decoder padding here.
    dec = jnp.where(jnp.arange(dec.shape[1]) > 0, jnp.maximum(dec, 2), dec)
    full = t5.forward(restricted, params, enc, dec)
    encoded = t5.encode(restricted, params, enc)
    length = dec.shape[1]
    cache = t5.init_decode_cache(restricted, params, encoded, enc, max_decode_len=length)
    for i in range(length):
        step, cache = t5.decode_step(restricted, params, cache, encoded, enc, dec[:, i : i + 1], i)
        assert step.shape == (3, N_LOGITS)
        np.testing.assert_allclose(np.asarray(step), np.asarray(full[:, i]), atol=1e-5, rtol=0)


def test_logits_vocab_size_validation_and_round_trip(tmp_path):
    for bad in (0, -1, CONFIG.vocab_size + 1, True, 2.5, "32100"):
        with pytest.raises(ValueError, match="logits_vocab_size"):
            CONFIG.replace(logits_vocab_size=bad)
    assert CONFIG.replace(logits_vocab_size=CONFIG.vocab_size).logits_width == CONFIG.vocab_size
    restricted = CONFIG.replace(logits_vocab_size=N_LOGITS)
    assert T5Config.from_dict(restricted.to_dict()) == restricted
    # Configs written before the field existed read back unrestricted.
    old = {k: v for k, v in CONFIG.to_dict().items() if k != "logits_vocab_size"}
    assert T5Config.from_dict(old).logits_vocab_size is None
    # Hugging Face config.json has no such field: conversion leaves it None.
    assert T5Config.from_hf_dict(restricted.to_hf_dict()).logits_vocab_size is None
    from tagi_jax.convert import param_checkpoint

    params = t5.init_params(restricted, jax.random.key(0))
    param_checkpoint.save(str(tmp_path / "ckpt"), restricted, params)
    assert param_checkpoint.read_config(str(tmp_path / "ckpt")) == restricted


def test_google_model_gin_files_restrict_to_the_tokenizer():
    """Every Google T5 size with 32128 rows predicts only the tokenizer's 32100 ids."""
    import glob
    import os

    import gin

    from tagi_jax import configurables, train

    root = os.path.join(os.path.dirname(__file__), "..", "gin_configs", "models")
    train.register_configurables()
    checked = 0
    try:
        for path in sorted(glob.glob(os.path.join(root, "t5_1_*.gin"))):
            gin.clear_config()
            gin.parse_config_file(path)
            config = configurables.t5_config()
            if "tiny" in os.path.basename(path):
                assert config.logits_vocab_size is None  # a test size, runs override the vocab
                continue
            assert config.vocab_size == 32128 and config.logits_vocab_size == 32100, path
            checked += 1
    finally:
        gin.clear_config()
    assert checked == 7
