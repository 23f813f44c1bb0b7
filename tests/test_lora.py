"""LoRA adapters as data: per-example application against merged kernels, for every target."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tagi_jax.models import lora, t5
from tagi_jax.testing.tiny_t5 import TINY_T5

GATED = TINY_T5
PLAIN = TINY_T5.replace(is_gated_act=False, dense_act_fn="relu")
RANK = 4


def random_adapters(config, targets, batch, seed=0, scale=1.0):
    """Different, non-zero A and B for every example and block."""
    key = jax.random.key(seed)
    a, b = {}, {}
    for name in targets:
        target = lora.TARGETS[name]
        d_in, d_out = target.dims(config)
        layers = target.num_layers(config)
        key, ka, kb = jax.random.split(key, 3)
        a[name] = jax.random.normal(ka, (layers, batch, d_in, RANK)) / np.sqrt(d_in)
        b[name] = jax.random.normal(kb, (layers, batch, RANK, d_out)) * 0.3
    return lora.LoraAdapters(a=a, b=b, scale=scale)


def _batch(config, rows=3, seed=0):
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, config.vocab_size, (rows, 10)).astype(np.int32)
    enc[0, 7:] = 0
    dec = rng.integers(2, config.vocab_size, (rows, 6)).astype(np.int32)
    dec[:, 0] = 0
    return jnp.asarray(enc), jnp.asarray(dec)


def _targets_for(config):
    return [
        name
        for name, t in lora.TARGETS.items()
        if not (t.dense in ("wi_0", "wi_1") and not config.is_gated_act)
        and not (t.dense == "wi" and config.is_gated_act)
    ]


CASES = [(GATED, name) for name in _targets_for(GATED)] + [
    (PLAIN, name) for name in ("enc_ffn.wi", "dec_ffn.wi", "dec_ffn.wo")
]


@pytest.fixture(scope="module")
def params():
    return {
        "gated": t5.init_params(GATED, jax.random.key(0)),
        "plain": t5.init_params(PLAIN, jax.random.key(0)),
    }


@pytest.mark.parametrize("config,name", CASES, ids=lambda x: x if isinstance(x, str) else "")
def test_einsum_path_equals_merged_kernel(params, config, name):
    p = params["gated" if config.is_gated_act else "plain"]
    enc, dec = _batch(config)
    adapters = random_adapters(config, [name], batch=3, scale=0.5)
    per_example = t5.forward(config, p, enc, dec, adapters=adapters)
    base = t5.forward(config, p, enc, dec)
    # the adapter really changes the output, so the comparison below is not vacuous
    assert float(jnp.abs(per_example - base).max()) > 1e-3
    for i in range(3):
        merged = lora.merge(config, p, adapters, i)
        dense = t5.forward(config, merged, enc[i : i + 1], dec[i : i + 1])
        np.testing.assert_allclose(
            np.asarray(per_example[i : i + 1]), np.asarray(dense), atol=1e-5, rtol=0
        )


def test_all_targets_at_once_with_scanned_layers(params):
    config = GATED.replace(scan_layers=True)
    loop = params["gated"]
    stacked = {k: v for k, v in loop.items() if k not in ("encoder", "decoder")}
    for stack, num in (("encoder", GATED.num_layers), ("decoder", GATED.num_decoder_layers)):
        tree = {k: v for k, v in loop[stack].items() if not k.startswith("layers_")}
        tree["layers"] = jax.tree.map(
            lambda *xs: jnp.stack(xs), *[loop[stack][f"layers_{i}"] for i in range(num)]
        )
        stacked[stack] = tree
    adapters = random_adapters(GATED, _targets_for(GATED), batch=3, seed=1)
    enc, dec = _batch(GATED, seed=1)
    looped = t5.forward(GATED, loop, enc, dec, adapters=adapters)
    scanned = t5.forward(config, stacked, enc, dec, adapters=adapters)
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(looped), atol=1e-5, rtol=0)
    merged = lora.merge(config, stacked, adapters, 2)
    dense = t5.forward(config, merged, enc[2:], dec[2:])
    np.testing.assert_allclose(np.asarray(scanned[2:]), np.asarray(dense), atol=1e-5, rtol=0)


def test_merge_leaves_the_input_untouched(params):
    p = params["gated"]
    before = np.asarray(p["encoder"]["layers_0"]["attention"]["query"]["kernel"]).copy()
    lora.merge(GATED, p, random_adapters(GATED, ["enc_self.q"], batch=2), 1)
    np.testing.assert_array_equal(
        np.asarray(p["encoder"]["layers_0"]["attention"]["query"]["kernel"]), before
    )


def test_greedy_decode_with_adapters_equals_merged_model(params):
    p = params["gated"]
    enc, _ = _batch(GATED, seed=2)
    adapters = random_adapters(GATED, lora.DEFAULT_TARGETS, batch=3, seed=2)
    tokens = np.asarray(t5.greedy_decode(GATED, p, enc, max_decode_len=6, adapters=adapters))
    for i in range(3):
        merged = lora.merge(GATED, p, adapters, i)
        alone = np.asarray(t5.greedy_decode(GATED, merged, enc[i : i + 1], max_decode_len=6))
        np.testing.assert_array_equal(tokens[i : i + 1], alone)


def test_take_expands_per_task_adapters():
    adapters = random_adapters(GATED, ["enc_self.q"], batch=2)
    rows = lora.take(adapters, jnp.array([1, 0, 1]))
    assert rows.batch_size == 3
    np.testing.assert_array_equal(
        np.asarray(rows.a["enc_self.q"][:, 2]), np.asarray(adapters.a["enc_self.q"][:, 1])
    )


def test_bad_adapters_are_named(params):
    enc, dec = _batch(GATED)
    wrong_batch = random_adapters(GATED, ["dec_self.v"], batch=2)
    with pytest.raises(ValueError, match="dec_self.v"):
        t5.forward(GATED, params["gated"], enc, dec, adapters=wrong_batch)
    with pytest.raises(ValueError, match="unknown"):
        lora.validate_targets(["enc_self.q", "enc_self.x"])
    with pytest.raises(ValueError, match="enc_ffn.wi "):
        lora.validate_targets(["enc_ffn.wi"], GATED)
