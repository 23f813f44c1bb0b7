"""The TAGI student as pure functions: instruction → adapters → adapted, fused T5.

Parameters are one pytree::

  {"t5": <backbone>, "hypernet": <pooler + generators>,
   "instruction_encoder": <token_embedder + encoder>   # only for a 'separate' encoder}

A batch is a mapping with ``encoder_input_tokens`` (the student's input), ``hyper_input_tokens``
(the instruction) and ``decoder_input_tokens``; token id 0 is padding everywhere.

``forward`` encodes the instruction, generates one set of adapters per row (unless given),
encodes the input with the adapters (and, if enabled, the paper's per-block instruction
cross-attention), and decodes against ``[instruction states ; input states]`` when fusion is
on. Adapters generated once per task and expanded with ``lora.take`` give the same logits.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tagi_jax.models import hypernet, lora, t5
from tagi_jax.models.tagi_config import TagiConfig

Params = Any
BATCH_KEYS = ("encoder_input_tokens", "hyper_input_tokens", "decoder_input_tokens")


def _instruction_encoder_config(config: TagiConfig):
    # The instruction is encoded without adapters and without instruction cross-attention.
    return config.instruction_t5.replace(instruction_cross_attention=False)


def _encoder_subtree(params: Params) -> Params:
    """What encoding needs of a full T5 parameter tree (drops the decoder)."""
    return {"token_embedder": params["token_embedder"], "encoder": params["encoder"]}


def _hypernet_init_inputs(config: TagiConfig):
    width = config.instruction_width
    states = jnp.zeros((1, 4, width), jnp.float32)
    return states, jnp.ones((1, 4), jnp.int32), states


def _init_boxed(config: TagiConfig, rng):
    k_t5, k_enc, k_hyper = jax.random.split(rng, 3)
    params = {
        "t5": t5._init_boxed(config.t5, k_t5),
        "hypernet": hypernet.Hypernetwork(config).init(k_hyper, *_hypernet_init_inputs(config))[
            "params"
        ],
    }
    if config.hyper.instruction_encoder == "separate":
        encoder = t5._init_boxed(_instruction_encoder_config(config), k_enc)
        params["instruction_encoder"] = _encoder_subtree(encoder)
    return params


def _graft(name: str, fresh: Params, given: Params) -> Params:
    """``fresh`` with every leaf that ``given`` has replaced by it (shapes must agree).

    Leaves only in ``fresh`` are new TAGI parameters (e.g. instruction cross-attention);
    leaves only in ``given`` mean it belongs to another architecture.
    """
    fresh_flat = {
        jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(fresh)[0]
    }
    given_flat = {
        jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(given)[0]
    }
    unknown = sorted(set(given_flat) - set(fresh_flat))
    if unknown:
        raise ValueError(f"{name} has parameters the config does not: {unknown[:5]}")
    for key, value in given_flat.items():
        if tuple(value.shape) != tuple(fresh_flat[key].shape):
            raise ValueError(
                f"{name}{key} has shape {tuple(value.shape)}, the config needs "
                f"{tuple(fresh_flat[key].shape)}"
            )
    leaves = [
        given_flat.get(jax.tree_util.keystr(k), v)
        for k, v in jax.tree_util.tree_flatten_with_path(fresh)[0]
    ]
    return jax.tree.unflatten(jax.tree.structure(fresh), leaves)


def init_params(
    config: TagiConfig,
    rng,
    *,
    t5_params: Params | None = None,
    instruction_encoder_params: Params | None = None,
) -> Params:
    """Fresh TAGI parameters; ``t5_params`` (e.g. from ``hf_t5.load``) become the backbone and
    ``instruction_encoder_params`` (a T5 tree; its decoder is dropped) the separate encoder."""
    params = nn.meta.unbox(_init_boxed(config, rng))
    if t5_params is not None:
        params["t5"] = _graft("t5_params", params["t5"], t5_params)
    if instruction_encoder_params is not None:
        if "instruction_encoder" not in params:
            raise ValueError(
                "instruction_encoder_params given, but the instruction encoder is the backbone"
            )
        params["instruction_encoder"] = _graft(
            "instruction_encoder_params",
            params["instruction_encoder"],
            _encoder_subtree(instruction_encoder_params),
        )
    return params


def abstract_params(config: TagiConfig) -> Params:
    return nn.meta.unbox(jax.eval_shape(functools.partial(_init_boxed, config), jax.random.key(0)))


def param_logical_axes(config: TagiConfig) -> Params:
    boxed = jax.eval_shape(functools.partial(_init_boxed, config), jax.random.key(0))
    return nn.get_partition_spec(boxed)


# --- the forward computation --------------------------------------------------------------


def encode_instruction(config: TagiConfig, params: Params, instruction_tokens, *, dropout_rng=None):
    """Instruction states ``[batch, length, width]`` and the first block's (for the authors'
    pooling; else None). A frozen encoder (``train_instruction_encoder=False``) runs without
    dropout and under ``stop_gradient``, as the authors encode instructions (under ``no_grad``
    in eval mode); ``dropout_rng`` only reaches an encoder that trains."""
    enc_config = _instruction_encoder_config(config)
    if not config.hyper.train_instruction_encoder:
        dropout_rng = None
    if config.hyper.instruction_encoder == "separate":
        enc_params = params["instruction_encoder"]
    else:
        enc_params = params["t5"]
    first_block = config.hyper.pooling == "first_last_sum_unmasked"
    out = t5.encode(
        enc_config,
        enc_params,
        instruction_tokens,
        dropout_rng=dropout_rng,
        return_first_block=first_block,
    )
    states, first = out if first_block else (out, None)
    if not config.hyper.train_instruction_encoder:
        states = jax.lax.stop_gradient(states)
        first = None if first is None else jax.lax.stop_gradient(first)
    return states, first


def adapters_from_states(
    config: TagiConfig, params: Params, states, instruction_tokens, first_block=None
):
    """Runs the hypernetwork on encoded instructions: ``(LoraAdapters | None, embedding)``."""
    adapters, embedding = hypernet.Hypernetwork(config).apply(
        {"params": params["hypernet"]}, states, instruction_tokens, first_block
    )
    return (adapters if adapters else None), embedding


def generate_adapters(
    config: TagiConfig, params: Params, instruction_tokens
) -> lora.LoraAdapters | None:
    """One set of adapters per instruction row (None when no targets are configured)."""
    t5._check_tokens("instruction_tokens", instruction_tokens)
    states, first = encode_instruction(config, params, instruction_tokens)
    return adapters_from_states(config, params, states, instruction_tokens, first)[0]


@functools.partial(jax.jit, static_argnames=("config",))
def encode_task(config: TagiConfig, params: Params, instruction_tokens):
    """What inference caches once per task: ``(instruction states | None, adapters | None)``
    for ``instruction_tokens`` ``[1, length]``. The states are None when the student never
    reads the instruction (no fusion, no instruction cross-attention), the adapters when no
    targets are configured."""
    reads_states = config.fusion or config.t5.instruction_cross_attention
    if not (config.hyper.targets or reads_states):
        return None, None
    states, first = encode_instruction(config, params, instruction_tokens)
    adapters = None
    if config.hyper.targets:
        adapters = adapters_from_states(config, params, states, instruction_tokens, first)[0]
    return (states if reads_states else None), adapters


def _check_batch(batch: Mapping) -> tuple[jax.Array, jax.Array, jax.Array]:
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing}; a TAGI batch needs {list(BATCH_KEYS)}")
    tokens = [batch[k] for k in BATCH_KEYS]
    for key, value in zip(BATCH_KEYS, tokens, strict=True):
        t5._check_tokens(key, value)
    sizes = {key: value.shape[0] for key, value in zip(BATCH_KEYS, tokens, strict=True)}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch fields disagree on batch size: {sizes}")
    return tuple(tokens)


def _memory(config: TagiConfig, encoded, input_tokens, states, instruction_tokens):
    """The decoder's memory: ``[instruction ; input]`` with fusion, else the input alone.

    T5 cross-attention has no position bias, so padded concatenation with the concatenated
    mask equals the authors' unpad-concat-repad. The fused memory stays a tuple of its two
    parts (``t5.decode`` joins their keys and values), so that a frozen instruction's part
    costs no backward pass.
    """
    if not config.fusion:
        return encoded, input_tokens
    memory = (states.astype(encoded.dtype), encoded)
    return memory, jnp.concatenate([instruction_tokens, input_tokens], axis=1)


def _needs_instruction(config: TagiConfig, adapters) -> bool:
    generating = adapters is None and bool(config.hyper.targets)
    return generating or config.fusion or config.t5.instruction_cross_attention


def _encode_student(
    config: TagiConfig, params: Params, enc_tokens, hyper_tokens, adapters, rngs, states=None
):
    """Everything before the decoder: ``(memory, memory_tokens, adapters, embedding)``.

    ``states``: the instruction already encoded (``encode_instruction``), e.g. once per task at
    inference; then it is not encoded again. One row of states for a batch of rows is one
    task's, shared by every row, whose adapters must then be that task's too."""
    first = embedding = None
    if states is None and _needs_instruction(config, adapters):
        states, first = encode_instruction(config, params, hyper_tokens, dropout_rng=rngs[0])
    if adapters is None and config.hyper.targets:
        adapters, embedding = adapters_from_states(config, params, states, hyper_tokens, first)
    rows = enc_tokens.shape[0]
    encoded = t5.encode(
        config.t5,
        params["t5"],
        enc_tokens,
        adapters=adapters,
        dropout_rng=rngs[1],
        instruction_states=(
            states
            if states is None or states.shape[0] == rows
            else jnp.broadcast_to(states, (rows, *states.shape[1:]))
        ),
        instruction_tokens=hyper_tokens,
    )
    # One task's states ([1, ...]) stay one row in the fused memory: the decoder's
    # cross-attention projects them once for the batch (layers.MultiHeadAttention).
    memory, memory_tokens = _memory(config, encoded, enc_tokens, states, hyper_tokens)
    return memory, memory_tokens, adapters, embedding


def forward(
    config: TagiConfig,
    params: Params,
    batch: Mapping,
    *,
    adapters: lora.LoraAdapters | None = None,
    instruction_states=None,
    dropout_rng=None,
):
    """``(logits, aux)``: float32 logits ``[batch, target_len, vocab]`` and
    ``aux = {"adapters": LoraAdapters | None, "instruction_embedding": [batch, ...] | None}``.

    ``adapters`` given (one row per example) are used instead of generating them;
    ``instruction_states`` given (``[batch, length, width]``, ``encode_instruction``'s output for
    ``hyper_input_tokens``) are not computed again: e.g. one prompt's, shared by its answer
    choices when ranking them.
    """
    enc_tokens, hyper_tokens, dec_tokens = _check_batch(batch)
    rngs = [None] * 3 if dropout_rng is None else list(jax.random.split(dropout_rng, 3))
    memory, memory_tokens, adapters, embedding = _encode_student(
        config, params, enc_tokens, hyper_tokens, adapters, rngs, instruction_states
    )
    logits = t5.decode(
        config.t5,
        params["t5"],
        memory,
        memory_tokens,
        dec_tokens,
        adapters=adapters,
        dropout_rng=rngs[2],
    )
    return logits, {"adapters": adapters, "instruction_embedding": embedding}


@functools.partial(jax.jit, static_argnames=("config", "max_decode_len", "axis_rules"))
def _greedy_decode_jit(
    config, params, enc_tokens, hyper_tokens, adapters, states, *, max_decode_len, axis_rules
):
    with nn.logical_axis_rules(axis_rules):
        rows = enc_tokens.shape[0]
        one_task = adapters is not None and adapters.batch_size == 1
        if one_task:
            adapters = lora.take(adapters, jnp.zeros(rows, jnp.int32))
        if states is not None and not one_task:
            states = jnp.broadcast_to(states, (rows, *states.shape[1:]))
        # else one task's states stay one row in the fused memory, so the decoder's
        # cross-attention projects them once for the batch, not once per row
        # (layers.MultiHeadAttention), with the task's adapters.
        memory, memory_tokens, adapters, _ = _encode_student(
            config, params, enc_tokens, hyper_tokens, adapters, [None] * 3, states
        )
        return t5.greedy_loop(
            config.t5,
            params["t5"],
            memory,
            memory_tokens,
            max_decode_len=max_decode_len,
            adapters=adapters,
        )


def greedy_decode(
    config: TagiConfig,
    params: Params,
    batch: Mapping,
    *,
    max_decode_len: int,
    adapters: lora.LoraAdapters | None = None,
    instruction_states=None,
):
    """Greedy decoding of the TAGI student (adapters generated once, reused at every step).

    ``batch`` needs ``encoder_input_tokens`` and ``hyper_input_tokens``. ``adapters`` and
    ``instruction_states`` (``[1, length, width]``, from ``encode_task``) given: the
    instruction is neither encoded nor turned into adapters again. Adapters of one row with
    such states are one task's for every row (the fastest form: the task's part of the fused
    memory is projected once); adapters of one row per example are used as they are.
    """
    t5.check_max_decode_len(max_decode_len)
    enc_tokens, hyper_tokens = batch["encoder_input_tokens"], batch["hyper_input_tokens"]
    _check_batch({**batch, "decoder_input_tokens": jnp.zeros_like(enc_tokens[:, :1])})
    return _greedy_decode_jit(
        config,
        params,
        jnp.asarray(enc_tokens, jnp.int32),
        jnp.asarray(hyper_tokens, jnp.int32),
        adapters,
        instruction_states,
        max_decode_len=max_decode_len,
        axis_rules=t5.current_axis_rules(),
    )
