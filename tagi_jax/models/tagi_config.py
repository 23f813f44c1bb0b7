"""Configuration of the TAGI model: the hypernetwork, fusion and what trains.

Frozen dataclasses, validated on construction so that a bad gin binding fails when the config
is built and names the field. Two presets in ``gin_configs/methods/``: ``paper.gin`` (the
default values here) and ``authors_code.gin``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from tagi_jax.models import lora
from tagi_jax.models.t5_config import T5Config

INSTRUCTION_ENCODERS = ("backbone", "separate")
POOLINGS = ("masked_mean", "first_last_sum_unmasked")
GENERATORS = ("per_layer", "shared_indexed", "slots")
INITS = ("zero_b", "authors")
TRAINABLE_PRESETS = ("paper", "authors_code")


@dataclasses.dataclass(frozen=True)
class HyperConfig:
    """The instruction hypernetwork.

    Attributes:
      targets: adapter targets (``lora.TARGETS`` names); default q and v of all three
        attention types.
      rank: LoRA rank r.
      lora_scale: multiplies every generated LoRA term.
      instruction_encoder: ``backbone`` (the student's own T5 encoder, paper) or ``separate``
        (another T5 encoder with its own weights, e.g. the teacher's, as in the authors' code).
      train_instruction_encoder: let gradients reach the instruction encoder; when False its
        output is under ``stop_gradient``.
      pooling: ``masked_mean`` over instruction tokens, or ``first_last_sum_unmasked`` (the
        authors': first block output + final output, mean over all positions incl. padding).
      instruction_dim: width of the tanh instruction vector (255 in the authors' code).
      generator: ``per_layer`` (one MLP per block, shared by that block's targets: paper
        Eq. 2), ``shared_indexed`` (one MLP pair per attention type for all blocks, fed the raw
        block/projection index: the authors' code) or ``slots`` (learned per-(block, target)
        queries attending over the instruction tokens, then an MLP per target: HINT).
      hidden_dim: hidden width of the generator MLPs (8 in the authors' code).
      slot_heads: attention heads of the ``slots`` pooler.
      init: ``zero_b`` (the B generator's output layer is zero, so the student starts equal to
        the base model while A is random) or ``authors`` (every generator weight N(0, 1e-7),
        biases zero).
      divide_b_by_sqrt_rank: scale generated B by 1/sqrt(r) (authors' HyperParamNet).
    """

    targets: tuple[str, ...] = lora.DEFAULT_TARGETS
    rank: int = 32
    lora_scale: float = 1.0
    instruction_encoder: str = "backbone"
    train_instruction_encoder: bool = False
    pooling: str = "masked_mean"
    instruction_dim: int = 256
    generator: str = "per_layer"
    hidden_dim: int = 8
    slot_heads: int = 4
    init: str = "zero_b"
    divide_b_by_sqrt_rank: bool = False

    def __post_init__(self):
        object.__setattr__(self, "targets", lora.validate_targets(self.targets))
        for name in ("rank", "instruction_dim", "hidden_dim", "slot_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"HyperConfig.{name} must be a positive integer, got {value!r}")
        choices = {
            "instruction_encoder": INSTRUCTION_ENCODERS,
            "pooling": POOLINGS,
            "generator": GENERATORS,
            "init": INITS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"HyperConfig.{name}={getattr(self, name)!r} is not one of {allowed}"
                )


@dataclasses.dataclass(frozen=True)
class TagiConfig:
    """The whole TAGI student.

    Attributes:
      t5: the frozen backbone (``instruction_cross_attention`` there switches on the paper's
        per-block instruction cross-attention).
      hyper: the hypernetwork.
      instruction_encoder_t5: the architecture of a ``separate`` instruction encoder (its
        ``d_model`` must equal the backbone's when fusion is on); None for ``backbone``.
      fusion: the decoder cross-attends to ``[instruction states ; input states]``.
      trainable: ``paper`` (hypernetwork, pooler, projection, new fusion layers) or
        ``authors_code`` (also every layer norm, the token embeddings and all FFN weights).
      trainable_patterns, frozen_patterns: regular expressions over ``/``-joined parameter
        paths (e.g. ``t5/decoder/.*/mlp/.*``) that add to, then remove from, the preset.
    """

    t5: T5Config = dataclasses.field(default_factory=T5Config)
    hyper: HyperConfig = dataclasses.field(default_factory=HyperConfig)
    instruction_encoder_t5: T5Config | None = None
    fusion: bool = True
    trainable: str = "paper"
    trainable_patterns: tuple[str, ...] = ()
    frozen_patterns: tuple[str, ...] = ()

    def __post_init__(self):
        lora.validate_targets(self.hyper.targets, self.t5)
        if self.trainable not in TRAINABLE_PRESETS:
            raise ValueError(
                f"TagiConfig.trainable={self.trainable!r} is not one of {TRAINABLE_PRESETS}"
            )
        for field in ("trainable_patterns", "frozen_patterns"):
            patterns = tuple(getattr(self, field))
            object.__setattr__(self, field, patterns)
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"TagiConfig.{field}: bad pattern {pattern!r}: {e}") from e
        separate = self.hyper.instruction_encoder == "separate"
        if separate and self.instruction_encoder_t5 is None:
            raise ValueError(
                "TagiConfig.instruction_encoder_t5 is required when "
                "HyperConfig.instruction_encoder='separate'"
            )
        if not separate and self.instruction_encoder_t5 is not None:
            raise ValueError(
                "TagiConfig.instruction_encoder_t5 is set but HyperConfig.instruction_encoder "
                "is 'backbone'"
            )
        needs_same_width = self.fusion or self.t5.instruction_cross_attention
        if needs_same_width and self.instruction_width != self.t5.d_model:
            raise ValueError(
                f"TagiConfig.instruction_encoder_t5.d_model={self.instruction_width} must equal "
                f"t5.d_model={self.t5.d_model} for fusion / instruction cross-attention"
            )

    @property
    def instruction_t5(self) -> T5Config:
        """The architecture that encodes instructions."""
        return self.instruction_encoder_t5 or self.t5

    @property
    def instruction_width(self) -> int:
        return self.instruction_t5.d_model

    def replace(self, **changes: Any) -> TagiConfig:
        return dataclasses.replace(self, **changes)

    # --- JSON (exports and run records rebuild the config without gin) ---------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TagiConfig:
        values = dict(values)
        _check_fields(cls, values)
        values["t5"] = T5Config.from_dict(values["t5"])
        if values.get("instruction_encoder_t5") is not None:
            values["instruction_encoder_t5"] = T5Config.from_dict(values["instruction_encoder_t5"])
        hyper = dict(values["hyper"])
        _check_fields(HyperConfig, hyper)
        values["hyper"] = HyperConfig(**{k: _tuples(v) for k, v in hyper.items()})
        return cls(**{k: _tuples(v) for k, v in values.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TagiConfig:
        return cls.from_dict(json.loads(text))


def _check_fields(cls, values: dict[str, Any]) -> None:
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {unknown}")


def _tuples(value: Any) -> Any:
    """JSON turns tuples into lists; the configs are hashable, so turn them back."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
