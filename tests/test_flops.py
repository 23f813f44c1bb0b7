"""The analytic model-FLOPs count behind MFU agrees with XLA's cost analysis on CPU (where XLA
counts every matmul; on GPU it misses library calls, which is why MFU uses this count)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tagi_jax.distill import losses
from tagi_jax.models import t5, tagi, trainable
from tagi_jax.models.t5_config import T5Config
from tagi_jax.models.tagi_config import HyperConfig, TagiConfig
from tagi_jax.training import flops, optim
from tagi_jax.training import state as state_lib
from tagi_jax.training.progress import xla_step_flops

# Wide enough that matmuls dominate, as in real models (elementwise work is not counted).
CONFIG = T5Config(
    vocab_size=512, d_model=256, d_kv=32, d_ff=1024, num_layers=2, num_decoder_layers=2,
    num_heads=8, dropout_rate=0.0,
)  # fmt: skip
B, L, H, T = 4, 128, 96, 32


def _xla(fn, *args) -> float:
    return xla_step_flops(jax.jit(fn).lower(*args).compile())


def test_t5_forward_count():
    params = t5.init_params(CONFIG, jax.random.key(0))
    enc, dec = jnp.ones((B, L), jnp.int32), jnp.ones((B, T), jnp.int32)
    xla = _xla(functools.partial(t5.forward, CONFIG), params, enc, dec)
    counted = flops.encoder_flops(CONFIG, B * L, L) + flops.decoder_flops(
        CONFIG, B * T, T, L, B * L
    )
    assert counted == pytest.approx(xla, rel=0.03)


@pytest.mark.parametrize("backbone_trains", [False, True], ids=["tagi_frozen_base", "metatrain"])
def test_train_step_count(backbone_trains):
    if backbone_trains:  # the plain T5, every backbone weight training
        model = TagiConfig(
            t5=CONFIG, hyper=HyperConfig(targets=()), fusion=False, trainable_patterns=("^t5/",)
        )
    else:  # TAGI with fusion on a frozen base
        model = TagiConfig(t5=CONFIG, hyper=HyperConfig(rank=4, instruction_dim=32))
    params = tagi.init_params(model, jax.random.key(0))
    train, frozen = state_lib.partition(params, trainable.trainable_mask(model, params))
    tx = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-3, schedule="constant"))
    state = state_lib.init_state(train, tx, seed=0)
    tokens = jnp.ones((B, T), jnp.int32)
    batch = {
        "encoder_input_tokens": jnp.ones((B, L), jnp.int32),
        "hyper_input_tokens": jnp.ones((B, H), jnp.int32),
        "decoder_input_tokens": tokens,
        "decoder_target_tokens": tokens,
        "decoder_loss_weights": jnp.ones((B, T)),
    }
    loss = losses.LossConfig(ce_weight=1.0, kl_weight=0.0, alignment_weight=0.0)
    step = functools.partial(
        state_lib.train_step, state_lib.StepConfig(model, loss), tx, jax.tree.structure(params)
    )
    xla = _xla(step, state, frozen, batch)
    counted = flops.train_step_flops(model, B, L, H, T, backbone_trains=backbone_trains)
    assert counted == pytest.approx(xla, rel=0.05)


def test_restricted_head_computes_every_column():
    """With logits_vocab_size the head still multiplies every vocab_size column (the logits are
    cut after the matmul, which is cheaper than copying a sliced kernel): the same FLOPs, in
    XLA and here, and logits that are the full model's first columns."""
    narrow = CONFIG.replace(logits_vocab_size=200)
    params = t5.init_params(narrow, jax.random.key(0))
    enc, dec = jnp.ones((B, L), jnp.int32), jnp.ones((B, T), jnp.int32)
    full = flops.decoder_flops(CONFIG, B * T, T, L, B * L)
    assert flops.decoder_flops(narrow, B * T, T, L, B * L) == full
    xla_full = _xla(functools.partial(t5.forward, CONFIG), params, enc, dec)
    xla_narrow = _xla(functools.partial(t5.forward, narrow), params, enc, dec)
    assert xla_narrow == pytest.approx(xla_full, rel=0.01)
    assert flops.encoder_flops(narrow, B * L, L) + full == pytest.approx(xla_narrow, rel=0.03)
    logits = t5.forward(narrow, params, enc, dec)
    assert logits.shape[-1] == 200
    np.testing.assert_allclose(logits, t5.forward(CONFIG, params, enc, dec)[..., :200], rtol=1e-6)


@pytest.mark.parametrize("fusion", [True, False], ids=["fusion", "adapters_only"])
def test_inference_count_matches_one_forward(fusion):
    """One example's inference count (instruction encoded for it alone: examples_per_task=1)
    is one forward of the TAGI student, adapters and hypernetwork included."""
    model = TagiConfig(t5=CONFIG, hyper=HyperConfig(rank=8, instruction_dim=32), fusion=fusion)
    params = tagi.init_params(model, jax.random.key(0))
    batch = {
        "encoder_input_tokens": jnp.ones((1, L), jnp.int32),
        "hyper_input_tokens": jnp.ones((1, H), jnp.int32),
        "decoder_input_tokens": jnp.ones((1, T), jnp.int32),
    }
    xla = _xla(lambda p, b: tagi.forward(model, p, b)[0], params, batch)
    hyper_parameters = sum(x.size for x in jax.tree.leaves(params["hypernet"]))
    counted = flops.inference_example_flops(
        model,
        input_tokens=L,
        target_tokens=T,
        instruction_tokens=H,
        hypernetwork_parameters=hyper_parameters,
    )
    assert counted["adapters"] > 0 and counted["instruction_per_task"] > 0
    assert counted["total"] == pytest.approx(xla, rel=0.05)
    # Cached once per task, the instruction's share shrinks with the task's examples.
    per_32 = flops.inference_example_flops(
        model,
        input_tokens=L,
        target_tokens=T,
        instruction_tokens=H,
        examples_per_task=32,
        hypernetwork_parameters=hyper_parameters,
    )
    assert per_32["instruction_per_task"] == pytest.approx(counted["instruction_per_task"] / 32)


def test_inference_count_of_a_plain_t5_is_its_forward():
    model = TagiConfig(t5=CONFIG, hyper=HyperConfig(targets=()), fusion=False)
    counted = flops.inference_example_flops(model, input_tokens=L, target_tokens=T)
    forward = flops.encoder_flops(CONFIG, L, L) + flops.decoder_flops(CONFIG, T, T, L, L)
    assert counted["total"] == forward
    assert counted["adapters"] == counted["instruction_per_task"] == 0
