"""The pure train step: partitions, learning, gradient accumulation, non-finite losses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tagi_jax.distill import losses
from tagi_jax.models import tagi, trainable
from tagi_jax.models.tagi_config import HyperConfig, TagiConfig
from tagi_jax.testing.tiny_t5 import TINY_T5
from tagi_jax.training import optim
from tagi_jax.training import state as state_lib

MODEL = TagiConfig(t5=TINY_T5, hyper=HyperConfig(rank=4, instruction_dim=16), fusion=True)
CE_ONLY = losses.LossConfig(ce_weight=1.0, kl_weight=0.0, alignment_weight=0.0)


def _batch(rows=4, seed=0):
    rng = np.random.default_rng(seed)
    target = rng.integers(2, TINY_T5.vocab_size, (rows, 6)).astype(np.int32)
    return {
        "encoder_input_tokens": jnp.asarray(
            rng.integers(2, TINY_T5.vocab_size, (rows, 10)), jnp.int32
        ),
        "hyper_input_tokens": jnp.asarray(
            rng.integers(2, TINY_T5.vocab_size, (rows, 8)), jnp.int32
        ),
        "decoder_input_tokens": jnp.asarray(
            np.concatenate([np.zeros((rows, 1), np.int32), target[:, :-1]], 1)
        ),
        "decoder_target_tokens": jnp.asarray(target),
        "decoder_loss_weights": jnp.ones((rows, 6), jnp.float32),
    }


def _setup(loss=CE_ONLY, accum=1, lr=3e-3, optimizer=None):
    params = tagi.init_params(MODEL, jax.random.key(0))
    mask = trainable.trainable_mask(MODEL, params)
    train, frozen = state_lib.partition(params, mask)
    if optimizer is None:
        optimizer = optim.make_optimizer(
            optim.OptimizerConfig(learning_rate=lr, schedule="constant")
        )
    config = state_lib.StepConfig(MODEL, loss, grad_accum_steps=accum)
    step = jax.jit(
        functools.partial(state_lib.train_step, config, optimizer, jax.tree.structure(params))
    )
    return params, frozen, state_lib.init_state(train, optimizer, seed=0), step


def test_partition_round_trips_and_keeps_the_base_out_of_the_state():
    params, frozen, state, _ = _setup()
    merged = state_lib.merge(state.trainable, frozen, jax.tree.structure(params))
    jax.tree.map(np.testing.assert_array_equal, merged, params)
    assert all(k.startswith("hypernet/") for k in state.trainable)
    assert any(k.startswith("t5/") for k in frozen)
    opt_leaves = jax.tree.leaves(state.opt_state)
    n_trainable = sum(v.size for v in state.trainable.values())
    assert sum(x.size for x in opt_leaves) <= 2 * n_trainable + 8  # Adam moments only


@pytest.mark.slow
def test_loss_falls_on_a_fixed_batch():
    _, frozen, state, step = _setup()
    batch = _batch()
    losses_seen = []
    for _ in range(15):
        state, metrics = step(state, frozen, batch)
        losses_seen.append(float(metrics["loss"]))
    assert int(state.step) == 15
    assert losses_seen[-1] < losses_seen[0] - 0.5, losses_seen


@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch():
    # SGD keeps the comparison linear in the gradients: Adam divides near-zero gradients by
    # their own size and would amplify float rounding into visible parameter differences.
    import optax

    batch = _batch(rows=4)
    _, frozen, state1, step1 = _setup(accum=1, optimizer=optax.sgd(0.5))
    _, _, state2, step2 = _setup(accum=2, optimizer=optax.sgd(0.5))
    for _ in range(2):
        state1, m1 = step1(state1, frozen, batch)
        state2, m2 = step2(state2, frozen, batch)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    for k in state1.trainable:
        np.testing.assert_allclose(state1.trainable[k], state2.trainable[k], atol=1e-6, rtol=1e-5)


def test_nonfinite_loss_skips_the_update():
    params, frozen, state, step = _setup()
    poisoned = dict(frozen)
    key = "t5/token_embedder/embedding"
    poisoned[key] = frozen[key].at[5].set(jnp.nan)
    batch = _batch()
    batch["encoder_input_tokens"] = batch["encoder_input_tokens"].at[0, 0].set(5)
    new, metrics = step(state, poisoned, batch)
    assert int(metrics["update_skipped"]) == 1
    assert int(new.step) == 0
    for k in state.trainable:
        np.testing.assert_array_equal(new.trainable[k], state.trainable[k])
    with pytest.raises(FloatingPointError):
        losses.check_finite({k: v for k, v in metrics.items() if k != "update_skipped"})


def test_schedules():
    cfg = optim.OptimizerConfig(learning_rate=1.0, schedule="log_warmup_constant", warmup_steps=100)
    fn = optim.schedule(cfg)
    assert float(fn(0)) == 0.0 and abs(float(fn(99)) - 1.0) < 1e-6 and float(fn(500)) == 1.0
    lin = optim.schedule(
        optim.OptimizerConfig(learning_rate=2.0, schedule="linear_warmup", warmup_steps=10)
    )
    assert abs(float(lin(5)) - 1.0) < 1e-6 and float(lin(50)) == 2.0
    cos = optim.schedule(
        optim.OptimizerConfig(
            learning_rate=1.0, schedule="cosine", warmup_steps=10, total_steps=110
        )
    )
    assert abs(float(cos(10)) - 1.0) < 1e-6 and float(cos(110)) < 1e-6
    with pytest.raises(ValueError, match="schedule"):
        optim.OptimizerConfig(schedule="step")


def test_warmup_as_a_fraction_of_the_run():
    """schedules/paper_linear_warmup.gin: 2% of the run, whatever TRAIN_STEPS is."""
    cfg = optim.OptimizerConfig(
        learning_rate=1.0, schedule="linear_warmup", warmup_fraction=0.02, total_steps=5000
    )
    assert cfg.warmup == 100
    fn = optim.schedule(cfg)
    assert abs(float(fn(50)) - 0.5) < 1e-6 and float(fn(100)) == 1.0 and float(fn(4000)) == 1.0
    log = optim.schedule(
        optim.OptimizerConfig(
            learning_rate=1.0,
            schedule="log_warmup_constant",
            warmup_fraction=0.01,
            total_steps=20000,
        )
    )
    assert abs(float(log(199)) - 1.0) < 1e-6 and float(log(99)) < 0.9
    with pytest.raises(ValueError, match="not both"):
        optim.OptimizerConfig(warmup_steps=10, warmup_fraction=0.02)
    with pytest.raises(ValueError, match="warmup_fraction"):
        optim.OptimizerConfig(warmup_fraction=1.5)


@pytest.mark.slow
def test_term_gradients_are_each_terms_own_gradient_and_shares_sum_to_one():
    """grad_norm/<term> equals ‖jax.grad(weighted term)‖ computed on its own; the shares
    ⟨g_term, g_total⟩/‖g_total‖² add up to 1."""
    from tagi_jax.models import lora

    params = tagi.init_params(MODEL, jax.random.key(0))
    batch = _batch()
    # a random "teacher" for both the KL and the alignment, so three terms pull apart
    rng = np.random.default_rng(3)
    batch["teacher_logits"] = jnp.asarray(rng.normal(size=(4, 6, TINY_T5.vocab_size)), jnp.float32)
    generated = tagi.forward(MODEL, params, batch)[1]["adapters"]
    batch["teacher_lora"] = jax.tree.map(
        lambda a: jnp.asarray(rng.normal(scale=0.05, size=a.shape), jnp.float32), generated
    )
    assert isinstance(batch["teacher_lora"], lora.LoraAdapters)
    batch["teacher_mask"] = jnp.ones((4,), bool)
    loss = losses.LossConfig(ce_weight=0.6, kl_weight=0.4, alignment_weight=2.0)
    _, frozen, state, _ = _setup(loss=loss)
    config = state_lib.StepConfig(MODEL, loss)
    structure = jax.tree.structure(params)
    out = jax.jit(functools.partial(state_lib.term_gradients, config, structure))(
        state, frozen, batch
    )
    assert set(out) == {
        f"{kind}/{name}"
        for kind in ("grad_norm", "grad_share")
        for name in ("cross_entropy", "kl", "alignment")
    }
    rng_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 1)
    for name in ("cross_entropy", "kl", "alignment"):

        def term(t, name=name):
            return state_lib._loss(config, structure, t, frozen, batch, rng_key)[1][f"term/{name}"]

        grads = jax.grad(term)(state.trainable)
        expected = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))))
        np.testing.assert_allclose(float(out[f"grad_norm/{name}"]), expected, rtol=1e-4)
        assert expected > 0, name
    total = sum(float(out[f"grad_share/{n}"]) for n in ("cross_entropy", "kl", "alignment"))
    np.testing.assert_allclose(total, 1.0, rtol=1e-4)
