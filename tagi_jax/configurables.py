"""Everything gin can bind, registered in one place.

Model code never reads gin: gin builds the frozen config dataclasses here and hands them over.
Importing this module registers the names; it has no other side effects.
"""

from __future__ import annotations

import dataclasses

import gin

from tagi_jax.models.t5_config import T5Config
from tagi_jax.models.tagi_config import HyperConfig, TagiConfig

_T5_FIELDS = frozenset(f.name for f in dataclasses.fields(T5Config))


@gin.configurable("T5Config")
def t5_config(**fields) -> T5Config:
    """``T5Config.<field> = value`` in a gin file sets that field of the model config."""
    unknown = sorted(set(fields) - _T5_FIELDS)
    if unknown:
        raise ValueError(
            f"gin binds unknown T5Config fields {unknown}; known: {sorted(_T5_FIELDS)}"
        )
    return T5Config(**fields)


_HYPER_FIELDS = frozenset(f.name for f in dataclasses.fields(HyperConfig))
_TAGI_FIELDS = frozenset(f.name for f in dataclasses.fields(TagiConfig))
SAME_AS_T5 = "same_as_t5"


@gin.configurable("HyperConfig")
def hyper_config(**fields) -> HyperConfig:
    """``HyperConfig.<field> = value`` sets that field of the hypernetwork config."""
    unknown = sorted(set(fields) - _HYPER_FIELDS)
    if unknown:
        raise ValueError(
            f"gin binds unknown HyperConfig fields {unknown}; known: {sorted(_HYPER_FIELDS)}"
        )
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
    unknown = sorted(set(fields) - _TAGI_FIELDS)
    if unknown:
        raise ValueError(
            f"gin binds unknown TagiConfig fields {unknown}; known: {sorted(_TAGI_FIELDS)}"
        )
    fields.setdefault("t5", T5Config())
    fields.setdefault("hyper", HyperConfig())
    if fields.get("instruction_encoder_t5") == SAME_AS_T5:
        fields["instruction_encoder_t5"] = fields["t5"].replace(instruction_cross_attention=False)
    for name in ("trainable_patterns", "frozen_patterns"):
        if name in fields:
            fields[name] = tuple(fields[name])
    return TagiConfig(**fields)
