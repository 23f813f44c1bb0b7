"""T5 building blocks in Flax Linen with logical axis names.

Every parameter is created through ``nn.with_logical_partitioning`` (t5x vocabulary: batch,
length, embed, mlp, heads, kv, joined_kv, vocab, relpos_buckets, layers) and every large
activation passes ``nn.with_logical_constraint``; outside a mesh both are no-ops. The modules
know nothing about meshes, hypernetworks or checkpoints.

Numerics follow the reference T5 exactly: RMS layer norm in float32, no 1/sqrt(d) in attention
(it is folded into the initialisation), softmax in float32, relative position buckets computed
with the same float32 log as Mesh TensorFlow and Hugging Face.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tagi_jax.models import lora as lora_lib
from tagi_jax.models.t5_config import T5Config

# Added to attention logits at masked positions. Finite (not -inf and not finfo.min) so that
# adding the relative position bias can never overflow to -inf and a fully masked row gives a
# uniform distribution instead of NaN.
MASK_VALUE = -1e10

constrain = nn.with_logical_constraint


def dtype_of(name: str) -> Any:
    return jnp.dtype(name)


def activation_fn(name: str):
    """The FFN activation under its Hugging Face name."""
    if name == "relu":
        return jax.nn.relu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return functools.partial(jax.nn.gelu, approximate=True)
    if name == "gelu":
        return functools.partial(jax.nn.gelu, approximate=False)
    if name in ("silu", "swish"):
        return jax.nn.silu
    raise ValueError(f"unknown activation {name!r}")


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction, statistics in float32."""

    epsilon: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(variance + self.epsilon)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


@jax.custom_vjp
def matmul(x, kernel):
    """``x [..., in] @ kernel [in, out]`` whose weight gradient is computed as ``x^T · dy``.

    Autodiff of the plain einsum gives the weight gradient as ``(dy^T · x)^T``; XLA:CPU then
    transposes ``dy`` (the larger operand: tokens × out) and runs the dot outside its fast
    matmul library, which made the backward pass 2x slower than the forward should allow
    (WORKSPACE.md, "Performance"). The value and both gradients are unchanged.
    """
    return jnp.einsum("...i,io->...o", x, kernel)


def _matmul_fwd(x, kernel):
    return matmul(x, kernel), (x, kernel)


def _matmul_bwd(residuals, dy):
    x, kernel = residuals
    dx = jnp.einsum("...o,io->...i", dy, kernel)
    tokens_x = x.reshape(-1, x.shape[-1])
    tokens_dy = dy.reshape(-1, dy.shape[-1])
    return dx.astype(x.dtype), (tokens_x.T @ tokens_dy).astype(kernel.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Dense(nn.Module):
    """A bias-free projection ``x @ kernel`` over the last axis.

    Kernels are 2-D ``[in, out]`` (the transpose of a PyTorch ``Linear`` weight) so that a LoRA
    pair ``A [in, r]``, ``B [r, out]`` applies and merges without reshapes.
    """

    features: int
    kernel_axes: tuple[str, str]
    dtype: Any
    param_dtype: Any
    kernel_init: Any = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

    @nn.compact
    def __call__(self, x, lora=None):
        """``lora``: optional per-example ``(A [batch, in, r], B [batch, r, out])``."""
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
            (x.shape[-1], self.features),
            self.param_dtype,
        )
        y = matmul(x.astype(self.dtype), kernel.astype(self.dtype))
        if lora is not None:
            y = lora_lib.apply(x, y, lora, self.dtype)
        return y


class Embed(nn.Module):
    """Token embedding ``[vocab, embed]``, also the tied output projection of T5 v1.0."""

    num_embeddings: int
    features: int
    dtype: Any
    param_dtype: Any

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )

    def __call__(self, tokens):
        out = jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)
        return constrain(out, ("batch", "length", "embed"))

    def attend(self, x):
        """Logits against the embedding table (tied head)."""
        return jnp.einsum("...e,ve->...v", x.astype(self.dtype), self.embedding.astype(self.dtype))


# --- relative positions -------------------------------------------------------------------


def relative_position_bucket(
    relative_position: np.ndarray, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
    """T5's bucket of ``memory_position - query_position``, in numpy.

    Small distances get one bucket each, larger ones logarithmic bins up to ``max_distance``.
    The log is taken in float32 and truncated like Mesh TensorFlow / Hugging Face, so bucket
    boundaries match theirs exactly (tests compare against the PyTorch function). Evaluated in
    numpy at trace time: buckets depend only on static shapes.
    """
    relative_position = np.asarray(relative_position, dtype=np.int64)
    buckets = np.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).astype(np.int64) * num_buckets
        distance = np.abs(relative_position)
    else:
        distance = -np.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    with np.errstate(divide="ignore"):
        scaled = (
            np.log(distance.astype(np.float32) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact))
            * np.float32(num_buckets - max_exact)
        ).astype(np.float32)
    # Small distances take the other branch, so the -inf of log(0) is never used; clip it before
    # the cast so numpy does not warn about an invalid conversion.
    scaled = np.where(is_small, 0.0, scaled)
    if_large = max_exact + scaled.astype(np.int64)
    if_large = np.minimum(if_large, num_buckets - 1)
    return buckets + np.where(is_small, distance, if_large)


class RelativePositionBiases(nn.Module):
    """Learned per-head bias over relative position buckets, ``[buckets, heads]``.

    Shared by all layers of one stack (Hugging Face stores it in block 0).
    """

    num_buckets: int
    max_distance: int
    num_heads: int
    bidirectional: bool
    param_dtype: Any

    @nn.compact
    def __call__(self, query_positions, key_length: int, max_query_length: int):
        """Bias ``[1, heads, q, k]`` in float32 for query positions (static or traced ints).

        ``max_query_length`` bounds the query positions so the bucket table can be built in
        numpy; in incremental decoding the single query position is a traced scalar.
        """
        embedding = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(
                nn.initializers.normal(stddev=1.0), ("relpos_buckets", "heads")
            ),
            (self.num_buckets, self.num_heads),
            self.param_dtype,
        )
        offset = max_query_length - 1
        relative = np.arange(-offset, key_length)
        table = relative_position_bucket(
            relative,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        rel = jnp.arange(key_length)[None, :] - query_positions[:, None]
        buckets = jnp.asarray(table, dtype=jnp.int32)[rel + offset]
        values = jnp.take(embedding.astype(jnp.float32), buckets, axis=0)  # [q, k, heads]
        return jnp.transpose(values, (2, 0, 1))[None]


def padding_bias(key_tokens) -> jax.Array:
    """Additive float32 mask ``[batch, 1, 1, k]`` that hides padding (token id 0) keys."""
    return jnp.where(key_tokens > 0, 0.0, MASK_VALUE)[:, None, None, :].astype(jnp.float32)


def causal_bias(length: int) -> jax.Array:
    """Additive float32 mask ``[1, 1, q, k]`` that hides future keys."""
    allowed = np.tril(np.ones((length, length), dtype=bool))
    return jnp.asarray(np.where(allowed, 0.0, MASK_VALUE), dtype=jnp.float32)[None, None]


# --- attention ----------------------------------------------------------------------------


class MultiHeadAttention(nn.Module):
    """T5 attention: 2-D ``query/key/value/out`` kernels over ``joined_kv``, no logit scaling.

    Incremental decoding keeps keys and values in the ``cache`` collection. A first call with
    ``decode=True`` and no cache creates it: zeros of the full target length for
    self-attention, the projected encoder states for cross-attention (computed once, not at
    every step). Later calls with ``decode=True`` take one token at ``decode_position``.
    """

    config: T5Config
    is_cross_attention: bool = False
    deterministic: bool = True
    zero_init_out: bool = False

    @nn.compact
    def __call__(
        self,
        inputs_q,
        inputs_kv,
        bias,
        *,
        decode: bool = False,
        decode_position=None,
        adapters=None,
    ):
        """``adapters``: optional ``{"query"|"key"|"value"|"out": (A, B)}`` for this block."""
        cfg = self.config
        adapters = adapters or {}
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        # Mesh TensorFlow's initialisation, which folds the 1/sqrt(d_kv) of attention into q.
        d_model, inner = cfg.d_model, cfg.inner_dim
        q_init = nn.initializers.normal(stddev=(d_model * cfg.d_kv) ** -0.5)
        kv_init = nn.initializers.normal(stddev=d_model**-0.5)
        o_init = (
            nn.initializers.zeros if self.zero_init_out else nn.initializers.normal(inner**-0.5)
        )
        proj = functools.partial(Dense, dtype=dtype, param_dtype=pdtype)
        query = proj(inner, ("embed", "joined_kv"), kernel_init=q_init, name="query")
        key = proj(inner, ("embed", "joined_kv"), kernel_init=kv_init, name="key")
        value = proj(inner, ("embed", "joined_kv"), kernel_init=kv_init, name="value")
        out = proj(d_model, ("joined_kv", "embed"), kernel_init=o_init, name="out")

        def split_heads(x):
            x = x.reshape(x.shape[:-1] + (cfg.num_heads, cfg.d_kv))
            return constrain(x, ("batch", "length", "heads", "kv"))

        q = split_heads(query(inputs_q, adapters.get("query")))

        def over_parts(dense, lora, kv):
            # A memory given in parts (TAGI's [instruction ; input]) is projected part by
            # part and joined after: a part that takes no gradient (the frozen instruction
            # states) then costs no backward matmul, where the joined memory's would.
            if not isinstance(kv, tuple):
                return dense(kv, lora)
            rows = max(part.shape[0] for part in kv)
            projected = []
            for part in kv:
                if part.shape[0] == 1 < rows:
                    # One task's instruction shared by every row (decoding with the states
                    # cached per task, tagi.greedy_decode): projected once, not once per
                    # row, with that task's adapters (every row's are the task's: row 0's).
                    one = None if lora is None else jax.tree.map(lambda x: x[:1], lora)
                    part = dense(part, one)
                    projected.append(jnp.broadcast_to(part, (rows, *part.shape[1:])))
                else:
                    projected.append(dense(part, lora))
            return jnp.concatenate(projected, axis=1)

        project_key = functools.partial(over_parts, key, adapters.get("key"))
        project_value = functools.partial(over_parts, value, adapters.get("value"))

        if decode and self.is_cross_attention:
            # Project the encoder states once; every later step reads them from the cache.
            k_cache = self.variable(
                "cache", "cross_key", lambda: split_heads(project_key(inputs_kv))
            )
            v_cache = self.variable(
                "cache", "cross_value", lambda: split_heads(project_value(inputs_kv))
            )
            k, v = k_cache.value, v_cache.value
        elif decode:
            is_step = self.has_variable("cache", "cached_key")
            k_new = split_heads(project_key(inputs_kv))
            v_new = split_heads(project_value(inputs_kv))
            k_cache = self.variable("cache", "cached_key", jnp.zeros, k_new.shape, k_new.dtype)
            v_cache = self.variable("cache", "cached_value", jnp.zeros, v_new.shape, v_new.dtype)
            if is_step:
                if k_new.shape[1] != 1:
                    raise ValueError(
                        f"incremental decoding takes one token per step, got length {k_new.shape[1]}"
                    )
                index = (0, decode_position, 0, 0)
                k_cache.value = jax.lax.dynamic_update_slice(k_cache.value, k_new, index)
                v_cache.value = jax.lax.dynamic_update_slice(v_cache.value, v_new, index)
                k, v = k_cache.value, v_cache.value
            else:
                k, v = k_new, v_new
        else:
            k = split_heads(project_key(inputs_kv))
            v = split_heads(project_value(inputs_kv))

        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        if bias is not None:
            scores = scores + bias
        # Softmax with the normalisation deferred past the value matmul: dividing the
        # [b, q, h, d] context costs d/k of dividing the [b, h, q, k] weights, and the
        # backward pass keeps one fewer weight-sized intermediate (1.15x on the attention
        # block's fwd+bwd on CPU). The max is a constant shift, so it takes no gradient.
        # Every row holds its maximum, so the sum is >= 1 (masked rows come out uniform).
        shifted = scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
        unnormalised = jnp.exp(shifted)
        denominator = jnp.sum(unnormalised, axis=-1)  # [b, h, q]
        if not self.deterministic and cfg.dropout_rate > 0.0:
            # Dropout is linear in the weights, so it commutes with the deferred division.
            unnormalised = nn.Dropout(rate=cfg.dropout_rate)(unnormalised, deterministic=False)
        context = jnp.einsum("bhqk,bkhd->bqhd", unnormalised.astype(dtype), v)
        context = context.astype(jnp.float32) / jnp.swapaxes(denominator, 1, 2)[..., None]
        context = context.astype(dtype)
        context = context.reshape(context.shape[:2] + (inner,))
        context = constrain(context, ("batch", "length", "joined_kv"))
        return out(context, adapters.get("out"))


class MlpBlock(nn.Module):
    """T5 FFN: ``wo(act(wi(x)))`` (v1.0) or ``wo(act(wi_0(x)) * wi_1(x))`` (v1.1, gated)."""

    config: T5Config
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, adapters=None):
        """``adapters``: optional ``{"wi"|"wi_0"|"wi_1"|"wo": (A, B)}`` for this block."""
        cfg = self.config
        adapters = adapters or {}
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        proj = functools.partial(Dense, dtype=dtype, param_dtype=pdtype)
        wi_init = nn.initializers.normal(stddev=cfg.d_model**-0.5)
        wo_init = nn.initializers.normal(stddev=cfg.d_ff**-0.5)
        act = activation_fn(cfg.dense_act_fn)
        if cfg.is_gated_act:
            wi_0 = proj(cfg.d_ff, ("embed", "mlp"), kernel_init=wi_init, name="wi_0")
            wi_1 = proj(cfg.d_ff, ("embed", "mlp"), kernel_init=wi_init, name="wi_1")
            h = act(wi_0(x, adapters.get("wi_0"))) * wi_1(x, adapters.get("wi_1"))
        else:
            wi = proj(cfg.d_ff, ("embed", "mlp"), kernel_init=wi_init, name="wi")
            h = act(wi(x, adapters.get("wi")))
        h = constrain(h, ("batch", "length", "mlp"))
        h = nn.Dropout(rate=cfg.dropout_rate)(h, deterministic=self.deterministic)
        wo = proj(cfg.d_model, ("mlp", "embed"), kernel_init=wo_init, name="wo")
        return wo(h, adapters.get("wo"))


# --- blocks -------------------------------------------------------------------------------


class EncoderLayer(nn.Module):
    """Pre-norm self-attention then pre-norm FFN, each with dropout and a residual."""

    config: T5Config
    deterministic: bool = True
    # Also return the block output as the per-layer (scan) output, for callers that need
    # intermediate states (the authors' instruction pooling reads the first block's).
    emit_output: bool = False

    @nn.compact
    def __call__(self, x, bias, instruction, instruction_bias, adapters):
        """``instruction``/``instruction_bias``: the instruction states and their padding mask,
        used only with ``instruction_cross_attention``; ``adapters``: this block's LoRA pairs
        as ``{module: {dense: (A, B)}}`` or None."""
        cfg = self.config
        adapters = adapters or {}
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        norm = functools.partial(RMSNorm, cfg.layer_norm_epsilon, dtype, pdtype)
        drop = nn.Dropout(rate=cfg.dropout_rate)
        det = self.deterministic

        h = norm(name="pre_attention_layer_norm")(x)
        h = MultiHeadAttention(cfg, deterministic=det, name="attention")(
            h, h, bias, adapters=adapters.get("attention")
        )
        x = x + drop(h, deterministic=det)

        if cfg.instruction_cross_attention:
            # TAGI paper Eq. 1 (no reference implementation exists): a residual cross-attention
            # from the block's states to the instruction states. Its output projection starts
            # at zero, so switching it on starts as the identity.
            h = norm(name="pre_instruction_attention_layer_norm")(x)
            h = MultiHeadAttention(
                cfg,
                is_cross_attention=True,
                deterministic=det,
                zero_init_out=True,
                name="instruction_attention",
            )(h, instruction, instruction_bias)
            x = x + drop(h, deterministic=det)

        h = norm(name="pre_mlp_layer_norm")(x)
        h = MlpBlock(cfg, deterministic=det, name="mlp")(h, adapters.get("mlp"))
        x = x + drop(h, deterministic=det)
        x = constrain(x, ("batch", "length", "embed"))
        # (carry, per-layer output): the signature nn.scan needs.
        return x, (x if self.emit_output else None)


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention over the encoder, then the FFN."""

    config: T5Config
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x, encoded, self_bias, cross_bias, decode_position, adapters):
        cfg = self.config
        adapters = adapters or {}
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        norm = functools.partial(RMSNorm, cfg.layer_norm_epsilon, dtype, pdtype)
        drop = nn.Dropout(rate=cfg.dropout_rate)
        det = self.deterministic
        step = dict(decode=self.decode, decode_position=decode_position)

        h = norm(name="pre_self_attention_layer_norm")(x)
        h = MultiHeadAttention(cfg, deterministic=det, name="self_attention")(
            h, h, self_bias, adapters=adapters.get("self_attention"), **step
        )
        x = x + drop(h, deterministic=det)

        h = norm(name="pre_cross_attention_layer_norm")(x)
        h = MultiHeadAttention(
            cfg, is_cross_attention=True, deterministic=det, name="encoder_decoder_attention"
        )(h, encoded, cross_bias, adapters=adapters.get("encoder_decoder_attention"), **step)
        x = x + drop(h, deterministic=det)

        h = norm(name="pre_mlp_layer_norm")(x)
        h = MlpBlock(cfg, deterministic=det, name="mlp")(h, adapters.get("mlp"))
        x = x + drop(h, deterministic=det)
        # (carry, per-layer output): the signature nn.scan needs; the loop form ignores it.
        return constrain(x, ("batch", "length", "embed")), None
