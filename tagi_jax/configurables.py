"""Everything gin can bind, registered in one place.

Model code never reads gin: gin builds the frozen config dataclasses here and hands them over.
Importing this module registers the names; it has no other side effects.
"""

from __future__ import annotations

import dataclasses

import gin

from tagi_jax.models.t5_config import T5Config

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
