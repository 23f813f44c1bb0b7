"""Beam search for the TAGI student, with one set of generated adapters per example.

The search follows t5x's beam search (``t5x/decoding.py``); ``beam_search``'s docstring states
the conventions exactly, and where they differ from t5x's.

How the batch is laid out: the instruction and the input are encoded once per example (batch
row). The decoder memory, its token ids, the adapters (``lora.take``) and the key/value cache
are then repeated ``beam_size`` times, so that the decoder runs on ``batch * beam_size`` rows,
example ``b``'s beams being rows ``b * beam_size ... b * beam_size + beam_size - 1``. Beams only
ever take a parent from their own example, so reordering the cache is a gather within each
example's block of rows.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from tagi_jax.models import lora, t5, tagi
from tagi_jax.models.tagi_config import TagiConfig

Params = tagi.Params

# Cross-attention keys and values are projected from one example's memory with that example's
# adapters, so all beams of an example hold the same values: reordering beams within an example
# leaves them unchanged, and gathering them at every step would only cost memory traffic.
_BEAM_INVARIANT_CACHE = ("cross_key", "cross_value")


def length_penalty(alpha: float, length):
    """t5x's (GNMT's) length penalty ``((5 + length) / 6) ** alpha``; ``length`` counts every
    generated token, the EOS included."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _check_beam_size(beam_size) -> None:
    if not isinstance(beam_size, int) or isinstance(beam_size, bool) or beam_size < 1:
        raise ValueError(f"beam_size must be a positive int, got {beam_size!r}")


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite real number, got {alpha!r}")
    return float(alpha)


def _cache_batch_axis(config: TagiConfig) -> int:
    # Scanned layers stack every cache leaf along a leading layers axis.
    return 1 if config.t5.scan_layers else 0


def _map_cache(fn, cache, batch_axis: int, *, skip_invariant: bool):
    """Applies ``fn(leaf)`` to the cache leaves that have a batch axis (a scalar leaf, such as a
    cache index, has none and is kept), optionally skipping the beam-invariant ones."""

    def visit(path, leaf):
        name = getattr(path[-1], "key", None) if path else None
        if jnp.ndim(leaf) <= batch_axis or (skip_invariant and name in _BEAM_INVARIANT_CACHE):
            return leaf
        return fn(leaf)

    return jax.tree_util.tree_map_with_path(visit, cache)


def _gather_rows(tree, rows):
    """Rows ``rows`` ``[batch, n]`` (indices along axis 1) of every ``[batch, k, ...]`` leaf."""

    def take(x):
        index = rows.reshape(rows.shape + (1,) * (x.ndim - 2))
        return jnp.take_along_axis(x, index, axis=1)

    return jax.tree.map(take, tree)


def _search(
    config: TagiConfig,
    params: Params,
    memory,
    memory_tokens,
    adapters,
    *,
    beam_size: int,
    max_decode_len: int,
    alpha: float,
):
    """The search over an encoded batch (traceable; ``beam_search`` jits it)."""
    cfg = config.t5
    batch = memory_tokens.shape[0]
    k = beam_size
    neg_inf = jnp.float32(-jnp.inf)
    batch_axis = _cache_batch_axis(config)

    # The cross-attention projections run once per example, then are repeated per beam.
    cache = t5.init_decode_cache(cfg, params["t5"], memory, memory_tokens, max_decode_len, adapters)
    cache = _map_cache(
        lambda x: jnp.repeat(x, k, axis=batch_axis), cache, batch_axis, skip_invariant=False
    )
    memory = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), memory)
    memory_tokens = jnp.repeat(memory_tokens, k, axis=0)
    if adapters is not None:
        adapters = lora.take(adapters, jnp.repeat(jnp.arange(batch), k))

    # With several beams, 2k candidates per step guarantee k non-EOS ones even when the k best
    # all end in EOS (t5x). With one beam the single best candidate is kept, EOS or not: that
    # is exactly greedy search; t5x's one-beam search would keep a runner-up alive past an EOS
    # and could return another sequence.
    num_candidates = 2 * k if k > 1 else 1
    max_penalty = length_penalty(alpha, max_decode_len)

    def cond(state):
        i, _, _, alive_logp, _, finished_scores, _ = state
        # The best an alive beam can still reach: its log-prob can only fall, and the penalty
        # is monotonic in the length, so its largest value over the remaining lengths bounds
        # the score (t5x divides by the penalty at max_decode_len, the same for alpha >= 0).
        best_penalty = jnp.maximum(length_penalty(alpha, i + 1), max_penalty)
        best_alive = jnp.max(alive_logp, axis=1) / best_penalty
        worst_finished = jnp.min(finished_scores, axis=1)  # -inf while a slot is empty
        no_alive = jnp.max(alive_logp, axis=1) == neg_inf
        done = no_alive | (worst_finished > best_alive)
        return (i < max_decode_len) & ~jnp.all(done)

    def body(state):
        i, tokens, cache, alive_logp, alive_seq, finished_scores, finished_seq = state
        logits, cache = t5.decode_step(
            cfg, params["t5"], cache, memory, memory_tokens, tokens, i, adapters
        )
        vocab = logits.shape[-1]
        log_probs = jax.nn.log_softmax(logits).reshape(batch, k, vocab)
        log_probs = log_probs + alive_logp[:, :, None]
        cand_logp, flat_index = jax.lax.top_k(
            log_probs.reshape(batch, k * vocab), min(num_candidates, k * vocab)
        )
        parent = flat_index // vocab
        token = (flat_index % vocab).astype(jnp.int32)
        cand_seq = _gather_rows(alive_seq, parent).at[:, :, i].set(token)
        is_eos = token == cfg.eos_token_id

        # Alive: the k best candidates that did not just end.
        _, keep = jax.lax.top_k(jnp.where(is_eos, neg_inf, cand_logp), k)
        alive_logp, alive_seq, alive_parent, next_token = _gather_rows(
            (jnp.where(is_eos, neg_inf, cand_logp), cand_seq, parent, token), keep
        )
        rows = (jnp.arange(batch)[:, None] * k + alive_parent).reshape(-1)
        cache = _map_cache(
            lambda x: jnp.take(x, rows, axis=batch_axis), cache, batch_axis, skip_invariant=True
        )

        # Finished: the k best of the finished so far and the candidates that just ended, the
        # summed log-prob divided by the penalty at their length (EOS included).
        new_scores = jnp.where(is_eos, cand_logp / length_penalty(alpha, i + 1), neg_inf)
        all_scores = jnp.concatenate([finished_scores, new_scores], axis=1)
        all_seq = jnp.concatenate([finished_seq, cand_seq], axis=1)
        finished_scores, best = jax.lax.top_k(all_scores, k)
        finished_seq = _gather_rows(all_seq, best)
        return (
            i + 1,
            next_token.reshape(batch * k, 1),
            cache,
            alive_logp,
            alive_seq,
            finished_scores,
            finished_seq,
        )

    # Only the first beam is live at the start, so that the first step does not pick the same
    # candidate k times.
    alive_logp = jnp.full((batch, k), neg_inf).at[:, 0].set(0.0)
    state = (
        jnp.int32(0),
        jnp.full((batch * k, 1), cfg.decoder_start_token_id, jnp.int32),
        cache,
        alive_logp,
        jnp.zeros((batch, k, max_decode_len), jnp.int32),
        jnp.full((batch, k), neg_inf),
        jnp.zeros((batch, k, max_decode_len), jnp.int32),
    )
    i, _, _, alive_logp, alive_seq, finished_scores, finished_seq = jax.lax.while_loop(
        cond, body, state
    )

    # Beams still alive at max_decode_len end there and compete with the finished ones (only
    # then: an early stop leaves alive beams that cannot beat any finished one anyway).
    truncated = jnp.where(i >= max_decode_len, alive_logp / max_penalty, neg_inf)
    scores, best = jax.lax.top_k(jnp.concatenate([finished_scores, truncated], axis=1), k)
    tokens = _gather_rows(jnp.concatenate([finished_seq, alive_seq], axis=1), best)
    # A slot no sequence filled (fewer than k sequences exist) holds padding.
    tokens = jnp.where((scores > neg_inf)[:, :, None], tokens, cfg.pad_token_id)
    return tokens, scores


@functools.partial(
    jax.jit, static_argnames=("config", "beam_size", "max_decode_len", "alpha", "axis_rules")
)
def _beam_search_jit(
    config,
    params,
    enc_tokens,
    hyper_tokens,
    adapters,
    states,
    *,
    beam_size,
    max_decode_len,
    alpha,
    axis_rules,
):
    with nn.logical_axis_rules(axis_rules):
        if states is not None:  # one task's cached instruction, shared by every row
            states = jnp.broadcast_to(states, (enc_tokens.shape[0], *states.shape[1:]))
        memory, memory_tokens, adapters, _ = tagi._encode_student(
            config, params, enc_tokens, hyper_tokens, adapters, [None] * 3, states
        )
        return _search(
            config,
            params,
            memory,
            memory_tokens,
            adapters,
            beam_size=beam_size,
            max_decode_len=max_decode_len,
            alpha=alpha,
        )


def beam_search(
    config: TagiConfig,
    params: Params,
    batch: Mapping,
    *,
    beam_size: int,
    max_decode_len: int,
    alpha: float = 0.6,
    adapters: lora.LoraAdapters | None = None,
    instruction_states=None,
):
    """Beam search of the TAGI student: ``(tokens, scores)``, best beam first.

    ``tokens`` ``[batch, beam_size, max_decode_len]`` int32 (without the start token) and
    ``scores`` ``[batch, beam_size]`` float32. Inputs as ``tagi.greedy_decode``: ``batch`` needs
    ``encoder_input_tokens`` and ``hyper_input_tokens``; ``adapters`` (one row per example) are
    used instead of generating them from the instruction; ``instruction_states`` (``[1, length,
    width]``, from ``tagi.encode_task``) are shared by every row instead of encoding the
    instruction again. jit-compiled once per config, beam size, length, alpha and mesh rules.

    Conventions (those of t5x's beam search unless said otherwise):

    * A sequence's log-prob is the sum of ``log_softmax`` of the decoder's logits (the
      ``config.t5.logits_width`` columns it returns) at each generated token, EOS included.
    * A sequence ends at its first ``config.t5.eos_token_id``; the positions after it hold
      padding (0). Its score is the log-prob divided by the length penalty
      ``((5 + length) / 6) ** alpha``, ``length`` counting the EOS.
    * Each step takes the ``2 * beam_size`` best one-token extensions of the alive beams: those
      ending in EOS compete for the ``beam_size`` finished slots, the others become the next
      alive beams (so beams finishing cannot leave too few alive ones).
    * The search stops once, for every example, no alive beam can beat the worst of
      ``beam_size`` finished sequences (its log-prob divided by the largest penalty it can still
      get: t5x's criterion), or after ``max_decode_len`` steps.
    * A beam still alive after ``max_decode_len`` steps is a sequence without EOS, scored with
      the penalty at ``max_decode_len``. Unlike t5x, which returns such beams only when nothing
      finished, they compete with the finished sequences: the result is then the best of every
      sequence the search kept, which is the best of all sequences when the beam holds them all.
    * ``beam_size=1`` keeps only the best extension at each step, EOS or not: greedy search,
      whose tokens equal ``tagi.greedy_decode``'s, for any alpha. (t5x's one-beam search keeps
      a runner-up alive past an EOS and can return another sequence.)
    * If fewer than ``beam_size`` sequences exist (a tiny vocabulary), the empty slots come last
      with score ``-inf`` and padding tokens.
    """
    _check_beam_size(beam_size)
    t5.check_max_decode_len(max_decode_len)
    alpha = _check_alpha(alpha)
    missing = [k for k in ("encoder_input_tokens", "hyper_input_tokens") if k not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing}; beam search needs encoder and hyper input tokens")
    enc_tokens, hyper_tokens = batch["encoder_input_tokens"], batch["hyper_input_tokens"]
    t5._check_tokens("encoder_input_tokens", enc_tokens)
    # The decoder input is the search's own; a dummy lets the batch check cover the rest.
    tagi._check_batch({**batch, "decoder_input_tokens": jnp.zeros_like(enc_tokens[:, :1])})
    if instruction_states is not None and (
        jnp.ndim(instruction_states) != 3 or jnp.shape(instruction_states)[0] != 1
    ):
        raise ValueError(
            "instruction_states must be one task's states [1, length, width] "
            f"(tagi.encode_task), got shape {jnp.shape(instruction_states)}"
        )
    return _beam_search_jit(
        config,
        params,
        jnp.asarray(enc_tokens, jnp.int32),
        jnp.asarray(hyper_tokens, jnp.int32),
        adapters,
        instruction_states,
        beam_size=beam_size,
        max_decode_len=max_decode_len,
        alpha=alpha,
        axis_rules=t5.current_axis_rules(),
    )
