"""The instruction hypernetwork: encoded instruction → per-example LoRA adapters.

Pipeline (``Hypernetwork.__call__``): pool the instruction encoder's states into one vector,
project it to the instruction vector ``f = tanh(W·pooled + b)``, then a generator emits
``A [layers, batch, d_in, r]`` and ``B [layers, batch, r, d_out]`` for every target. Three
generators (``HyperConfig.generator``):

* ``per_layer`` — paper Eq. 2: one MLP per block (per stack), its hidden layer shared by all the
  block's targets, one output head per target.
* ``shared_indexed`` — the authors' code: per attention type (site) and shape, one MLP pair
  shared by all blocks and projections, fed ``concat(f, idx)`` with the raw index
  ``idx = block * n + position`` (q → 2l, v → 2l+1 for the default targets).
* ``slots`` — HINT: learned per-(block, target) query embeddings attend over the instruction
  token states; an MLP per target (shared across blocks) maps each slot to A and B.

Initialisation (``HyperConfig.init``): ``zero_b`` makes every B-generator output layer zero (the
student starts as the base model; A is random, so gradients reach B at once) and ``authors``
draws every generator weight from N(0, 1e-7) with zero biases, as the authors' code does.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from tagi_jax.models import lora
from tagi_jax.models.tagi_config import TagiConfig

_AUTHORS_INIT = nn.initializers.normal(stddev=1e-7)
# PyTorch's default Linear init, U(±1/sqrt(fan_in)); the authors' pooler keeps it.
_TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class StackedDense(nn.Module):
    """Dense layers with their own weights per block: ``[layers, in, out]`` kernel + bias.

    Input ``[batch, in]`` (broadcast to every block) or ``[layers, batch, in]``; output
    ``[layers, batch, out]``.
    """

    num_layers: int
    features: int
    in_axis: str
    out_axis: str
    kernel_init: nn.initializers.Initializer
    bias_init: nn.initializers.Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        def per_layer_init(init):
            # Initialise each block's kernel as an independent [in, out] matrix.
            def fn(key, shape, dtype=jnp.float32):
                keys = jax.random.split(key, shape[0])
                return jax.vmap(lambda k: init(k, shape[1:], dtype))(keys)

            return fn

        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(
                per_layer_init(self.kernel_init), ("layers", self.in_axis, self.out_axis)
            ),
            (self.num_layers, x.shape[-1], self.features),
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(self.bias_init, ("layers", self.out_axis)),
            (self.num_layers, self.features),
        )
        if x.ndim == 2:
            y = jnp.einsum("bi,lio->lbo", x, kernel)
        else:
            y = jnp.einsum("lbi,lio->lbo", x, kernel)
        return y + bias[:, None, :]


class BiasedDense(nn.Module):
    """``x @ kernel + bias`` over the last axis, with logical axis names."""

    features: int
    in_axis: str
    out_axis: str
    kernel_init: nn.initializers.Initializer
    bias_init: nn.initializers.Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, (self.in_axis, self.out_axis)),
            (x.shape[-1], self.features),
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(self.bias_init, (self.out_axis,)),
            (self.features,),
        )
        return jnp.einsum("...i,io->...o", x, kernel) + bias


def _output_inits(config: TagiConfig, d_in: int):
    """(hidden, A-output, B-output) kernel initialisers of a generator for the chosen scheme."""
    if config.hyper.init == "authors":
        return _AUTHORS_INIT, _AUTHORS_INIT, _AUTHORS_INIT
    hidden = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
    # A entries get the spread of a Kaiming-initialised LoRA A (variance ~ 1/d_in).
    a_out = nn.initializers.variance_scaling(1.0 / d_in, "fan_in", "normal")
    return hidden, a_out, nn.initializers.zeros


def _hidden_init(config: TagiConfig):
    return _output_inits(config, 1)[0]


def masked_mean(states, tokens):
    """Mean over non-padding positions (token id > 0), in float32; all-padding rows give 0."""
    mask = (tokens > 0).astype(jnp.float32)[..., None]
    total = jnp.sum(states.astype(jnp.float32) * mask, axis=1)
    return total / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


def pool(config: TagiConfig, states, tokens, first_block=None):
    """The instruction encoding as one vector per example, ``[batch, width]`` float32."""
    if config.hyper.pooling == "masked_mean":
        return masked_mean(states, tokens)
    if first_block is None:
        raise ValueError("first_last_sum_unmasked pooling needs the first block's states")
    # The authors' "first_last_avg": a sum of two states, averaged over every position,
    # padding included (their attention mask is ignored).
    return jnp.mean((states + first_block).astype(jnp.float32), axis=1)


class Hypernetwork(nn.Module):
    """Instruction states → (``LoraAdapters``, instruction embedding ``[batch, ...]``)."""

    config: TagiConfig

    @nn.compact
    def __call__(self, states, tokens, first_block=None):
        hyper = self.config.hyper
        states = states.astype(jnp.float32)
        if hyper.generator == "slots":
            a, b, embedding = self._slots(states, tokens)
        else:
            pooled = pool(self.config, states, tokens, first_block)
            embedding = jnp.tanh(
                BiasedDense(
                    hyper.instruction_dim,
                    "embed",
                    "instruction_dim",
                    kernel_init=_TORCH_LINEAR_INIT,
                    name="pooler",
                )(pooled)
            )
            if hyper.generator == "per_layer":
                a, b = self._per_layer(embedding)
            else:
                a, b = self._shared_indexed(embedding)
        if hyper.divide_b_by_sqrt_rank:
            b = {name: value / math.sqrt(hyper.rank) for name, value in b.items()}
        adapters = lora.LoraAdapters(a=a, b=b, scale=hyper.lora_scale)
        return lora.constrain(adapters), embedding

    # --- generators ----------------------------------------------------------------------

    def _targets(self, stack=None):
        t5 = self.config.t5
        for name in self.config.hyper.targets:
            target = lora.TARGETS[name]
            if stack is None or target.stack == stack:
                yield target, target.dims(t5)

    def _reshape(self, flat_a, flat_b, d_in, d_out):
        """``[layers, batch, d_in*r]`` and ``[layers, batch, r*d_out]`` → A and B."""
        r = self.config.hyper.rank
        a = flat_a.reshape(flat_a.shape[:2] + (d_in, r))
        b = flat_b.reshape(flat_b.shape[:2] + (r, d_out))
        return a, b

    def _per_layer(self, embedding):
        hyper, t5 = self.config.hyper, self.config.t5
        a, b = {}, {}
        for stack, num in (("encoder", t5.num_layers), ("decoder", t5.num_decoder_layers)):
            targets = list(self._targets(stack))
            if not targets:
                continue
            hidden_init = _hidden_init(self.config)
            hidden = nn.relu(
                StackedDense(
                    num,
                    hyper.hidden_dim,
                    "instruction_dim",
                    "hyper_hidden",
                    kernel_init=hidden_init,
                    name=f"{stack}_hidden",
                )(embedding)
            )
            for target, (d_in, d_out) in targets:
                _, a_init, b_init = _output_inits(self.config, d_in)
                slug = target.name.replace(".", "_")
                flat_a = StackedDense(
                    num, d_in * hyper.rank, "hyper_hidden", "lora_flat", a_init, name=f"{slug}_a"
                )(hidden)
                flat_b = StackedDense(
                    num, hyper.rank * d_out, "hyper_hidden", "lora_flat", b_init, name=f"{slug}_b"
                )(hidden)
                a[target.name], b[target.name] = self._reshape(flat_a, flat_b, d_in, d_out)
        return a, b

    def _shared_indexed(self, embedding):
        hyper = self.config.hyper
        groups: dict[tuple[str, int, int], list] = {}
        for target, dims in self._targets():
            groups.setdefault((target.site, *dims), []).append(target)
        a, b = {}, {}
        batch = embedding.shape[0]
        for (site, d_in, d_out), targets in groups.items():
            num = targets[0].num_layers(self.config.t5)
            k = len(targets)
            # The authors append the raw integer index (2l for q, 2l+1 for v) as one feature.
            idx = (jnp.arange(num)[:, None] * k + jnp.arange(k)[None, :]).astype(jnp.float32)
            z = jnp.concatenate(
                [
                    jnp.broadcast_to(embedding, (num, k, batch, embedding.shape[-1])),
                    jnp.broadcast_to(idx[:, :, None, None], (num, k, batch, 1)),
                ],
                axis=-1,
            )
            hidden_init, a_init, b_init = _output_inits(self.config, d_in)
            name = f"{site}_{d_in}x{d_out}"

            def mlp(out, init, which, z=z, name=name, hidden_init=hidden_init):
                h = BiasedDense(
                    hyper.hidden_dim,
                    "instruction_dim",
                    "hyper_hidden",
                    hidden_init,
                    name=f"{name}_{which}_hidden",
                )(z)
                return BiasedDense(out, "hyper_hidden", "lora_flat", init, name=f"{name}_{which}")(
                    nn.relu(h)
                )

            flat_a = mlp(d_in * hyper.rank, a_init, "a")  # [layers, k, batch, d_in*r]
            flat_b = mlp(hyper.rank * d_out, b_init, "b")
            for j, target in enumerate(targets):
                a[target.name], b[target.name] = self._reshape(
                    flat_a[:, j], flat_b[:, j], d_in, d_out
                )
        return a, b

    def _slots(self, states, tokens):
        hyper, t5 = self.config.hyper, self.config.t5
        width = states.shape[-1]
        targets = list(self._targets())
        counts = [target.num_layers(t5) for target, _ in targets]
        total = sum(counts)
        queries = self.param(
            "slot_queries",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("slots", "embed")),
            (total, width),
        )
        heads = hyper.slot_heads
        if width % heads:
            raise ValueError(f"HyperConfig.slot_heads={heads} does not divide width {width}")
        init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
        proj = {
            n: BiasedDense(width, "embed", "joined_kv", init, name=f"slot_{n}")
            for n in ("query", "key", "value")
        }
        q = proj["query"](queries).reshape(total, heads, width // heads)
        k = proj["key"](states).reshape(states.shape[:2] + (heads, width // heads))
        v = proj["value"](states).reshape(states.shape[:2] + (heads, width // heads))
        scores = jnp.einsum("shd,bkhd->bhsk", q, k) / math.sqrt(width // heads)
        scores = scores + jnp.where(tokens > 0, 0.0, -1e10)[:, None, None, :]
        context = jnp.einsum("bhsk,bkhd->bshd", jax.nn.softmax(scores, axis=-1), v)
        features = BiasedDense(width, "joined_kv", "embed", init, name="slot_out")(
            context.reshape(context.shape[:2] + (width,))
        )
        features = nn.LayerNorm(name="slot_norm")(features)  # [batch, slots, width]
        a, b = {}, {}
        offset = 0
        for (target, (d_in, d_out)), count in zip(targets, counts, strict=True):
            slot = jnp.swapaxes(features[:, offset : offset + count], 0, 1)  # [layers, b, w]
            offset += count
            hidden_init, a_init, b_init = _output_inits(self.config, d_in)
            slug = target.name.replace(".", "_")
            out = []
            for which, size, out_init in (
                ("a", d_in * hyper.rank, a_init),
                ("b", hyper.rank * d_out, b_init),
            ):
                h = BiasedDense(
                    hyper.hidden_dim,
                    "embed",
                    "hyper_hidden",
                    hidden_init,
                    name=f"{slug}_{which}_hidden",
                )(slot)
                out.append(
                    BiasedDense(
                        size, "hyper_hidden", "lora_flat", out_init, name=f"{slug}_{which}"
                    )(nn.relu(h))
                )
            a[target.name], b[target.name] = self._reshape(*out, d_in, d_out)
        return a, b, jnp.mean(features, axis=1)
