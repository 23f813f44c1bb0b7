"""A frozen T5 as an orbax parameter checkpoint: ``<dir>/params`` plus ``<dir>/t5_config.json``.

This is how converted base models are stored for training: restoring takes target shardings,
so a checkpoint written on one mesh loads onto any other. ``directory`` may be local or in cloud
storage (``gs://...``, see ``tagi_jax.paths``).
"""

from __future__ import annotations

import json
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from tagi_jax import paths
from tagi_jax.convert.tensor_store import CheckpointError
from tagi_jax.models import t5
from tagi_jax.models.t5_config import T5Config
from tagi_jax.parallel.partitioning import DEFAULT_RULES, AxisRules, shardings_or_single_device

CONFIG_FILE = "t5_config.json"
PARAMS_DIR = "params"


def save(directory: str, config: T5Config, params: Any) -> None:
    """Writes the parameters and config; refuses to replace an existing checkpoint."""
    directory = paths.absolute(directory)
    params_path = paths.join(directory, PARAMS_DIR)
    if paths.exists(params_path):
        raise FileExistsError(f"{params_path} already exists; not overwriting a checkpoint")
    paths.makedirs(directory)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params_path, params)
    checkpointer.wait_until_finished()
    # The config goes last: a directory with a config has complete parameters.
    paths.write_text(paths.join(directory, CONFIG_FILE), config.to_json())


def read_config(directory: str) -> T5Config:
    path = paths.join(directory, CONFIG_FILE)
    try:
        return T5Config.from_dict(paths.read_json(path))
    except FileNotFoundError as e:
        raise CheckpointError(f"missing {path}: not a tagi_jax parameter checkpoint") from e
    except (OSError, json.JSONDecodeError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def load(
    directory: str,
    *,
    mesh: Mesh | None = None,
    axis_rules: AxisRules = DEFAULT_RULES,
    shardings: Any = None,
) -> tuple[T5Config, Any]:
    """Restores ``(config, params)``, sharded over ``mesh`` when one is given (or placed by
    ``shardings``, a tree matching the parameters)."""
    directory = paths.absolute(directory)
    if not paths.isdir(directory):
        raise CheckpointError(f"parameter checkpoint directory does not exist: {directory}")
    config = read_config(directory)
    params_path = paths.join(directory, PARAMS_DIR)
    if not paths.isdir(params_path):
        raise CheckpointError(f"missing {params_path}: the checkpoint has no parameters")
    abstract = t5.abstract_params(config)
    if shardings is None:
        shardings = shardings_or_single_device(t5.param_logical_axes(config), mesh, axis_rules)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    try:
        params = ocp.StandardCheckpointer().restore(params_path, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"cannot restore {params_path} for {CONFIG_FILE}: {e}") from e
    return config, params
