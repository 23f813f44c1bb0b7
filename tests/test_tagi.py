"""The TAGI model: hypernetwork, fusion, task-level caching, what trains, bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tagi_jax.models import hypernet, lora, t5, tagi, trainable
from tagi_jax.models.tagi_config import HyperConfig, TagiConfig
from tagi_jax.testing.tiny_t5 import TINY_T5

SMALL_HYPER = dict(rank=4, instruction_dim=16)
GENERATORS = ("per_layer", "shared_indexed", "slots")


def make_config(fusion=False, **hyper):
    return TagiConfig(t5=TINY_T5, hyper=HyperConfig(**{**SMALL_HYPER, **hyper}), fusion=fusion)


def make_batch(rows=4, seed=0):
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, TINY_T5.vocab_size, (rows, 12)).astype(np.int32)
    hyp = rng.integers(2, TINY_T5.vocab_size, (rows, 9)).astype(np.int32)
    dec = rng.integers(2, TINY_T5.vocab_size, (rows, 6)).astype(np.int32)
    enc[0, 8:] = 0
    hyp[1, 5:] = 0
    dec[:, 0] = 0
    dec[2, 4:] = 0
    return {
        "encoder_input_tokens": jnp.asarray(enc),
        "hyper_input_tokens": jnp.asarray(hyp),
        "decoder_input_tokens": jnp.asarray(dec),
    }


def base_logits(config, params, batch):
    return t5.forward(
        config.t5, params["t5"], batch["encoder_input_tokens"], batch["decoder_input_tokens"]
    )


def perturb(params, scale=0.05, seed=7):
    """Random values everywhere, so no zero-initialised layer hides a gradient path."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree,
        [
            x + scale * jax.random.normal(k, x.shape, x.dtype)
            for x, k in zip(leaves, keys, strict=True)
        ],
    )


# --- equivalence with the base model ----------------------------------------------------


def test_no_targets_is_bit_identical_to_t5():
    config = make_config(targets=())
    params = tagi.init_params(config, jax.random.key(0))
    batch = make_batch()
    logits, aux = tagi.forward(config, params, batch)
    assert aux["adapters"] is None
    np.testing.assert_array_equal(
        np.asarray(logits), np.asarray(base_logits(config, params, batch))
    )


@pytest.mark.parametrize("generator", GENERATORS)
def test_zero_b_student_equals_base_model_at_step_0(generator):
    config = make_config(generator=generator)
    params = tagi.init_params(config, jax.random.key(1))
    batch = make_batch()
    logits, aux = tagi.forward(config, params, batch)
    adapters = aux["adapters"]
    assert set(adapters.targets) == set(lora.DEFAULT_TARGETS)
    for name in adapters.targets:  # A is live, B is exactly zero
        assert float(jnp.abs(adapters.a[name]).max()) > 0
        assert float(jnp.abs(adapters.b[name]).max()) == 0
    np.testing.assert_array_equal(
        np.asarray(logits), np.asarray(base_logits(config, params, batch))
    )


def test_authors_init_is_tiny_but_not_zero():
    config = make_config(generator="shared_indexed", init="authors", divide_b_by_sqrt_rank=True)
    params = tagi.init_params(config, jax.random.key(2))
    adapters = tagi.generate_adapters(config, params, make_batch()["hyper_input_tokens"])
    for name in adapters.targets:
        for value in (adapters.a[name], adapters.b[name]):
            assert 0 < float(jnp.abs(value).max()) < 1e-9


def test_enabling_instruction_cross_attention_starts_as_identity():
    plain = make_config()
    hier = plain.replace(t5=TINY_T5.replace(instruction_cross_attention=True))
    params = tagi.init_params(hier, jax.random.key(3))
    assert "instruction_attention" in params["t5"]["encoder"]["layers_0"]
    batch = make_batch()
    with_layers, _ = tagi.forward(hier, params, batch)
    stripped = jax.tree.map(lambda x: x, params)
    for i in range(TINY_T5.num_layers):
        layer = stripped["t5"]["encoder"][f"layers_{i}"]
        del layer["instruction_attention"], layer["pre_instruction_attention_layer_norm"]
    without, _ = tagi.forward(plain, stripped, batch)
    np.testing.assert_allclose(np.asarray(with_layers), np.asarray(without), atol=1e-6, rtol=0)
    # and once trained (non-zero output projection) they do read the instruction
    moved = perturb(params, seed=3)
    changed, _ = tagi.forward(hier, moved, batch)
    other = dict(batch, hyper_input_tokens=batch["hyper_input_tokens"][::-1])
    assert float(jnp.abs(changed - tagi.forward(hier, moved, other)[0]).max()) > 1e-4


# --- caching, pooling and masks ---------------------------------------------------------


@pytest.mark.parametrize("generator", GENERATORS)
def test_per_task_adapters_broadcast_equal_per_instance(generator):
    config = make_config(fusion=True, generator=generator)
    params = perturb(tagi.init_params(config, jax.random.key(4)))
    batch = make_batch(rows=4)
    # two tasks: rows 0, 2 share instruction 0 and rows 1, 3 instruction 1
    tasks = batch["hyper_input_tokens"][:2]
    task_of_row = jnp.array([0, 1, 0, 1])
    batch = dict(batch, hyper_input_tokens=tasks[task_of_row])
    per_instance, _ = tagi.forward(config, params, batch)
    per_task = tagi.generate_adapters(config, params, tasks)
    expanded = lora.take(per_task, task_of_row)
    cached, aux = tagi.forward(config, params, batch, adapters=expanded)
    assert aux["adapters"] is expanded
    # Generating for 2 rows or for 4 differs only by float32 rounding (batch-shaped matmuls):
    # the adapters agree to ~1 ulp, the logits to the 1e-5 used for every equivalence here.
    generated = tagi.generate_adapters(config, params, batch["hyper_input_tokens"])
    for name in generated.targets:
        np.testing.assert_allclose(expanded.a[name], generated.a[name], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(expanded.b[name], generated.b[name], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(per_instance), atol=1e-5, rtol=0)


@pytest.mark.parametrize("generator", GENERATORS)
def test_masked_pooling_ignores_instruction_padding(generator):
    config = make_config(generator=generator)
    params = perturb(tagi.init_params(config, jax.random.key(5)))
    tokens = make_batch()["hyper_input_tokens"]
    padded = jnp.concatenate([tokens, jnp.zeros((tokens.shape[0], 7), jnp.int32)], axis=1)
    a = tagi.generate_adapters(config, params, tokens)
    b = tagi.generate_adapters(config, params, padded)
    for name in a.targets:
        np.testing.assert_allclose(
            np.asarray(a.a[name]), np.asarray(b.a[name]), atol=1e-5, rtol=1e-5
        )
        np.testing.assert_allclose(
            np.asarray(a.b[name]), np.asarray(b.b[name]), atol=1e-5, rtol=1e-5
        )


def test_authors_pooling_sees_padding():
    """The authors' unmasked pooling changes with padding: reproduced on purpose."""
    config = make_config(pooling="first_last_sum_unmasked")
    params = perturb(tagi.init_params(config, jax.random.key(6)))
    tokens = make_batch()["hyper_input_tokens"]
    padded = jnp.concatenate([tokens, jnp.zeros((tokens.shape[0], 7), jnp.int32)], axis=1)
    a = tagi.generate_adapters(config, params, tokens)
    b = tagi.generate_adapters(config, params, padded)
    assert float(jnp.abs(a.a["enc_self.q"] - b.a["enc_self.q"]).max()) > 1e-4


def test_pooling_functions():
    states = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
    tokens = jnp.array([[5, 6, 0], [0, 0, 0]])
    np.testing.assert_allclose(hypernet.masked_mean(states, tokens), [[1.0, 2.0], [0.0, 0.0]])
    config = make_config(pooling="first_last_sum_unmasked")
    np.testing.assert_allclose(
        hypernet.pool(config, states, tokens, first_block=states), 2 * states.mean(axis=1)
    )


@pytest.mark.parametrize("cross_attention", [False, True])
def test_fusion_masks_padding_in_both_streams(cross_attention):
    config = make_config(fusion=True).replace(
        t5=TINY_T5.replace(instruction_cross_attention=cross_attention)
    )
    params = perturb(tagi.init_params(config, jax.random.key(7)))
    batch = make_batch()
    logits, _ = tagi.forward(config, params, batch)
    for key in ("hyper_input_tokens", "encoder_input_tokens"):
        longer = jnp.concatenate([batch[key], jnp.zeros((4, 5), jnp.int32)], axis=1)
        padded, _ = tagi.forward(config, params, dict(batch, **{key: longer}))
        np.testing.assert_allclose(np.asarray(padded), np.asarray(logits), atol=1e-5, rtol=0)
    # fusion is live: the instruction changes the output even with zero adapters
    fresh = tagi.init_params(config, jax.random.key(8))
    other = dict(batch, hyper_input_tokens=batch["hyper_input_tokens"][::-1])
    diff = tagi.forward(config, fresh, batch)[0] - tagi.forward(config, fresh, other)[0]
    assert float(jnp.abs(diff).max()) > 1e-4


def test_greedy_decode_first_token_matches_forward():
    config = make_config(fusion=True)
    params = perturb(tagi.init_params(config, jax.random.key(9)))
    batch = make_batch()
    tokens = np.asarray(tagi.greedy_decode(config, params, batch, max_decode_len=4))
    start = dict(batch, decoder_input_tokens=jnp.zeros((4, 1), jnp.int32))
    logits, _ = tagi.forward(config, params, start)
    np.testing.assert_array_equal(tokens[:, 0], np.asarray(jnp.argmax(logits[:, 0], -1)))
    # the second token continues from the first, with the cache
    second = dict(
        batch,
        decoder_input_tokens=jnp.concatenate(
            [start["decoder_input_tokens"], jnp.asarray(tokens[:, :1])], 1
        ),
    )
    logits2, _ = tagi.forward(config, params, second)
    live = tokens[:, 0] != TINY_T5.eos_token_id
    np.testing.assert_array_equal(tokens[live, 1], np.asarray(jnp.argmax(logits2[:, 1], -1))[live])


# --- separate instruction encoder -------------------------------------------------------


def test_separate_instruction_encoder_takes_other_weights():
    config = TagiConfig(
        t5=TINY_T5,
        hyper=HyperConfig(
            instruction_encoder="separate", pooling="first_last_sum_unmasked", **SMALL_HYPER
        ),
        instruction_encoder_t5=TINY_T5,
    )
    teacher = t5.init_params(TINY_T5, jax.random.key(10))
    params = tagi.init_params(config, jax.random.key(11), instruction_encoder_params=teacher)
    assert "decoder" not in params["instruction_encoder"]
    np.testing.assert_array_equal(
        np.asarray(params["instruction_encoder"]["encoder"]["layers_1"]["mlp"]["wo"]["kernel"]),
        np.asarray(teacher["encoder"]["layers_1"]["mlp"]["wo"]["kernel"]),
    )
    batch = make_batch()
    states, first = tagi.encode_instruction(config, params, batch["hyper_input_tokens"])
    expected = t5.encode(TINY_T5, teacher, batch["hyper_input_tokens"])
    np.testing.assert_allclose(np.asarray(states), np.asarray(expected), atol=1e-6)
    assert first is not None and first.shape == states.shape


def test_backbone_params_graft_and_reject_mismatch():
    config = make_config()
    base = t5.init_params(TINY_T5, jax.random.key(12))
    params = tagi.init_params(config, jax.random.key(13), t5_params=base)
    np.testing.assert_array_equal(
        np.asarray(params["t5"]["token_embedder"]["embedding"]),
        np.asarray(base["token_embedder"]["embedding"]),
    )
    wrong = t5.init_params(TINY_T5.replace(d_ff=96), jax.random.key(12))
    with pytest.raises(ValueError, match=r"t5_params.*mlp.*has shape \(64, 96\)"):
        tagi.init_params(config, jax.random.key(13), t5_params=wrong)


# --- what trains ------------------------------------------------------------------------


def _loss(config, params, batch, mask):
    logits, _ = tagi.forward(config, trainable.stop_frozen_gradients(params, mask), batch)
    return jnp.mean(jnp.square(logits))


@pytest.mark.parametrize(
    "preset,generator,encoder",
    [
        ("paper", "per_layer", "backbone"),
        ("authors_code", "shared_indexed", "separate"),
        ("paper", "slots", "backbone"),
    ],
)
def test_gradients_reach_exactly_the_trainable_parameters(preset, generator, encoder):
    config = TagiConfig(
        t5=TINY_T5.replace(instruction_cross_attention=preset == "paper"),
        hyper=HyperConfig(generator=generator, instruction_encoder=encoder, **SMALL_HYPER),
        instruction_encoder_t5=TINY_T5 if encoder == "separate" else None,
        fusion=True,
        trainable=preset,
    )
    params = perturb(tagi.init_params(config, jax.random.key(14)))
    mask = trainable.trainable_mask(config, params)
    grads = jax.grad(lambda p: _loss(config, p, make_batch(), mask))(params)
    paths = jax.tree_util.tree_flatten_with_path(grads)[0]
    flags = jax.tree.leaves(mask)
    n_trainable = 0
    for (keypath, g), is_trainable in zip(paths, flags, strict=True):
        path = trainable.path_string(keypath)
        norm = float(jnp.abs(g).max())
        if is_trainable:
            n_trainable += 1
            assert norm > 0, f"no gradient reaches trainable {path}"
        else:
            assert norm == 0, f"frozen {path} has gradient {norm}"
    assert n_trainable > 0
    if preset == "authors_code":
        trains = trainable.trainable_mask(config, params)
        assert trains["t5"]["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
        assert not trains["t5"]["encoder"]["layers_0"]["attention"]["query"]["kernel"]
        assert not trains["t5"]["decoder"]["logits_dense"]["kernel"]
        assert trains["t5"]["token_embedder"]["embedding"]
        assert not trains["instruction_encoder"]["encoder"]["final_layer_norm"]["scale"]


def test_user_patterns_add_and_remove():
    config = make_config().replace(
        trainable_patterns=(r"^t5/decoder/logits_dense/",), frozen_patterns=(r"pooler",)
    )
    params = tagi.init_params(config, jax.random.key(15))
    trains = trainable.trainable_mask(config, params)
    assert trains["t5"]["decoder"]["logits_dense"]["kernel"]
    assert not trains["hypernet"]["pooler"]["kernel"]
    assert trains["hypernet"]["decoder_hidden"]["kernel"]


# --- bad input ---------------------------------------------------------------------------


def test_configuration_errors_name_the_field():
    with pytest.raises(ValueError, match="HyperConfig.targets.*enc_self.z"):
        HyperConfig(targets=("enc_self.z",))
    with pytest.raises(ValueError, match="HyperConfig.rank"):
        HyperConfig(rank=0)
    with pytest.raises(ValueError, match="HyperConfig.generator"):
        HyperConfig(generator="big")
    with pytest.raises(ValueError, match="HyperConfig.pooling"):
        HyperConfig(pooling="max")
    with pytest.raises(ValueError, match="TagiConfig.trainable"):
        TagiConfig(t5=TINY_T5, trainable="everything")
    with pytest.raises(ValueError, match="instruction_encoder_t5"):
        TagiConfig(t5=TINY_T5, hyper=HyperConfig(instruction_encoder="separate"))
    with pytest.raises(ValueError, match="d_model"):
        TagiConfig(
            t5=TINY_T5,
            hyper=HyperConfig(instruction_encoder="separate"),
            instruction_encoder_t5=TINY_T5.replace(d_model=32),
        )
    with pytest.raises(ValueError, match="frozen_patterns"):
        TagiConfig(t5=TINY_T5, frozen_patterns=("([",))


def test_batch_errors_name_the_field():
    config = make_config()
    params = tagi.init_params(config, jax.random.key(16))
    batch = make_batch()
    with pytest.raises(ValueError, match="hyper_input_tokens"):
        tagi.forward(
            config, params, dict(batch, hyper_input_tokens=batch["hyper_input_tokens"][:3])
        )
    with pytest.raises(KeyError, match="hyper_input_tokens"):
        tagi.forward(config, params, {k: v for k, v in batch.items() if k != "hyper_input_tokens"})


@pytest.mark.parametrize("encoder", ["backbone", "separate"])
def test_a_frozen_instruction_encoder_runs_without_dropout(encoder):
    """The authors encode instructions under no_grad in eval mode: with dropout on (rate 0.5)
    and a dropout key, a frozen encoder's states and the adapters generated from them are the
    deterministic ones; an encoder that trains still drops out."""
    t5_config = TINY_T5.replace(dropout_rate=0.5)
    extra = {"instruction_encoder_t5": t5_config} if encoder == "separate" else {}
    config = TagiConfig(
        t5=t5_config,
        hyper=HyperConfig(**{**SMALL_HYPER, "instruction_encoder": encoder, "init": "authors"}),
        fusion=True,
        **extra,
    )
    params = tagi.init_params(config, jax.random.key(3))
    batch = make_batch()
    key = jax.random.key(4)
    tokens = batch["hyper_input_tokens"]
    quiet, _ = tagi.encode_instruction(config, params, tokens)
    noisy, _ = tagi.encode_instruction(config, params, tokens, dropout_rng=key)
    np.testing.assert_array_equal(np.asarray(noisy), np.asarray(quiet))
    # through forward: the generated adapters do not depend on the dropout key
    _, aux_a = tagi.forward(config, params, batch, dropout_rng=key)
    _, aux_b = tagi.forward(config, params, batch, dropout_rng=jax.random.key(5))
    jax.tree.map(np.testing.assert_array_equal, aux_a["adapters"], aux_b["adapters"])
    trains = config.replace(hyper=dataclasses.replace(config.hyper, train_instruction_encoder=True))
    dropped, _ = tagi.encode_instruction(trains, params, tokens, dropout_rng=key)
    assert not np.allclose(np.asarray(dropped), np.asarray(quiet))
