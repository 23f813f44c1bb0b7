"""The one table that maps logical axis names to mesh axes, and helpers that apply it.

Model code names axes (t5x vocabulary); only this module knows which mesh axis each name lands
on. Mesh axes: ``data`` (data parallel), ``fsdp`` (data parallel whose devices also split the
parameters and optimizer state, ZeRO-3 style) and ``model`` (Megatron tensor parallel).

* ``batch`` -> ``("data", "fsdp")``: every data-parallel device gets its own rows.
* ``embed`` -> ``fsdp``: parameters are split along d_model over the fsdp devices and gathered
  per layer. Activations name ``batch`` first, so ``fsdp`` is already taken there and their
  ``embed`` stays whole (flax assigns a mesh axis once per array, in rule order).
* the wide axes (``mlp``, ``heads``, ``joined_kv``, ``vocab``) -> ``model``.

A mesh need not have all three axes: ``rules_for_mesh`` drops the axes a mesh lacks, so the same
table serves a ``(data, model)`` CPU mesh and a ``(data, fsdp, model)`` pod slice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

AxisRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

MESH_AXES = ("data", "fsdp", "model")

# Order matters: `batch` before `embed` keeps activations unsplit along d_model (see above).
DEFAULT_RULES: AxisRules = (
    ("batch", ("data", "fsdp")),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("joined_kv", "model"),
    ("embed", "fsdp"),
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


def rules_for_mesh(rules: AxisRules, mesh: Mesh) -> AxisRules:
    """``rules`` with the mesh axes that ``mesh`` lacks removed (a rule left with none maps its
    logical axis to None: replicated)."""
    present = set(mesh.axis_names)

    def keep(target):
        if target is None:
            return None
        names = (target,) if isinstance(target, str) else tuple(target)
        kept = tuple(n for n in names if n in present)
        if not kept:
            return None
        return kept[0] if len(kept) == 1 else kept

    return tuple((logical, keep(target)) for logical, target in rules)


def logical_to_shardings(logical_specs, mesh: Mesh, rules: AxisRules = DEFAULT_RULES):
    """A ``NamedSharding`` per leaf of a tree of logical ``PartitionSpec``s."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules_for_mesh(rules, mesh)))


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
    return NamedSharding(mesh, mesh_spec(logical_axes, rules_for_mesh(rules, mesh)))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: AxisRules = DEFAULT_RULES) -> Iterator[None]:
    """Makes ``mesh`` current and activates ``rules`` for ``nn.with_logical_constraint``.

    Trace (call a jitted function for the first time) inside this context so the activation
    constraints in the model resolve against this mesh.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules_for_mesh(rules, mesh))):
        yield
