"""T5 encoder-decoder (v1.0, v1.1, LM-adapt, Flan-T5, T0) as pure functions over parameters.

The Linen modules below define the network; callers use the functions at the bottom:

* ``init_params(config, rng)``: a fresh parameter pytree (plain arrays).
* ``param_logical_axes(config)``: the same tree holding a logical ``PartitionSpec`` per leaf.
* ``forward(config, params, encoder_input_tokens, decoder_input_tokens, ...)``: float32 logits.
* ``encode`` / ``decode``: the two halves of ``forward``.
* ``greedy_decode(config, params, encoder_input_tokens, max_decode_len=...)``: jit-compiled
  greedy search with a key/value cache.

Token id 0 is padding. Encoder keys that are padding are masked everywhere. Decoder inputs are
right-padded and start with ``decoder_start_token_id`` (also 0), so in ``forward`` a 0 at any
position after the first is padding and is masked as a key; incremental decoding attends to
every token it generated.

Parameter tree (``scan_layers=False``; with scanning, ``layers_{i}`` become one ``layers`` node
whose leaves have a leading ``layers`` axis)::

  token_embedder/embedding                           [vocab, embed]
  encoder/relpos_bias/rel_embedding                  [relpos_buckets, heads]
  encoder/layers_{i}/pre_attention_layer_norm/scale  [embed]
  encoder/layers_{i}/attention/{query,key,value}/kernel  [embed, joined_kv]
  encoder/layers_{i}/attention/out/kernel            [joined_kv, embed]
  encoder/layers_{i}/pre_mlp_layer_norm/scale        [embed]
  encoder/layers_{i}/mlp/{wi | wi_0, wi_1}/kernel    [embed, mlp]
  encoder/layers_{i}/mlp/wo/kernel                   [mlp, embed]
  encoder/final_layer_norm/scale                     [embed]
  decoder/...   self_attention, encoder_decoder_attention and three layer norms per layer
  decoder/logits_dense/kernel                        [embed, vocab]   (untied heads only)
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tagi_jax.models import layers
from tagi_jax.models.t5_config import T5Config

Params = Any

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _run_layers(layer_cls, config: T5Config, num_layers: int, x, args, **module_kwargs):
    """Applies ``num_layers`` blocks, as a Python loop or as one ``nn.scan``.

    ``args`` are the per-call inputs every block sees unchanged (masks, biases, encoder states).
    """
    if config.remat_policy != "none":
        # Under scan, XLA cannot CSE the recomputation away, so prevent_cse is not needed there.
        layer_cls = nn.remat(
            layer_cls,
            policy=_REMAT_POLICIES[config.remat_policy],
            prevent_cse=not config.scan_layers,
        )
    if config.scan_layers:
        scanned = nn.scan(
            layer_cls,
            variable_axes={"params": 0, "cache": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * len(args),
            length=num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = scanned(config, name="layers", **module_kwargs)(x, *args)
        return x
    for i in range(num_layers):
        x, _ = layer_cls(config, name=f"layers_{i}", **module_kwargs)(x, *args)
    return x


def _relative_position_biases(config: T5Config, *, bidirectional: bool):
    """The stack's shared relative-position bias (encoder: both directions; decoder: causal)."""
    return layers.RelativePositionBiases(
        config.relative_attention_num_buckets,
        config.relative_attention_max_distance,
        config.num_heads,
        bidirectional=bidirectional,
        param_dtype=layers.dtype_of(config.param_dtype),
        name="relpos_bias",
    )


class Encoder(nn.Module):
    config: T5Config
    embedder: layers.Embed
    deterministic: bool = True

    @nn.compact
    def __call__(self, tokens):
        cfg = self.config
        length = tokens.shape[1]
        x = self.embedder(tokens)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=self.deterministic)
        relpos = _relative_position_biases(cfg, bidirectional=True)(
            jnp.arange(length), length, length
        )
        bias = relpos + layers.padding_bias(tokens)
        x = _run_layers(
            layers.EncoderLayer,
            cfg,
            cfg.num_layers,
            x,
            (bias,),
            deterministic=self.deterministic,
        )
        x = layers.RMSNorm(
            cfg.layer_norm_epsilon,
            layers.dtype_of(cfg.dtype),
            layers.dtype_of(cfg.param_dtype),
            name="final_layer_norm",
        )(x)
        return nn.Dropout(cfg.dropout_rate)(x, deterministic=self.deterministic)


class Decoder(nn.Module):
    """The decoder stack and the output head.

    With ``decode=True`` and no ``decode_position`` the call only creates the cache (its
    decoder tokens fix the maximum length); with a ``decode_position`` it runs one step.
    """

    config: T5Config
    embedder: layers.Embed
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, encoded, encoder_tokens, decoder_tokens, decode_position=None):
        cfg = self.config
        dtype, pdtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
        x = self.embedder(decoder_tokens)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=self.deterministic)
        relpos_module = _relative_position_biases(cfg, bidirectional=False)
        if self.decode and decode_position is not None:
            # One query at a traced position over the whole cache; future slots are masked.
            max_length = self._cache_length()
            position = jnp.asarray(decode_position, jnp.int32)
            relpos = relpos_module(position[None], max_length, max_length)
            future = jnp.arange(max_length) > position
            self_bias = relpos + jnp.where(future, layers.MASK_VALUE, 0.0)[None, None, None, :]
        else:
            length = decoder_tokens.shape[1]
            relpos = relpos_module(jnp.arange(length), length, length)
            # Position 0 holds the start token, which shares id 0 with padding.
            is_key = (decoder_tokens > 0) | (jnp.arange(length) == 0)[None, :]
            self_bias = relpos + layers.causal_bias(length) + layers.padding_bias(is_key)
        cross_bias = layers.padding_bias(encoder_tokens)
        x = _run_layers(
            layers.DecoderLayer,
            cfg,
            cfg.num_decoder_layers,
            x,
            (encoded, self_bias, cross_bias, decode_position),
            deterministic=self.deterministic,
            decode=self.decode,
        )
        x = layers.RMSNorm(cfg.layer_norm_epsilon, dtype, pdtype, name="final_layer_norm")(x)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=self.deterministic)
        if cfg.scale_decoder_outputs:
            # T5 v1.0 rescales before its tied head (as Mesh TensorFlow does).
            x = x * (cfg.d_model**-0.5)
        if cfg.tie_word_embeddings:
            logits = self.embedder.attend(x)
        else:
            logits = layers.Dense(
                cfg.vocab_size,
                ("embed", "vocab"),
                dtype=dtype,
                param_dtype=pdtype,
                kernel_init=nn.initializers.normal(stddev=cfg.d_model**-0.5),
                name="logits_dense",
            )(x)
        logits = layers.constrain(logits, ("batch", "length", "vocab"))
        return logits.astype(jnp.float32)

    def _cache_length(self) -> int:
        """Length of the self-attention cache, read from the first block's cache variable."""
        cache = self.variables.get("cache")
        if not cache:
            raise ValueError("decode step called without a cache; run init_decode_cache first")
        if self.config.scan_layers:
            return cache["layers"]["self_attention"]["cached_key"].shape[2]
        return cache["layers_0"]["self_attention"]["cached_key"].shape[1]


class T5(nn.Module):
    """Encoder-decoder T5. ``deterministic``/``decode`` are per-call flags, not parameters."""

    config: T5Config
    deterministic: bool = True
    decode: bool = False

    def setup(self):
        cfg = self.config
        self.token_embedder = layers.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=layers.dtype_of(cfg.dtype),
            param_dtype=layers.dtype_of(cfg.param_dtype),
        )
        self.encoder = Encoder(cfg, self.token_embedder, deterministic=self.deterministic)
        self.decoder = Decoder(
            cfg, self.token_embedder, deterministic=self.deterministic, decode=self.decode
        )

    def encode(self, encoder_input_tokens):
        return self.encoder(encoder_input_tokens)

    def decode_tokens(self, encoded, encoder_input_tokens, decoder_input_tokens, position=None):
        return self.decoder(encoded, encoder_input_tokens, decoder_input_tokens, position)

    def __call__(self, encoder_input_tokens, decoder_input_tokens):
        encoded = self.encode(encoder_input_tokens)
        return self.decode_tokens(encoded, encoder_input_tokens, decoder_input_tokens)


# --- pure functions -----------------------------------------------------------------------


def _check_adapters(adapters) -> None:
    if adapters is not None:
        raise NotImplementedError(
            "adapters are not supported by the plain T5 backbone yet; pass adapters=None"
        )


def _check_tokens(name: str, tokens) -> None:
    if getattr(tokens, "ndim", None) != 2:
        raise ValueError(f"{name} must be [batch, length] token ids, got shape {jnp.shape(tokens)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")


def _variables(params):
    return {"params": params}


def _init_boxed(config: T5Config, rng, encoder_length: int = 4, decoder_length: int = 4):
    enc = jnp.ones((1, encoder_length), jnp.int32)
    dec = jnp.ones((1, decoder_length), jnp.int32)
    return T5(config).init(rng, enc, dec)["params"]


def init_params(config: T5Config, rng) -> Params:
    """Random parameters with T5's (Mesh TensorFlow) initialisation, as plain arrays."""
    return nn.meta.unbox(_init_boxed(config, rng))


def abstract_params(config: T5Config) -> Params:
    """``jax.ShapeDtypeStruct`` per parameter, without allocating anything."""
    return nn.meta.unbox(jax.eval_shape(functools.partial(_init_boxed, config), jax.random.key(0)))


def param_logical_axes(config: T5Config) -> Params:
    """A ``PartitionSpec`` of logical axis names for every parameter."""
    boxed = jax.eval_shape(functools.partial(_init_boxed, config), jax.random.key(0))
    return nn.get_partition_spec(boxed)


def encode(
    config: T5Config, params: Params, encoder_input_tokens, *, adapters=None, dropout_rng=None
):
    """Encoder states ``[batch, length, embed]`` in the compute dtype."""
    _check_adapters(adapters)
    _check_tokens("encoder_input_tokens", encoder_input_tokens)
    model = T5(config, deterministic=dropout_rng is None)
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    return model.apply(_variables(params), encoder_input_tokens, method=T5.encode, rngs=rngs)


def decode(
    config: T5Config,
    params: Params,
    encoded,
    encoder_input_tokens,
    decoder_input_tokens,
    *,
    adapters=None,
    dropout_rng=None,
):
    """Teacher-forced decoder logits (float32 ``[batch, target_len, vocab]``)."""
    _check_adapters(adapters)
    _check_tokens("decoder_input_tokens", decoder_input_tokens)
    model = T5(config, deterministic=dropout_rng is None)
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    return model.apply(
        _variables(params),
        encoded,
        encoder_input_tokens,
        decoder_input_tokens,
        method=T5.decode_tokens,
        rngs=rngs,
    )


def forward(
    config: T5Config,
    params: Params,
    encoder_input_tokens,
    decoder_input_tokens,
    *,
    adapters=None,
    dropout_rng=None,
):
    """Logits (float32 ``[batch, target_len, vocab]``) of teacher-forced T5.

    Dropout runs only when ``dropout_rng`` is given. ``adapters`` is reserved for generated
    LoRA weights and must be None for the plain backbone.
    """
    _check_adapters(adapters)
    _check_tokens("encoder_input_tokens", encoder_input_tokens)
    _check_tokens("decoder_input_tokens", decoder_input_tokens)
    if encoder_input_tokens.shape[0] != decoder_input_tokens.shape[0]:
        raise ValueError(
            "encoder_input_tokens and decoder_input_tokens disagree on batch size: "
            f"{encoder_input_tokens.shape[0]} vs {decoder_input_tokens.shape[0]}"
        )
    model = T5(config, deterministic=dropout_rng is None)
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    return model.apply(_variables(params), encoder_input_tokens, decoder_input_tokens, rngs=rngs)


# --- incremental decoding -----------------------------------------------------------------


def init_decode_cache(
    config: T5Config, params: Params, encoded, encoder_input_tokens, max_decode_len: int
):
    """The key/value cache for ``max_decode_len`` steps, with the cross-attention keys and
    values of ``encoded`` already projected."""
    batch = encoder_input_tokens.shape[0]
    dummy = jnp.zeros((batch, max_decode_len), jnp.int32)
    model = T5(config, decode=True)
    _, variables = model.apply(
        _variables(params),
        encoded,
        encoder_input_tokens,
        dummy,
        method=T5.decode_tokens,
        mutable=["cache"],
    )
    return variables["cache"]


def decode_step(
    config: T5Config, params: Params, cache, encoded, encoder_input_tokens, tokens, position
):
    """Logits ``[batch, vocab]`` for ``tokens`` ``[batch, 1]`` at ``position``, and the new cache."""
    model = T5(config, decode=True)
    logits, variables = model.apply(
        {"params": params, "cache": cache},
        encoded,
        encoder_input_tokens,
        tokens,
        position,
        method=T5.decode_tokens,
        mutable=["cache"],
    )
    return logits[:, 0], variables["cache"]


@functools.partial(jax.jit, static_argnames=("config", "max_decode_len", "axis_rules"))
def _greedy_decode_jit(config, params, encoder_input_tokens, *, max_decode_len, axis_rules):
    # The logical axis rules are a static argument so that a trace made under one mesh's rules
    # is never reused under another's (Flax keeps them in Python state jit cannot see).
    with nn.logical_axis_rules(axis_rules):
        encoded = encode(config, params, encoder_input_tokens)
        cache = init_decode_cache(config, params, encoded, encoder_input_tokens, max_decode_len)
        batch = encoder_input_tokens.shape[0]
        out = jnp.zeros((batch, max_decode_len), jnp.int32)
        start = jnp.full((batch, 1), config.decoder_start_token_id, jnp.int32)
        finished = jnp.zeros((batch,), bool)

        def cond(state):
            i, _, _, _, finished = state
            return (i < max_decode_len) & ~jnp.all(finished)

        def body(state):
            i, token, cache, out, finished = state
            logits, cache = decode_step(
                config, params, cache, encoded, encoder_input_tokens, token, i
            )
            next_token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            # Rows that already emitted EOS keep emitting padding, as Hugging Face does.
            next_token = jnp.where(finished, config.pad_token_id, next_token)
            out = out.at[:, i].set(next_token)
            finished = finished | (next_token == config.eos_token_id)
            return i + 1, next_token[:, None], cache, out, finished

        state = (jnp.int32(0), start, cache, out, finished)
        return jax.lax.while_loop(cond, body, state)[3]


def greedy_decode(
    config: T5Config, params: Params, encoder_input_tokens, *, max_decode_len: int, adapters=None
):
    """Greedy decoding, ``[batch, max_decode_len]`` int32 tokens without the start token.

    Stops early once every row has produced EOS; positions after a row's EOS hold padding.
    """
    _check_adapters(adapters)
    _check_tokens("encoder_input_tokens", encoder_input_tokens)
    if not isinstance(max_decode_len, int) or max_decode_len <= 0:
        raise ValueError(f"max_decode_len must be a positive int, got {max_decode_len!r}")
    rules = tuple(tuple(r) if isinstance(r, list) else r for r in nn.get_logical_axis_rules())
    return _greedy_decode_jit(
        config,
        params,
        jnp.asarray(encoder_input_tokens, jnp.int32),
        max_decode_len=max_decode_len,
        axis_rules=rules,
    )
