"""Everything gin can bind, registered in one place.

Model code never reads gin: gin builds the frozen config dataclasses here and hands them over.
Importing this module registers the names; it has no other side effects.
"""

from __future__ import annotations

import dataclasses

import gin

from tagi_jax.data.ni import NIConfig
from tagi_jax.distill.lora_teachers import LoraTeacherConfig
from tagi_jax.distill.losses import LossConfig
from tagi_jax.models.t5_config import T5Config
from tagi_jax.models.tagi_config import HyperConfig, TagiConfig
from tagi_jax.training.optim import OptimizerConfig

SAME_AS_T5 = "same_as_t5"


def _check_fields(cls, fields) -> None:
    """gin accepts any name for a ``**fields`` function: reject the ones ``cls`` lacks here."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(
            f"gin binds unknown {cls.__name__} fields {unknown}; known: {sorted(known)}"
        )


@gin.configurable("T5Config")
def t5_config(**fields) -> T5Config:
    """``T5Config.<field> = value`` in a gin file sets that field of the model config."""
    _check_fields(T5Config, fields)
    return T5Config(**fields)


@gin.configurable("HyperConfig")
def hyper_config(**fields) -> HyperConfig:
    """``HyperConfig.<field> = value`` sets that field of the hypernetwork config."""
    _check_fields(HyperConfig, fields)
    if "targets" in fields:
        fields["targets"] = tuple(fields["targets"])
    return HyperConfig(**fields)


@gin.configurable("TagiConfig")
def tagi_config(**fields) -> TagiConfig:
    """``TagiConfig.t5 = @T5Config()``, ``TagiConfig.hyper = @HyperConfig()``, ...

    ``TagiConfig.instruction_encoder_t5 = "same_as_t5"`` gives a separate instruction encoder
    the backbone's architecture (the authors encode instructions with the teacher's encoder,
    which has the student's shape).
    """
    _check_fields(TagiConfig, fields)
    fields.setdefault("t5", T5Config())
    fields.setdefault("hyper", HyperConfig())
    if fields.get("instruction_encoder_t5") == SAME_AS_T5:
        fields["instruction_encoder_t5"] = fields["t5"].replace(instruction_cross_attention=False)
    for name in ("trainable_patterns", "frozen_patterns"):
        if name in fields:
            fields[name] = tuple(fields[name])
    return TagiConfig(**fields)


@gin.configurable("LossConfig")
def loss_config(**fields) -> LossConfig:
    """``LossConfig.<field> = value``: weights and forms of the TAGI objective."""
    _check_fields(LossConfig, fields)
    return LossConfig(**fields)


@gin.configurable("LoraTeacherConfig")
def lora_teacher_config(**fields) -> LoraTeacherConfig:
    """``LoraTeacherConfig.<field> = value``: how the instance-trained LoRA teachers train."""
    _check_fields(LoraTeacherConfig, fields)
    if "targets" in fields:
        fields["targets"] = tuple(fields["targets"])
    return LoraTeacherConfig(**fields)


@gin.configurable("NIConfig")
def ni_config(**fields) -> NIConfig:
    """``NIConfig.<field> = value``: how natural-instructions splits become examples. A run's
    one NIConfig: ``DataConfig.ni`` (training, the LoRA-teacher stage) and ``evaluate.ni``
    default to what this returns, so a binding here always reaches the data."""
    _check_fields(NIConfig, fields)
    return NIConfig(**fields)


@gin.configurable("OptimizerConfig")
def optimizer_config(**fields) -> OptimizerConfig:
    """``OptimizerConfig.<field> = value``: optimizer, schedule and clipping."""
    _check_fields(OptimizerConfig, fields)
    return OptimizerConfig(**fields)
