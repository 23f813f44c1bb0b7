"""T5 encoder-decoder (v1.0, v1.1, LM-adapt, Flan-T5, T0) as pure functions over parameters.

The Linen modules below define the network; callers use the functions at the bottom:

* ``init_params(config, rng)``: a fresh parameter pytree (plain arrays).
* ``param_logical_axes(config)``: the same tree holding a logical ``PartitionSpec`` per leaf.
* ``forward(config, params, encoder_input_tokens, decoder_input_tokens, ...)``: float32 logits,
  ``config.logits_width`` wide (``vocab_size``, or ``logits_vocab_size`` when that is set: the
  logits are cut to the tokenizer's ids after the matmul and the rest is never predicted).
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

from tagi_jax.models import layers, lora
from tagi_jax.models.t5_config import T5Config

Params = Any

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _run_layers(
    layer_cls, config: T5Config, num_layers: int, x, shared, per_layer, **module_kwargs
):
    """Applies ``num_layers`` blocks, as a Python loop or as one ``nn.scan``.

    ``shared`` are inputs every block sees unchanged (masks, biases, encoder states);
    ``per_layer`` are pytrees with a leading layers axis (adapters), sliced per block. Returns
    the output and the stacked per-block outputs (None unless the block emits them).
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
            in_axes=(nn.broadcast,) * len(shared) + (0,) * len(per_layer),
            length=num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        return scanned(config, name="layers", **module_kwargs)(x, *shared, *per_layer)
    outputs = []
    for i in range(num_layers):
        sliced = jax.tree.map(lambda leaf, i=i: leaf[i], per_layer)
        x, out = layer_cls(config, name=f"layers_{i}", **module_kwargs)(x, *shared, *sliced)
        outputs.append(out)
    stacked = None if outputs[0] is None else jnp.stack(outputs)
    return x, stacked


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
    return_first_block: bool = False

    @nn.compact
    def __call__(self, tokens, adapters=None, instruction=None, instruction_tokens=None):
        cfg = self.config
        length = tokens.shape[1]
        x = self.embedder(tokens)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=self.deterministic)
        relpos = _relative_position_biases(cfg, bidirectional=True)(
            jnp.arange(length), length, length
        )
        bias = relpos + layers.padding_bias(tokens)
        if cfg.instruction_cross_attention:
            if instruction is None or instruction_tokens is None:
                raise ValueError(
                    "instruction_cross_attention needs the instruction states and tokens "
                    "(use tagi_jax.models.tagi.forward)"
                )
            instruction_bias = layers.padding_bias(instruction_tokens)
        else:
            instruction, instruction_bias = None, None
        x, per_block = _run_layers(
            layers.EncoderLayer,
            cfg,
            cfg.num_layers,
            x,
            (bias, instruction, instruction_bias),
            (lora.stack_inputs(adapters, "encoder"),),
            deterministic=self.deterministic,
            emit_output=self.return_first_block,
        )
        x = layers.RMSNorm(
            cfg.layer_norm_epsilon,
            layers.dtype_of(cfg.dtype),
            layers.dtype_of(cfg.param_dtype),
            name="final_layer_norm",
        )(x)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=self.deterministic)
        if self.return_first_block:
            return x, per_block[0]
        return x


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
    def __call__(
        self, encoded, encoder_tokens, decoder_tokens, decode_position=None, adapters=None
    ):
        """``encoder_tokens`` only mark which ``encoded`` positions are padding (id 0)."""
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
        x, _ = _run_layers(
            layers.DecoderLayer,
            cfg,
            cfg.num_decoder_layers,
            x,
            (encoded, self_bias, cross_bias, decode_position),
            (lora.stack_inputs(adapters, "decoder"),),
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
        if cfg.logits_width != cfg.vocab_size:
            # logits_vocab_size: the ids past the tokenizer's are cut off after the matmul, so
            # they are never predicted. Slicing the output, not the head's kernel: the slice
            # fuses into whatever reads the logits (softmax, loss), where a sliced kernel is a
            # fresh copy on every call (every decoding step) that the matmul cannot read in place.
            logits = logits[..., : cfg.logits_width]
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
    return_first_block: bool = False

    def setup(self):
        cfg = self.config
        self.token_embedder = layers.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=layers.dtype_of(cfg.dtype),
            param_dtype=layers.dtype_of(cfg.param_dtype),
        )
        self.encoder = Encoder(
            cfg,
            self.token_embedder,
            deterministic=self.deterministic,
            return_first_block=self.return_first_block,
        )
        self.decoder = Decoder(
            cfg, self.token_embedder, deterministic=self.deterministic, decode=self.decode
        )

    def encode(self, tokens, adapters=None, instruction=None, instruction_tokens=None):
        return self.encoder(tokens, adapters, instruction, instruction_tokens)

    def decode_tokens(self, encoded, memory_tokens, decoder_tokens, position=None, adapters=None):
        return self.decoder(encoded, memory_tokens, decoder_tokens, position, adapters)

    def __call__(
        self, encoder_input_tokens, decoder_input_tokens, instruction=None, instruction_tokens=None
    ):
        encoded = self.encode(encoder_input_tokens, None, instruction, instruction_tokens)
        return self.decode_tokens(encoded, encoder_input_tokens, decoder_input_tokens)


# --- pure functions -----------------------------------------------------------------------


def _check_tokens(name: str, tokens) -> None:
    if getattr(tokens, "ndim", None) != 2:
        raise ValueError(f"{name} must be [batch, length] token ids, got shape {jnp.shape(tokens)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")


def _check_adapters(config: T5Config, adapters, batch_size: int) -> None:
    if adapters is None:
        return
    if not isinstance(adapters, lora.LoraAdapters):
        raise TypeError(f"adapters must be a LoraAdapters, got {type(adapters).__name__}")
    adapters.check(config, batch_size)


def _rngs(dropout_rng):
    return {"dropout": dropout_rng} if dropout_rng is not None else None


def _init_boxed(config: T5Config, rng, encoder_length: int = 4, decoder_length: int = 4):
    enc = jnp.ones((1, encoder_length), jnp.int32)
    dec = jnp.ones((1, decoder_length), jnp.int32)
    instruction = instruction_tokens = None
    if config.instruction_cross_attention:
        instruction = jnp.zeros((1, encoder_length, config.d_model), layers.dtype_of(config.dtype))
        instruction_tokens = enc
    return T5(config).init(rng, enc, dec, instruction, instruction_tokens)["params"]


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
    config: T5Config,
    params: Params,
    encoder_input_tokens,
    *,
    adapters=None,
    dropout_rng=None,
    instruction_states=None,
    instruction_tokens=None,
    return_first_block: bool = False,
):
    """Encoder states ``[batch, length, embed]`` in the compute dtype.

    With ``return_first_block`` also the output of the first block (before the final norm).
    ``instruction_states``/``instruction_tokens`` feed the paper's per-block instruction
    cross-attention when the config enables it.
    """
    _check_tokens("encoder_input_tokens", encoder_input_tokens)
    _check_adapters(config, adapters, encoder_input_tokens.shape[0])
    model = T5(config, deterministic=dropout_rng is None, return_first_block=return_first_block)
    return model.apply(
        {"params": params},
        encoder_input_tokens,
        adapters,
        instruction_states,
        instruction_tokens,
        method=T5.encode,
        rngs=_rngs(dropout_rng),
    )


def decode(
    config: T5Config,
    params: Params,
    encoded,
    memory_tokens,
    decoder_input_tokens,
    *,
    adapters=None,
    dropout_rng=None,
):
    """Teacher-forced decoder logits (float32 ``[batch, target_len, config.logits_width]``).

    ``memory_tokens`` are the token ids behind ``encoded`` (only their padding is used), so a
    fused memory such as ``[instruction ; input]`` passes its concatenated ids. ``encoded`` may
    be a tuple of ``[batch, length_i, embed]`` parts, joined along the length after the key and
    value projections (equal to passing their concatenation; a part that takes no gradient
    then costs no backward matmul).
    """
    _check_tokens("decoder_input_tokens", decoder_input_tokens)
    _check_adapters(config, adapters, decoder_input_tokens.shape[0])
    model = T5(config, deterministic=dropout_rng is None)
    return model.apply(
        {"params": params},
        encoded,
        memory_tokens,
        decoder_input_tokens,
        None,
        adapters,
        method=T5.decode_tokens,
        rngs=_rngs(dropout_rng),
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
    """Logits (float32 ``[batch, target_len, config.logits_width]``) of teacher-forced T5.

    Dropout runs only when ``dropout_rng`` is given. ``adapters`` (``lora.LoraAdapters``, one
    row per example) add per-example LoRA terms to the targeted projections.
    """
    _check_tokens("encoder_input_tokens", encoder_input_tokens)
    _check_tokens("decoder_input_tokens", decoder_input_tokens)
    if encoder_input_tokens.shape[0] != decoder_input_tokens.shape[0]:
        raise ValueError(
            "encoder_input_tokens and decoder_input_tokens disagree on batch size: "
            f"{encoder_input_tokens.shape[0]} vs {decoder_input_tokens.shape[0]}"
        )
    if dropout_rng is not None:
        enc_rng, dec_rng = jax.random.split(dropout_rng)
    else:
        enc_rng = dec_rng = None
    encoded = encode(config, params, encoder_input_tokens, adapters=adapters, dropout_rng=enc_rng)
    return decode(
        config,
        params,
        encoded,
        encoder_input_tokens,
        decoder_input_tokens,
        adapters=adapters,
        dropout_rng=dec_rng,
    )


# --- incremental decoding -----------------------------------------------------------------


def init_decode_cache(
    config: T5Config, params: Params, encoded, memory_tokens, max_decode_len: int, adapters=None
):
    """The key/value cache for ``max_decode_len`` steps, with the cross-attention keys and
    values of ``encoded`` already projected (adapters included)."""
    batch = memory_tokens.shape[0]
    dummy = jnp.zeros((batch, max_decode_len), jnp.int32)
    model = T5(config, decode=True)
    _, variables = model.apply(
        {"params": params},
        encoded,
        memory_tokens,
        dummy,
        None,
        adapters,
        method=T5.decode_tokens,
        mutable=["cache"],
    )
    return variables["cache"]


def decode_step(
    config: T5Config,
    params: Params,
    cache,
    encoded,
    memory_tokens,
    tokens,
    position,
    adapters=None,
):
    """Logits ``[batch, config.logits_width]`` for ``tokens`` ``[batch, 1]`` at ``position``,
    and the new cache."""
    model = T5(config, decode=True)
    logits, variables = model.apply(
        {"params": params, "cache": cache},
        encoded,
        memory_tokens,
        tokens,
        position,
        adapters,
        method=T5.decode_tokens,
        mutable=["cache"],
    )
    return logits[:, 0], variables["cache"]


def greedy_loop(
    config: T5Config, params: Params, encoded, memory_tokens, *, max_decode_len: int, adapters=None
):
    """Greedy search over a precomputed memory (traceable; callers jit it).

    Returns ``[batch, max_decode_len]`` int32 tokens without the start token; a row that
    produced EOS emits padding afterwards, and the loop stops once every row has.
    """
    cache = init_decode_cache(config, params, encoded, memory_tokens, max_decode_len, adapters)
    batch = memory_tokens.shape[0]
    out = jnp.zeros((batch, max_decode_len), jnp.int32)
    start = jnp.full((batch, 1), config.decoder_start_token_id, jnp.int32)
    finished = jnp.zeros((batch,), bool)

    def cond(state):
        i, _, _, _, finished = state
        return (i < max_decode_len) & ~jnp.all(finished)

    def body(state):
        i, token, cache, out, finished = state
        logits, cache = decode_step(
            config, params, cache, encoded, memory_tokens, token, i, adapters
        )
        next_token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        # Rows that already emitted EOS keep emitting padding, as Hugging Face does.
        next_token = jnp.where(finished, config.pad_token_id, next_token)
        out = out.at[:, i].set(next_token)
        finished = finished | (next_token == config.eos_token_id)
        return i + 1, next_token[:, None], cache, out, finished

    state = (jnp.int32(0), start, cache, out, finished)
    return jax.lax.while_loop(cond, body, state)[3]


def current_axis_rules():
    """The active Flax logical axis rules as a hashable value, for use as a static jit argument
    (Flax keeps them in Python state that jit's cache cannot see)."""
    return tuple(tuple(r) if isinstance(r, list) else r for r in nn.get_logical_axis_rules())


@functools.partial(jax.jit, static_argnames=("config", "max_decode_len", "axis_rules"))
def _greedy_decode_jit(
    config, params, encoder_input_tokens, adapters, *, max_decode_len, axis_rules
):
    with nn.logical_axis_rules(axis_rules):
        encoded = encode(config, params, encoder_input_tokens, adapters=adapters)
        return greedy_loop(
            config,
            params,
            encoded,
            encoder_input_tokens,
            max_decode_len=max_decode_len,
            adapters=adapters,
        )


def check_max_decode_len(max_decode_len) -> None:
    if (
        not isinstance(max_decode_len, int)
        or isinstance(max_decode_len, bool)
        or max_decode_len <= 0
    ):
        raise ValueError(f"max_decode_len must be a positive int, got {max_decode_len!r}")


def greedy_decode(
    config: T5Config, params: Params, encoder_input_tokens, *, max_decode_len: int, adapters=None
):
    """Greedy decoding, ``[batch, max_decode_len]`` int32 tokens without the start token.

    jit-compiled (once per config, length and mesh rules). Stops early once every row has
    produced EOS; positions after a row's EOS hold padding.
    """
    _check_tokens("encoder_input_tokens", encoder_input_tokens)
    _check_adapters(config, adapters, encoder_input_tokens.shape[0])
    check_max_decode_len(max_decode_len)
    return _greedy_decode_jit(
        config,
        params,
        jnp.asarray(encoder_input_tokens, jnp.int32),
        adapters,
        max_decode_len=max_decode_len,
        axis_rules=current_axis_rules(),
    )
