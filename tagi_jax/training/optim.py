"""Optimizers and learning-rate schedules.

``make_optimizer(config)`` is gradient clipping + AdamW or Adafactor on the chosen schedule.
The trainer applies it to the trainable partition only (``training.state.partition``), so the
frozen base never gets optimizer state.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("constant", "linear_warmup", "log_warmup_constant", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Attributes:
    name: ``adamw`` (the authors) or ``adafactor`` (t5x/HINT, C4 pretraining).
    learning_rate: peak rate.
    schedule: ``constant``; ``linear_warmup`` (linear from 0 to lr over the warmup, then
      constant: the paper's Table 8 "linear warmup rate 0.02", which states no decay);
      ``log_warmup_constant`` (the authors' released runs: DeepSpeed's WarmupLR overrides HF's
      scheduler, lr·log(step+1)/log(warmup), then constant; tagi_spec.md §7.3); ``cosine``
      (linear warmup, cosine decay to ``end_fraction``·lr at ``total_steps``).
    warmup_steps: warmup length in steps; or ``warmup_fraction`` of ``total_steps`` (the
      trainer sets ``total_steps`` to the run's steps), e.g. 0.02 for the paper's 2%.
    total_steps, end_fraction: schedule shape.
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
    warmup_fraction: float | None = None
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
        numbers = ("learning_rate", "end_fraction", "weight_decay", "b1", "b2", "eps", "clip_norm")
        for name in numbers:
            value = getattr(self, name)
            # a gin string ('1e-4') or an inf/NaN is a config error here, not a TypeError or a
            # NaN model later
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"OptimizerConfig.{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"OptimizerConfig.{name} must be finite, got {value}")
        for name in ("warmup_steps", "total_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"OptimizerConfig.{name} must be an integer, got {value!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"OptimizerConfig.learning_rate must be > 0, got {self.learning_rate}")
        if self.clip_norm < 0:
            raise ValueError(
                f"OptimizerConfig.clip_norm must be >= 0 (0 disables), got {self.clip_norm}"
            )
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError("OptimizerConfig needs warmup_steps >= 0 and total_steps >= 1")
        if self.warmup_fraction is not None:
            if not 0.0 <= self.warmup_fraction < 1.0:
                raise ValueError(
                    f"OptimizerConfig.warmup_fraction must be in [0, 1), got {self.warmup_fraction}"
                )
            if self.warmup_steps:
                raise ValueError(
                    "OptimizerConfig: set warmup_steps or warmup_fraction, not both "
                    f"(got {self.warmup_steps} and {self.warmup_fraction})"
                )

    @property
    def warmup(self) -> int:
        """The warmup length in steps."""
        if self.warmup_fraction is None:
            return self.warmup_steps
        return round(self.warmup_fraction * self.total_steps)


def schedule(config: OptimizerConfig) -> optax.Schedule:
    lr, warmup = config.learning_rate, config.warmup
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
