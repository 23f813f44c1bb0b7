"""The train state (what a checkpoint holds) and the pure TAGI train step.

Parameters are split once by the trainable mask into two flat ``{path: array}`` dicts: the
``trainable`` partition lives in ``TrainState`` with its optimizer state, step and RNG key (and
is what checkpoints save); the ``frozen`` partition (the base T5, a frozen instruction encoder)
is passed to every step as a separate argument and never saved again.

``train_step`` is one pure function: merge the partitions, run ``tagi.forward`` with dropout,
``losses.tagi_loss`` against precomputed teacher logits / teacher adapters, optionally over
``grad_accum_steps`` micro-batches, and one optimizer update. A non-finite loss or gradient
leaves the state unchanged and reports ``metrics["update_skipped"] = 1``; the loop stops there
(or skips the batch by configuration) and the last good checkpoint stays intact.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from tagi_jax.distill import losses
from tagi_jax.models import lora, tagi
from tagi_jax.models.tagi_config import TagiConfig
from tagi_jax.models.trainable import flatten, path_string

Flat = dict[str, jax.Array]


def partition(params, mask) -> tuple[Flat, Flat]:
    """``(trainable, frozen)`` flat dicts keyed by ``/``-joined parameter paths."""
    trainable, frozen = {}, {}
    flags = jax.tree.leaves(mask)
    for (path, leaf), is_trainable in zip(flatten(params).items(), flags, strict=True):
        (trainable if is_trainable else frozen)[path] = leaf
    return trainable, frozen


def merge(trainable: Flat, frozen: Flat, structure):
    """The full parameter tree (``structure`` from ``jax.tree.structure(params)``)."""
    both = {**frozen, **trainable}
    paths = [
        path_string(k)
        for k, _ in jax.tree_util.tree_flatten_with_path(
            jax.tree.unflatten(structure, [0] * structure.num_leaves)
        )[0]
    ]
    return jax.tree.unflatten(structure, [both[p] for p in paths])


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Flat
    opt_state: Any
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything static about a step (hashable, a jit static argument)."""

    model: TagiConfig
    loss: losses.LossConfig
    grad_accum_steps: int = 1
    # An update that makes the parameters or optimizer state non-finite is always reported
    # (``nonfinite_update``); with this it is also undone, at the price of keeping the old
    # state alive beside the new during the update (a per-leaf select). The trainer sets it
    # for on_nonfinite="skip" only: "stop" discards the state anyway.
    rollback_nonfinite_updates: bool = False

    def __post_init__(self):
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")


def state_shardings(
    optimizer: optax.GradientTransformation, abstract_trainable: Flat, trainable_shardings, scalar
) -> TrainState:
    """The sharding of every ``TrainState`` leaf: parameter-shaped optimizer statistics (Adam's
    moments, Adafactor's unfactored ``v``) follow their parameter; the rest (counts, Adafactor's
    factored row/column statistics, which are O(rows + columns)) and the step and RNG key are
    ``scalar`` (replicated)."""
    abstract_opt = jax.eval_shape(optimizer.init, abstract_trainable)

    def follow_parameter(leaf, sharding, parameter):
        return sharding if tuple(leaf.shape) == tuple(parameter.shape) else scalar

    opt_shardings = optax.tree_map_params(
        optimizer,
        follow_parameter,
        abstract_opt,
        trainable_shardings,
        abstract_trainable,
        transform_non_params=lambda _: scalar,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
    )
    return TrainState(
        step=scalar, trainable=trainable_shardings, opt_state=opt_shardings, rng=scalar
    )


def init_state(trainable: Flat, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=trainable,
        opt_state=optimizer.init(trainable),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def _loss(config: StepConfig, structure, trainable, frozen, batch, dropout_rng):
    params = merge(trainable, frozen, structure)
    logits, aux = tagi.forward(config.model, params, batch, dropout_rng=dropout_rng)
    total, metrics = losses.tagi_loss(
        config.loss,
        logits,
        batch["decoder_target_tokens"],
        batch["decoder_loss_weights"],
        teacher_logits=batch.get("teacher_logits"),
        generated=aux["adapters"],
        teacher_adapters=batch.get("teacher_lora"),
        teacher_mask=batch.get("teacher_mask"),
    )
    return total, metrics


def _micro_batches(batch, count: int):
    def split(x):
        if isinstance(x, lora.LoraAdapters):
            return jax.tree.map(
                lambda a: a.reshape(a.shape[0], count, -1, *a.shape[2:]).swapaxes(0, 1), x
            )
        return x.reshape(count, x.shape[0] // count, *x.shape[1:])

    return {k: split(v) for k, v in batch.items()}


def term_gradients(config: StepConfig, structure, state: TrainState, frozen: Flat, batch):
    """Each weighted loss term's gradient norm and share (no update): ``grad_norm/<term>`` =
    ‖∇ term‖ and ``grad_share/<term>`` = ⟨∇ term, ∇ loss⟩ / ‖∇ loss‖² (the shares sum to 1;
    a term whose gradient opposes the rest has a negative share).

    One forward and one vectorised backward per term (``jax.jacrev`` of the vector of weighted
    terms), so it costs about one step per term: the trainer runs it at logging steps only. With
    gradient accumulation it looks at the first micro-batch, the size one step's memory holds.
    """
    names = config.loss.weighted_terms()
    if config.grad_accum_steps > 1:
        batch = jax.tree.map(lambda x: x[0], _micro_batches(batch, config.grad_accum_steps))
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 1)

    def terms(trainable):
        _, metrics = _loss(config, structure, trainable, frozen, batch, rng)
        return jnp.stack([metrics[f"term/{name}"] for name in names])

    per_term = jax.jacrev(terms)(state.trainable)  # each leaf [terms, *shape]
    leaves = [g.astype(jnp.float32).reshape(len(names), -1) for g in jax.tree.leaves(per_term)]
    squares = sum(jnp.sum(jnp.square(g), axis=1) for g in leaves)
    totals = [jnp.sum(g, axis=0) for g in leaves]
    total_square = sum(jnp.sum(jnp.square(t)) for t in totals)
    dots = sum(g @ t for g, t in zip(leaves, totals, strict=True))
    shares = dots / jnp.maximum(total_square, 1e-30)
    out = {}
    for i, name in enumerate(names):
        out[f"grad_norm/{name}"] = jnp.sqrt(squares[i])
        out[f"grad_share/{name}"] = shares[i]
    return out


def train_step(config: StepConfig, optimizer, structure, state: TrainState, frozen: Flat, batch):
    """One update. ``batch``: the model features, ``teacher_logits`` when the KL terms are
    weighted, ``teacher_lora`` (``LoraAdapters``) and ``teacher_mask`` when alignment is."""
    rng = jax.random.wrap_key_data(state.rng)
    rng, dropout_rng = jax.random.split(rng)
    grad_fn = jax.value_and_grad(
        lambda t, b, r: _loss(config, structure, t, frozen, b, r), has_aux=True
    )
    if config.grad_accum_steps == 1:
        (loss, metrics), grads = grad_fn(state.trainable, batch, dropout_rng)
    else:
        micro = _micro_batches(batch, config.grad_accum_steps)
        rngs = jax.random.split(dropout_rng, config.grad_accum_steps)

        def accumulate(carry, xs):
            mb, r = xs
            (loss, metrics), grads = grad_fn(state.trainable, mb, r)
            total_grads, total_loss, total_metrics = carry
            return (
                jax.tree.map(jnp.add, total_grads, grads),
                total_loss + loss,
                jax.tree.map(jnp.add, total_metrics, metrics),
            ), None

        zero_metrics = jax.eval_shape(
            lambda: grad_fn(state.trainable, jax.tree.map(lambda x: x[0], micro), rngs[0])[0][1]
        )
        init = (
            jax.tree.map(jnp.zeros_like, state.trainable),
            jnp.zeros((), jnp.float32),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_metrics),
        )
        (grads, loss, metrics), _ = jax.lax.scan(accumulate, init, (micro, rngs))
        k = config.grad_accum_steps
        grads = jax.tree.map(lambda g: g / k, grads)
        loss = loss / k
        metrics = {n: (v if n == "nonfinite" else v / k) for n, v in metrics.items()}
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (metrics["nonfinite"] == 0)

    def update(operands):
        trainable, opt_state, grads = operands
        updates, new_opt_state = optimizer.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        # A finite loss and gradient can still overflow the parameters or the moments (a huge
        # learning rate, no clipping): the guard covers what the update wrote.
        ok = all_finite((new_trainable, new_opt_state))
        if config.rollback_nonfinite_updates:
            new_trainable, new_opt_state = jax.tree.map(
                lambda new, old: jnp.where(ok, new, old),
                (new_trainable, new_opt_state),
                (trainable, opt_state),
            )
        return new_trainable, new_opt_state, ok

    def keep(operands):
        return operands[0], operands[1], jnp.array(True)

    # A conditional, not where(finite, new, old) per leaf: the select kept the old parameters
    # and moments alive next to the new ones, so XLA copied every moment before updating it
    # in place (38 ms of the 770 ms CPU TAGI step).
    new_trainable, new_opt_state, update_finite = jax.lax.cond(
        finite, update, keep, (state.trainable, state.opt_state, grads)
    )
    applied = finite & update_finite
    new_state = TrainState(
        step=state.step + jnp.where(applied, 1, 0).astype(jnp.int32),
        trainable=new_trainable,
        opt_state=new_opt_state,
        rng=jax.random.key_data(rng),
    )
    metrics = dict(
        metrics,
        loss=loss,
        grad_norm=grad_norm,
        update_skipped=(~applied).astype(jnp.int32),
        nonfinite_update=(~update_finite).astype(jnp.int32),
    )
    return new_state, metrics


def all_finite(tree) -> jax.Array:
    """True when every floating leaf of ``tree`` is finite (integer counts are skipped)."""
    checks = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)
