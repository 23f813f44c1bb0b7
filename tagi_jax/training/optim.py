"""Optimizers and learning-rate schedules.

``make_optimizer(config)`` is gradient clipping + AdamW or Adafactor on the chosen schedule.
The trainer applies it to the trainable partition only (``training.state.partition``), so the
frozen base never gets optimizer state. For a whole parameter tree, ``make_masked_optimizer``
wraps it in ``optax.multi_transform`` with ``tagi_jax.models.trainable.labels``.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import optax

from tagi_jax.models.trainable import FROZEN, TRAINABLE

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("constant", "linear_warmup", "log_warmup_constant", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Attributes:
    name: ``adamw`` (the authors) or ``adafactor`` (t5x/HINT, C4 pretraining).
    learning_rate: peak rate.
    schedule: ``constant``; ``linear_warmup`` (then constant); ``log_warmup_constant`` (the
      authors' DeepSpeed WarmupLR: lr·log(step+1)/log(warmup), then constant); ``cosine``
      (linear warmup, cosine decay to ``end_fraction``·lr at ``total_steps``).
    warmup_steps, total_steps, end_fraction: schedule shape.
    weight_decay, b1, b2, eps: AdamW (authors: 0, 0.9, 0.999, 1e-8).
    clip_norm: global gradient-norm clipping (authors: 1.0); 0 disables.
    adafactor_factored: factor Adafactor's second moments of matrices into row and column
      statistics (memory O(rows + columns) instead of O(rows x columns)).
    adafactor_decay_rate: Adafactor's second-moment decay exponent (0.8, as t5x).
    adafactor_parameter_scale: scale Adafactor's steps by the parameter's RMS (relative steps,
      t5x's default); False gives absolute steps of ``learning_rate``.
    """

    name: str = "adamw"
    learning_rate: float = 1e-4
    schedule: str = "linear_warmup"
    warmup_steps: int = 0
    total_steps: int = 1
    end_fraction: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0
    adafactor_factored: bool = True
    adafactor_decay_rate: float = 0.8
    adafactor_parameter_scale: bool = True

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"OptimizerConfig.name={self.name!r} is not one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"OptimizerConfig.schedule={self.schedule!r} is not one of {SCHEDULES}"
            )
        if not self.learning_rate > 0:
            raise ValueError(f"OptimizerConfig.learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError("OptimizerConfig needs warmup_steps >= 0 and total_steps >= 1")


def schedule(config: OptimizerConfig) -> optax.Schedule:
    lr, warmup = config.learning_rate, config.warmup_steps
    if config.schedule == "constant" or (warmup == 0 and config.schedule != "cosine"):
        return optax.constant_schedule(lr)
    if config.schedule == "linear_warmup":
        return optax.linear_schedule(0.0, lr, warmup)
    if config.schedule == "log_warmup_constant":
        log_warmup = math.log(max(warmup, 2))

        def fn(step):
            ramp = jnp.log(jnp.asarray(step, jnp.float32) + 1.0) / log_warmup
            return lr * jnp.minimum(1.0, ramp)

        return fn
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, max(warmup, 1), max(config.total_steps, warmup + 1), lr * config.end_fraction
    )


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW or Adafactor on ``schedule(config)``."""
    lr = schedule(config)
    if config.name == "adamw":
        inner = optax.adamw(
            lr, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay
        )
    else:
        inner = optax.adafactor(
            lr,
            factored=config.adafactor_factored,
            decay_rate=config.adafactor_decay_rate,
            multiply_by_parameter_scale=config.adafactor_parameter_scale,
            weight_decay_rate=config.weight_decay or None,
        )
    chain = [optax.clip_by_global_norm(config.clip_norm)] if config.clip_norm else []
    return optax.chain(*chain, inner)


def make_masked_optimizer(config: OptimizerConfig, labels) -> optax.GradientTransformation:
    """The optimizer for ``trainable`` leaves and nothing (no state) for ``frozen`` ones."""
    return optax.multi_transform(
        {TRAINABLE: make_optimizer(config), FROZEN: optax.set_to_zero()}, labels
    )
