"""The student's parameters for a run, and the run's export: one job, shared by the training
loop, ``tagi_jax.export`` and the benchmarks.

* ``sharded_params``: created already sharded (``jax.eval_shape`` -> shardings -> jitted init),
  with the frozen base and a separate instruction encoder grafted in, or restored whole from a
  finished run (``init_from``, ``restore_exported``).
* ``instruction_encoder_source`` / ``load_instruction_encoder``: where a ``separate``
  instruction encoder's weights come from, and loading them.
* ``export_params``: ``<model_dir>/export``, the finished student in the one export format.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.experimental import multihost_utils

from tagi_jax import paths as paths_lib
from tagi_jax.artifacts import backbone, export_format
from tagi_jax.data.config import DataConfig
from tagi_jax.models import tagi
from tagi_jax.models.tagi_config import TagiConfig
from tagi_jax.parallel import distributed as distributed_lib
from tagi_jax.parallel import partitioning


def sharded_params(
    model: TagiConfig, mesh, rules, seed: int, base, init_from=None, instruction_encoder=None
):
    """The student's parameters, created already sharded: ``jax.eval_shape`` of the init gives
    the shapes, the logical axes the shardings, and the jitted init writes each shard in place
    (a large model never exists whole on one device). The base and a separate instruction
    encoder (a T5 tree; its decoder is dropped), if given, are grafted in; ``init_from`` (a
    finished run, e.g. hypernetwork pretraining) replaces everything."""
    shardings = partitioning.logical_to_shardings(tagi.param_logical_axes(model), mesh, rules)
    if init_from is not None:
        return restore_exported(init_from, model, shardings), shardings

    def init(key, base_params, encoder_params):
        return tagi.init_params(
            model, key, t5_params=base_params, instruction_encoder_params=encoder_params
        )

    with partitioning.use_mesh(mesh, rules):
        params = jax.jit(init, out_shardings=shardings)(
            jax.random.key(seed), base, instruction_encoder
        )
    return params, shardings


def instruction_encoder_source(
    model: TagiConfig, instruction_encoder_checkpoint, teacher_checkpoint, init_from
) -> str | None:
    """Where a ``separate`` instruction encoder's weights come from: the named checkpoint, else
    the logit teacher (the authors' collator encodes instructions with the teacher's encoder,
    tagi_spec.md §4.1). None when the backbone encodes instructions or ``init_from`` brings a
    trained student whole. A frozen encoder left at random initialisation would feed the
    hypernetwork noise, so a preset that needs one and gets none is an error."""
    if model.hyper.instruction_encoder != "separate":
        if instruction_encoder_checkpoint is not None:
            raise ValueError(
                "train.instruction_encoder_checkpoint is set but HyperConfig.instruction_encoder "
                "is 'backbone' (the student's own encoder reads the instruction)"
            )
        return None
    if init_from is not None:
        return None
    source = instruction_encoder_checkpoint or teacher_checkpoint
    if source is None:
        raise ValueError(
            "HyperConfig.instruction_encoder='separate' (e.g. methods/authors_code.gin) needs "
            "the weights of that encoder: set train.instruction_encoder_checkpoint (or "
            "train.teacher_checkpoint, whose encoder is used by default, as the authors do)"
        )
    return source


def load_instruction_encoder(path: str, mesh=None):
    """The T5 parameters whose encoder a ``separate`` instruction encoder takes: a parameter
    checkpoint, an HF directory or a finished run (its exported backbone). The graft in
    ``tagi.init_params`` checks every shape against ``TagiConfig.instruction_encoder_t5``."""
    return backbone.load_t5(path, mesh)[1]


def export_params(model_dir: str, model: TagiConfig, params, data: DataConfig, step: int) -> str:
    """``<model_dir>/export``: the finished student in the one export format
    (``export_format``), backbone, vocabulary and data settings included, so that a finished
    run is usable (and copyable) as it stands. Written aside and moved into place."""
    return export_format.save(
        paths_lib.join(paths_lib.absolute(model_dir), backbone.RUN_EXPORT_DIR),
        model,
        params,
        vocabulary=data.vocabulary,
        data=export_format.data_settings(dataclasses.asdict(data)),
        info={"step": int(step), "model_dir": paths_lib.absolute(model_dir)},
        overwrite=True,
        is_main=distributed_lib.is_main_process(),
        sync=multihost_utils.sync_global_devices,
    )


def restore_exported(model_dir: str, model: TagiConfig, shardings):
    """The student tree a finished run exported, placed by ``shardings`` (None: one device)."""
    path = paths_lib.join(paths_lib.absolute(model_dir), backbone.RUN_EXPORT_DIR)
    if not paths_lib.isdir(path):
        raise FileNotFoundError(f"no export at {path}: has training {model_dir} finished?")
    loaded = export_format.load(path, shardings=shardings)
    if loaded.config != model:
        # The parameters must fit: the shapes are what matter, not every field (a fine-tuning
        # run may, e.g., change dropout or the losses around the same architecture).
        wanted = jax.tree.map(lambda x: x.shape, tagi.abstract_params(model))
        got = jax.tree.map(lambda x: x.shape, loaded.params)
        if jax.tree.structure(wanted) != jax.tree.structure(got) or wanted != got:
            raise ValueError(
                f"the parameters in {path} do not fit this TagiConfig (another architecture?)"
            )
    return loaded.params
