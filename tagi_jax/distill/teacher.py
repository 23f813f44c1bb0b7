"""The logit teacher: a frozen T5 that reads the full instruction + input.

For SNI this is Tk-Instruct (a local Hugging Face directory) or the model our ``metatrain``
stage produced (an orbax parameter checkpoint); either loads with ``load_teacher``. Its logits
come from ``teacher_logits`` under ``stop_gradient``; the training step computes them before,
not inside, ``jax.value_and_grad``. Student and teacher vocabularies must agree, or be reduced
explicitly to a shared prefix (``shared_vocab_size``); they are never compared silently.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

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
    """A teacher from a tagi_jax parameter checkpoint or a local HF T5 directory."""
    if os.path.exists(os.path.join(path, param_checkpoint.CONFIG_FILE)):
        config, params = param_checkpoint.load(path, mesh=mesh, axis_rules=axis_rules)
        if config_overrides:
            config = config.replace(**config_overrides)
    else:
        config, params = hf_t5.load(path, mesh=mesh, axis_rules=axis_rules, **config_overrides)
    # A teacher never drops out.
    return LogitTeacher(config.replace(dropout_rate=0.0), params)


def shared_vocab_size(
    student_vocab: int, teacher_vocab: int, configured: int | None = None
) -> int | None:
    """The vocabulary prefix to compare: None when the widths agree and nothing is configured.

    Different widths (e.g. a 32100-row Tk-Instruct against a 32128-row T5-LM-adapt) need an
    explicit ``configured`` size; the rows beyond it are masked out of both distributions.
    """
    if configured is not None:
        if configured <= 0 or configured > min(student_vocab, teacher_vocab):
            raise ValueError(
                f"vocab_size={configured} must be in 1..{min(student_vocab, teacher_vocab)} "
                f"(student {student_vocab} rows, teacher {teacher_vocab})"
            )
        return configured
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"teacher vocabulary has {teacher_vocab} rows and the student's {student_vocab}: set "
            "LossConfig.vocab_size to the tokenizer's size (e.g. 32100) so the extra rows are "
            "masked instead of compared"
        )
    return None


def teacher_logits(teacher: LogitTeacher, teacher_input_tokens, decoder_input_tokens):
    """Float32 teacher logits ``[batch, target_len, vocab]``, gradient-free."""
    params = jax.lax.stop_gradient(teacher.params)
    logits = t5.forward(teacher.config, params, teacher_input_tokens, decoder_input_tokens)
    return jax.lax.stop_gradient(logits)
