"""The logit teacher: a frozen T5 that reads the full instruction + input.

For SNI this is Tk-Instruct (a local Hugging Face directory) or the model our ``metatrain``
stage produced (an orbax parameter checkpoint); either loads with ``load_teacher``. Its logits
come from ``teacher_logits`` under ``stop_gradient``; the training step computes them before,
not inside, ``jax.value_and_grad``. Student and teacher vocabularies must agree, or be reduced
explicitly to a shared prefix (``LossConfig.vocab_size``); the KL refuses to compare logits of
different widths silently.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from tagi_jax import paths
from tagi_jax.convert import hf_t5, param_checkpoint
from tagi_jax.models import t5
from tagi_jax.models.t5_config import T5Config
from tagi_jax.parallel.partitioning import DEFAULT_RULES, AxisRules


@dataclasses.dataclass(frozen=True)
class LogitTeacher:
    config: T5Config
    params: Any = dataclasses.field(repr=False, compare=False)


def load_teacher(
    path: str, *, mesh=None, axis_rules: AxisRules = DEFAULT_RULES, **config_overrides
) -> LogitTeacher:
    """A teacher from a tagi_jax parameter checkpoint (local or cloud) or a local HF T5
    directory."""
    if paths.exists(paths.join(path, param_checkpoint.CONFIG_FILE)):
        config, params = param_checkpoint.load(path, mesh=mesh, axis_rules=axis_rules)
        if config_overrides:
            config = config.replace(**config_overrides)
    else:
        config, params = hf_t5.load(path, mesh=mesh, axis_rules=axis_rules, **config_overrides)
    # A teacher never drops out.
    return LogitTeacher(config.replace(dropout_rate=0.0), params)


def teacher_logits(teacher: LogitTeacher, teacher_input_tokens, decoder_input_tokens):
    """Float32 teacher logits ``[batch, target_len, vocab]``, gradient-free."""
    params = jax.lax.stop_gradient(teacher.params)
    logits = t5.forward(teacher.config, params, teacher_input_tokens, decoder_input_tokens)
    return jax.lax.stop_gradient(logits)
