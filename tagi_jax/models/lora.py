"""Generated LoRA adapters as data, and the pure functions that apply and merge them.

An adapter target is one projection kind of the T5 blocks, e.g. ``enc_self.q`` (the query of
every encoder self-attention block). ``LoraAdapters`` holds, per target, ``A [layers, batch,
d_in, r]`` and ``B [layers, batch, r, d_out]``: one pair per block and per example. A projection
``y = x·W`` becomes ``y = x·W + scale·(x·A_b)·B_b`` with two einsums per example; a per-example
kernel ``W + A_b·B_b`` is never built (``merge`` does that once, for export and serving).

``TARGETS`` below is the only table to extend to make a new projection adaptable.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from tagi_jax.models.t5_config import T5Config


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one adapter target lives in the T5 parameter tree, and its shapes.

    Attributes:
      name: the configuration name, ``<site>.<projection>``.
      stack: ``encoder`` or ``decoder``.
      module: the block's submodule (``attention``, ``self_attention``,
        ``encoder_decoder_attention``, ``mlp``).
      dense: the projection inside it (``query`` ... ``wo``).
      site: the generator group of the authors' ``shared_indexed`` hypernetwork.
      in_axis, out_axis: logical names of the kernel's two axes.
    """

    name: str
    stack: str
    module: str
    dense: str
    site: str
    in_axis: str
    out_axis: str

    def dims(self, config: T5Config) -> tuple[int, int]:
        size = {"embed": config.d_model, "joined_kv": config.inner_dim, "mlp": config.d_ff}
        return size[self.in_axis], size[self.out_axis]

    def num_layers(self, config: T5Config) -> int:
        return config.num_layers if self.stack == "encoder" else config.num_decoder_layers


def _build_targets() -> dict[str, Target]:
    attention = {
        "q": ("query", "embed", "joined_kv"),
        "k": ("key", "embed", "joined_kv"),
        "v": ("value", "embed", "joined_kv"),
        "o": ("out", "joined_kv", "embed"),
    }
    ffn = {
        "wi": ("wi", "embed", "mlp"),
        "wi_0": ("wi_0", "embed", "mlp"),
        "wi_1": ("wi_1", "embed", "mlp"),
        "wo": ("wo", "mlp", "embed"),
    }
    sites = (
        ("enc_self", "encoder", "attention", attention),
        ("dec_self", "decoder", "self_attention", attention),
        ("dec_cross", "decoder", "encoder_decoder_attention", attention),
        ("enc_ffn", "encoder", "mlp", ffn),
        ("dec_ffn", "decoder", "mlp", ffn),
    )
    table = {}
    for site, stack, module, projections in sites:
        for short, (dense, in_axis, out_axis) in projections.items():
            name = f"{site}.{short}"
            table[name] = Target(name, stack, module, dense, site, in_axis, out_axis)
    return table


# Every adaptable projection. To add one: add its entry here (the model, the hypernetwork, the
# merge and the sharding all read this table) and a case to tests/test_lora.py.
TARGETS: dict[str, Target] = _build_targets()

DEFAULT_TARGETS = (
    "enc_self.q",
    "enc_self.v",
    "dec_self.q",
    "dec_self.v",
    "dec_cross.q",
    "dec_cross.v",
)


def validate_targets(targets, config: T5Config | None = None) -> tuple[str, ...]:
    """Checks target names (and, with a config, that the FFN kind exists); keeps table order.

    An empty tuple is valid: no adapters (e.g. a fusion-only ablation).
    """
    if isinstance(targets, str):
        raise ValueError(
            f"HyperConfig.targets must be a sequence of names, got the string {targets!r}"
        )
    targets = tuple(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(
            f"HyperConfig.targets: unknown {unknown}; known targets: {sorted(TARGETS)}"
        )
    if len(set(targets)) != len(targets):
        raise ValueError(f"HyperConfig.targets lists a target twice: {targets}")
    if config is not None:
        gated = {"wi_0", "wi_1"}
        for t in targets:
            dense = TARGETS[t].dense
            if (dense in gated and not config.is_gated_act) or (
                dense == "wi" and config.is_gated_act
            ):
                raise ValueError(
                    f"HyperConfig.targets: {t} does not exist in a "
                    f"{'gated' if config.is_gated_act else 'non-gated'} T5 FFN"
                )
    order = list(TARGETS)
    return tuple(sorted(targets, key=order.index))


def adapter_logical_axes(target: Target) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Logical axes of a target's ``A`` and ``B``."""
    return (
        ("layers", "batch", target.in_axis, "lora_rank"),
        ("layers", "batch", "lora_rank", target.out_axis),
    )


@flax.struct.dataclass
class LoraAdapters:
    """Per-example LoRA pairs for a set of targets.

    ``a[name]`` is ``[layers, batch, d_in, r]`` and ``b[name]`` ``[layers, batch, r, d_out]``;
    ``scale`` multiplies every LoRA term (static, not a traced value).
    """

    a: dict[str, jax.Array]
    b: dict[str, jax.Array]
    scale: float = flax.struct.field(pytree_node=False, default=1.0)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.a)

    def __bool__(self) -> bool:
        return bool(self.a)

    @property
    def batch_size(self) -> int:
        return next(iter(self.a.values())).shape[1]

    def check(self, config: T5Config, batch_size: int | None = None) -> None:
        """Raises ValueError naming the first target whose shapes do not fit ``config``."""
        if set(self.a) != set(self.b):
            raise ValueError(f"adapters have A for {sorted(self.a)} but B for {sorted(self.b)}")
        validate_targets(self.a, config)
        for name in self.a:
            target = TARGETS[name]
            d_in, d_out = target.dims(config)
            layers = target.num_layers(config)
            a, b = self.a[name], self.b[name]
            rank = a.shape[-1]
            want_a = (layers, batch_size or a.shape[1], d_in, rank)
            want_b = (layers, batch_size or a.shape[1], rank, d_out)
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise ValueError(
                    f"adapter {name}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit the "
                    f"model; expected A {want_a} and B {want_b}"
                )


def constrain(adapters: LoraAdapters) -> LoraAdapters:
    """Puts the logical sharding (batch on the data axis) on every A and B."""
    a, b = {}, {}
    for name in adapters.a:
        a_axes, b_axes = adapter_logical_axes(TARGETS[name])
        a[name] = nn.with_logical_constraint(adapters.a[name], a_axes)
        b[name] = nn.with_logical_constraint(adapters.b[name], b_axes)
    return adapters.replace(a=a, b=b)


def take(adapters: LoraAdapters, rows) -> LoraAdapters:
    """Adapters of the given examples (``rows`` int array): e.g. per-task adapters, generated
    once per task, expanded to that task's instances."""
    rows = jnp.asarray(rows)
    return jax.tree.map(lambda x: jnp.take(x, rows, axis=1), adapters)


def stack_inputs(adapters: LoraAdapters | None, stack: str):
    """The blocks' view of the adapters: ``{module: {dense: (A, B)}}`` with a leading layers
    axis (sliced per block by the loop or by ``nn.scan``); ``None`` when the stack has none.

    The scale is folded into B here, once per call, outside the per-block computation.
    """
    if adapters is None:
        return None
    out: dict[str, dict[str, tuple[jax.Array, jax.Array]]] = {}
    for name in adapters.a:
        target = TARGETS[name]
        if target.stack != stack:
            continue
        b = adapters.b[name]
        if adapters.scale != 1.0:
            b = b * jnp.asarray(adapters.scale, b.dtype)
        out.setdefault(target.module, {})[target.dense] = (adapters.a[name], b)
    return out or None


def apply(x, kernel_out, lora, dtype):
    """``kernel_out + (x·A)·B`` for per-example ``A [batch, d_in, r]``, ``B [batch, r, d_out]``.

    ``x`` is ``[batch, ..., d_in]``; two einsums, no per-example kernel.
    """
    a, b = lora
    x = x.astype(dtype)
    down = jnp.einsum("b...i,bir->b...r", x, a.astype(dtype))
    return kernel_out + jnp.einsum("b...r,bro->b...o", down, b.astype(dtype))


def merge(config: T5Config, params: Any, adapters: LoraAdapters, index: int) -> Any:
    """The base parameters with example ``index``'s LoRA folded into the kernels.

    For export and single-task serving: the result is a plain T5 parameter tree, so
    ``t5.forward(config, merged, ...)`` equals ``t5.forward(config, params, ...,
    adapters=take(adapters, [index]*batch))``.
    """
    adapters.check(config)
    params = jax.tree.map(lambda x: x, params)  # a copy of the containers, leaves shared
    for name in adapters.a:
        target = TARGETS[name]
        delta = jnp.einsum(
            "lir,lro->lio",
            adapters.a[name][:, index].astype(jnp.float32),
            adapters.b[name][:, index].astype(jnp.float32),
        )
        delta = delta * adapters.scale
        stack = params[target.stack]
        if config.scan_layers:
            kernel_parent = stack["layers"][target.module][target.dense]
            kernel_parent["kernel"] = (kernel_parent["kernel"] + delta).astype(
                kernel_parent["kernel"].dtype
            )
        else:
            for layer in range(target.num_layers(config)):
                kernel_parent = stack[f"layers_{layer}"][target.module][target.dense]
                kernel_parent["kernel"] = (kernel_parent["kernel"] + delta[layer]).astype(
                    kernel_parent["kernel"].dtype
                )
    return params
