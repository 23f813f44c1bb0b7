"""The one table that maps logical axis names to mesh axes, and helpers that apply it.

Model code names axes (t5x vocabulary); only this module knows which mesh axis each name lands
on. Parameters and activations share names: ``embed`` is replicated, the wide axes (``mlp``,
``heads``, ``joined_kv``, ``vocab``) are split over ``model``, ``batch`` over ``data``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

AxisRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Data parallel over `data`, Megatron-style tensor parallel over `model`.
DEFAULT_RULES: AxisRules = (
    ("batch", "data"),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("joined_kv", "model"),
    ("embed", None),
    ("length", None),
    ("kv", None),
    ("relpos_buckets", None),
    ("layers", None),
    # TAGI: generated adapters and the hypernetwork (small, replicated but for the batch).
    ("lora_rank", None),
    ("lora_flat", None),
    ("instruction_dim", None),
    ("hyper_hidden", None),
    ("slots", None),
)


def logical_to_shardings(logical_specs, mesh: Mesh, rules: AxisRules = DEFAULT_RULES):
    """A ``NamedSharding`` per leaf of a tree of logical ``PartitionSpec``s."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def shardings_or_single_device(logical_specs, mesh: Mesh | None, rules: AxisRules = DEFAULT_RULES):
    """Shardings over ``mesh`` by ``rules``; without a mesh, everything on the first local device."""
    if mesh is not None:
        return logical_to_shardings(logical_specs, mesh, rules)
    device = SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(
        lambda _: device, logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def mesh_spec(
    logical_axes: Sequence[str | None], rules: AxisRules = DEFAULT_RULES
) -> PartitionSpec:
    """The mesh ``PartitionSpec`` of one array whose axes have these logical names."""
    return nn.logical_to_mesh_axes(tuple(logical_axes), list(rules))


def named_sharding(
    mesh: Mesh, logical_axes: Sequence[str | None], rules: AxisRules = DEFAULT_RULES
):
    return NamedSharding(mesh, mesh_spec(logical_axes, rules))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: AxisRules = DEFAULT_RULES) -> Iterator[None]:
    """Makes ``mesh`` current and activates ``rules`` for ``nn.with_logical_constraint``.

    Trace (call a jitted function for the first time) inside this context so the activation
    constraints in the model resolve against this mesh.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        yield
