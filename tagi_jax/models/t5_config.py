"""The T5 architecture as one frozen dataclass.

It covers T5 v1.0 (ReLU FFN, tied embeddings, logits scaled by d_model**-0.5) and T5 v1.1 /
LM-adapt / Flan-T5 / T0 (gated-GELU FFN, untied ``lm_head``). Field names follow Hugging Face's
``T5Config`` where one exists so that a ``config.json`` maps onto this class one to one; the
execution knobs (dtypes, scan, remat) are ours. Nothing here imports jax: gin binds these fields
and the CLI reads them without paying for a backend.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

# Activation names as Hugging Face spells them in ``dense_act_fn``; "gelu_new" is the tanh
# approximation that every gated-GELU T5 checkpoint was trained with.
ACTIVATIONS = ("relu", "gelu_new", "gelu", "gelu_pytorch_tanh", "silu", "swish")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Shapes and numerics of one T5 encoder-decoder.

    Attributes:
      vocab_size: rows of the token embedding (32128 for Google's checkpoints, 32100 for some).
      logits_vocab_size: when set, the output head covers only the first ``logits_vocab_size``
        ids (the tokenizer's size, 32100 for T5's SentencePiece model) and the remaining
        embedding rows are never predicted: logits are ``[..., logits_vocab_size]``, so the
        cross-entropy, the KL and greedy decoding never see the padding ids. The logits are cut
        to those ids after the head's matmul, which equals the authors'
        ``resize_token_embeddings(len(tokenizer))`` (tagi_spec.md §2.1) while the parameters
        keep their checkpoint shape. None (the default, and what a Hugging Face config.json
        gives) predicts all ``vocab_size`` rows.
      d_model: width of the residual stream.
      d_kv: width of one attention head.
      d_ff: width of the FFN hidden layer.
      num_layers: encoder blocks.
      num_decoder_layers: decoder blocks.
      num_heads: attention heads.
      relative_attention_num_buckets: relative-position buckets (T5: 32).
      relative_attention_max_distance: distance at which buckets saturate (T5: 128).
      dropout_rate: dropout used when a ``dropout_rng`` is given.
      layer_norm_epsilon: epsilon of T5's RMS layer norm.
      is_gated_act: gated FFN (``wi_0``/``wi_1``) as in v1.1, or plain ``wi`` as in v1.0.
      dense_act_fn: FFN activation, Hugging Face name.
      tie_word_embeddings: the output projection is the input embedding (v1.0); otherwise a
        separate ``lm_head`` (``decoder/logits_dense``).
      scale_decoder_outputs: multiply the decoder output by ``d_model**-0.5`` before the head.
        True for T5 v1.0; kept apart from tying because transformers 5 can write tied heads
        without the scale.
      pad_token_id, eos_token_id, decoder_start_token_id: special ids (T5: 0, 1, 0).
      dtype: compute dtype of activations and matmuls.
      param_dtype: storage dtype of parameters (keep float32 master weights when training).
      scan_layers: run the blocks of each stack with ``nn.scan``: parameters get a leading
        ``layers`` axis and compile time stops growing with depth (XL/XXL).
      remat_policy: what to recompute in the backward pass, per block.
      instruction_cross_attention: the TAGI paper's hierarchical fusion (Eq. 1): every encoder
        block gets a residual cross-attention to the instruction states, zero-initialised.
        Not part of any released checkpoint (and absent from the authors' code).
    """

    vocab_size: int = 32128
    logits_vocab_size: int | None = None
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 8
    num_decoder_layers: int = 8
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    is_gated_act: bool = True
    dense_act_fn: str = "gelu_new"
    tie_word_embeddings: bool = False
    scale_decoder_outputs: bool = False
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    instruction_cross_attention: bool = False

    def __post_init__(self):
        positive = (
            "vocab_size",
            "d_model",
            "d_kv",
            "d_ff",
            "num_layers",
            "num_decoder_layers",
            "num_heads",
            "relative_attention_num_buckets",
            "relative_attention_max_distance",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"T5Config.{name} must be a positive integer, got {value!r}")
        n = self.logits_vocab_size
        if n is not None and (
            not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= self.vocab_size
        ):
            raise ValueError(
                f"T5Config.logits_vocab_size must be None or an integer in 1..vocab_size="
                f"{self.vocab_size}, got {n!r}"
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.dense_act_fn not in ACTIVATIONS:
            raise ValueError(
                f"T5Config.dense_act_fn={self.dense_act_fn!r} is not one of {ACTIVATIONS}"
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"T5Config.remat_policy={self.remat_policy!r} is not one of {REMAT_POLICIES}"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"T5Config.{name}={getattr(self, name)!r} is not one of {DTYPES}")

    @property
    def inner_dim(self) -> int:
        """Width of the joined heads (``num_heads * d_kv``), the ``joined_kv`` axis."""
        return self.num_heads * self.d_kv

    @property
    def logits_width(self) -> int:
        """Number of logit columns (ids the head can predict): ``logits_vocab_size`` if set."""
        return self.vocab_size if self.logits_vocab_size is None else self.logits_vocab_size

    def replace(self, **changes: Any) -> T5Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> T5Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown T5Config fields: {unknown}")
        return cls(**values)

    # --- Hugging Face config.json ---------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **overrides: Any) -> T5Config:
        """Reads the fields of a Hugging Face T5 ``config.json``.

        Raises ValueError when the file describes another architecture, so a BART or GPT-2
        directory given by mistake fails here and not as a shape error three layers deeper.
        """
        model_type = hf.get("model_type")
        architectures = hf.get("architectures") or []
        if model_type != "t5":
            raise ValueError(
                f"not a T5 checkpoint: model_type={model_type!r}, architectures={architectures}"
            )
        # Hugging Face derives the activation from feed_forward_proj ("relu", "gated-gelu",
        # "gated-silu", ...); "gated-gelu" means the tanh approximation for legacy reasons.
        proj = hf.get("feed_forward_proj", "relu")
        parts = proj.split("-")
        is_gated = parts[0] == "gated"
        if len(parts) > 2 or (len(parts) == 2 and not is_gated):
            raise ValueError(f"unsupported feed_forward_proj={proj!r} in config.json")
        act = "gelu_new" if proj == "gated-gelu" else parts[-1]
        num_layers = hf.get("num_layers", 6)
        tied = bool(hf.get("tie_word_embeddings", True))
        decoder_layers = hf.get("num_decoder_layers")
        values = dict(
            vocab_size=hf.get("vocab_size", 32128),
            d_model=hf.get("d_model", 512),
            d_kv=hf.get("d_kv", 64),
            d_ff=hf.get("d_ff", 2048),
            num_layers=num_layers,
            num_decoder_layers=decoder_layers if decoder_layers is not None else num_layers,
            num_heads=hf.get("num_heads", 8),
            relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
            dropout_rate=hf.get("dropout_rate", 0.1),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
            is_gated_act=is_gated,
            dense_act_fn=act,
            tie_word_embeddings=tied,
            # transformers 5 writes the scale explicitly and always says "tied"; older files
            # tie and scale together.
            scale_decoder_outputs=hf.get("scale_decoder_outputs", tied),
            pad_token_id=hf.get("pad_token_id", 0) or 0,
            eos_token_id=_first_id(hf.get("eos_token_id", 1)),
            decoder_start_token_id=hf.get("decoder_start_token_id", 0) or 0,
        )
        values.update(overrides)
        return cls(**values)

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` that ``transformers.T5Config`` reads back into this shape.

        ``logits_vocab_size`` has no Hugging Face field: there the head predicts all
        ``vocab_size`` rows."""
        if self.is_gated_act:
            proj = "gated-gelu" if self.dense_act_fn == "gelu_new" else f"gated-{self.dense_act_fn}"
        else:
            proj = self.dense_act_fn
        return {
            "architectures": ["T5ForConditionalGeneration"],
            "model_type": "t5",
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "d_kv": self.d_kv,
            "d_ff": self.d_ff,
            "num_layers": self.num_layers,
            "num_decoder_layers": self.num_decoder_layers,
            "num_heads": self.num_heads,
            "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "dropout_rate": self.dropout_rate,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "initializer_factor": 1.0,
            "feed_forward_proj": proj,
            # transformers 5 derives the output scale from this flag, and unties the head when
            # the file holds an lm_head.weight that differs from shared.weight; hf_t5.save
            # writes an explicit lm_head for every model whose scale and tying disagree.
            "tie_word_embeddings": self.tie_word_embeddings and self.scale_decoder_outputs,
            "is_encoder_decoder": True,
            "use_cache": True,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "decoder_start_token_id": self.decoder_start_token_id,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _first_id(value: Any) -> int:
    # Newer configs may list several EOS ids; T5 decoding stops on the first.
    if isinstance(value, (list, tuple)):
        return int(value[0])
    return int(value)
