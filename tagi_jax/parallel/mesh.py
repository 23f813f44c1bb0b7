"""Device meshes with explicitly Auto axes.

``jax.make_mesh`` defaults to Explicit axes since JAX 0.9, under which Flax's logical
constraints turn into assertions; our model code is written for Auto (GSPMD) sharding, so every
mesh in tagi_jax is built here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

DEFAULT_AXES = ("data", "model")


def infer_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces at most one ``-1`` in ``shape`` so that the product is ``num_devices``."""
    shape = tuple(int(s) for s in shape)
    unknown = [i for i, s in enumerate(shape) if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"mesh shape {shape} has more than one -1")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape} has a size that is neither positive nor -1")
    known = math.prod(s for s in shape if s != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(f"mesh shape {shape} does not divide {num_devices} devices")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, have {num_devices}")
    return shape


def make_mesh(
    shape: Sequence[int] = (-1, 1),
    axis_names: Sequence[str] = DEFAULT_AXES,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh over ``devices`` (default: all) with Auto axes; ``-1`` takes the remaining devices."""
    axis_names = tuple(axis_names)
    if len(shape) != len(axis_names):
        raise ValueError(f"mesh shape {tuple(shape)} does not match axis names {axis_names}")
    if devices is None:
        devices = jax.devices()
        shape = infer_shape(shape, len(devices))
        return jax.make_mesh(shape, axis_names, axis_types=(AxisType.Auto,) * len(shape))
    shape = infer_shape(shape, len(devices))
    array = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(array, axis_names, axis_types=(AxisType.Auto,) * len(shape))
