"""Everything gin can bind, registered in one place and in one style.

* Configs: ``Name.<field> = value`` binds a field of a frozen dataclass; each ``Name`` is a
  ``**fields`` function here that checks the field names and builds the dataclass
  (``T5Config``, ``HyperConfig``, ``TagiConfig``, ``LossConfig``, ``LoraTeacherConfig``,
  ``NIConfig``, ``OptimizerConfig``, ``DataConfig``, ``DistributedConfig``).
* Entry points: ``train``, ``train_lora_teachers``, ``evaluate``, ``evaluate_p3`` are the plain
  functions of their modules (``training.loop``, ``training.teacher_stage``,
  ``evaluation.pipeline``, ``evaluation.p3_pipeline``) registered here (``_entry_point``): gin
  binds their parameters, the required ones must be bound (gin's error names them), and every
  binding of the run must have been read before the stage starts (``gin_check``). ``run``
  (``run.stage``) picks the stage ``python -m tagi_jax.train`` runs.

Code outside this module never registers anything with gin: it receives the built configs.
Importing this module registers the names; it has no other side effects (it imports neither
TensorFlow nor SeqIO).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping

import gin

from tagi_jax import gin_check
from tagi_jax.data.config import DataConfig
from tagi_jax.data.ni import NIConfig
from tagi_jax.distill.lora_teachers import LoraTeacherConfig
from tagi_jax.distill.losses import LossConfig
from tagi_jax.evaluation import p3_pipeline
from tagi_jax.evaluation import pipeline as evaluation_pipeline
from tagi_jax.models.t5_config import T5Config
from tagi_jax.models.tagi_config import HyperConfig, TagiConfig
from tagi_jax.parallel.distributed import DistributedConfig
from tagi_jax.training import loop, teacher_stage
from tagi_jax.training.optim import OptimizerConfig

SAME_AS_T5 = "same_as_t5"


def _check_fields(cls, fields) -> None:
    """gin accepts any name for a ``**fields`` function: reject the ones ``cls`` lacks here."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(
            f"gin binds unknown {cls.__name__} fields {unknown}; known: {sorted(known)}"
        )


@gin.configurable("T5Config")
def t5_config(**fields) -> T5Config:
    """``T5Config.<field> = value`` in a gin file sets that field of the model config."""
    _check_fields(T5Config, fields)
    return T5Config(**fields)


@gin.configurable("HyperConfig")
def hyper_config(**fields) -> HyperConfig:
    """``HyperConfig.<field> = value`` sets that field of the hypernetwork config."""
    _check_fields(HyperConfig, fields)
    if "targets" in fields:
        fields["targets"] = tuple(fields["targets"])
    return HyperConfig(**fields)


@gin.configurable("TagiConfig")
def tagi_config(**fields) -> TagiConfig:
    """``TagiConfig.t5 = @T5Config()``, ``TagiConfig.hyper = @HyperConfig()``, ...

    ``TagiConfig.instruction_encoder_t5 = "same_as_t5"`` gives a separate instruction encoder
    the backbone's architecture (the authors encode instructions with the teacher's encoder,
    which has the student's shape).
    """
    _check_fields(TagiConfig, fields)
    fields.setdefault("t5", T5Config())
    fields.setdefault("hyper", HyperConfig())
    if fields.get("instruction_encoder_t5") == SAME_AS_T5:
        fields["instruction_encoder_t5"] = fields["t5"].replace(instruction_cross_attention=False)
    for name in ("trainable_patterns", "frozen_patterns"):
        if name in fields:
            fields[name] = tuple(fields[name])
    return TagiConfig(**fields)


@gin.configurable("LossConfig")
def loss_config(**fields) -> LossConfig:
    """``LossConfig.<field> = value``: weights and forms of the TAGI objective."""
    _check_fields(LossConfig, fields)
    return LossConfig(**fields)


@gin.configurable("LoraTeacherConfig")
def lora_teacher_config(**fields) -> LoraTeacherConfig:
    """``LoraTeacherConfig.<field> = value``: how the instance-trained LoRA teachers train."""
    _check_fields(LoraTeacherConfig, fields)
    if "targets" in fields:
        fields["targets"] = tuple(fields["targets"])
    return LoraTeacherConfig(**fields)


@gin.configurable("NIConfig")
def ni_config(**fields) -> NIConfig:
    """``NIConfig.<field> = value``: how natural-instructions splits become examples. A run's
    one NIConfig: ``DataConfig.ni`` (training, the LoRA-teacher stage) and ``evaluate.ni``
    default to what this returns, so a binding here always reaches the data."""
    _check_fields(NIConfig, fields)
    return NIConfig(**fields)


@gin.configurable("OptimizerConfig")
def optimizer_config(**fields) -> OptimizerConfig:
    """``OptimizerConfig.<field> = value``: optimizer, schedule and clipping."""
    _check_fields(OptimizerConfig, fields)
    return OptimizerConfig(**fields)


@gin.configurable("DataConfig")
def data_config(*, task: str = gin.REQUIRED, **fields) -> DataConfig:
    """``DataConfig.<field> = value``: the run's data (``task`` required). ``ni`` defaults to
    the run's ``NIConfig`` (``ni_config()``), so an ``NIConfig.<field>`` binding always reaches
    the data, never silently ignored."""
    _check_fields(DataConfig, {"task": task, **fields})
    if "ni" not in fields:
        fields["ni"] = ni_config()
    return DataConfig(task=task, **fields)


@gin.configurable("DistributedConfig")
def distributed_config(**fields) -> DistributedConfig:
    """``DistributedConfig.<field> = value``: multi-process JAX (``mesh/`` gin files)."""
    _check_fields(DistributedConfig, fields)
    return DistributedConfig(**fields)


# --- entry points ---------------------------------------------------------------------------


def _entry_point(
    name: str,
    fn: Callable,
    *,
    required: tuple[str, ...],
    denylist: tuple[str, ...] = (),
    prepare: Callable[[dict], dict] | None = None,
) -> Callable:
    """``fn`` (keyword-only parameters) registered with gin as ``name``.

    ``name.<parameter> = value`` binds a parameter of ``fn``; the ``required`` ones (no
    default in ``fn``) must be bound or passed (else gin's ``Required bindings for `name` not
    provided in config: [...]``); ``denylist`` ones cannot be bound. When called, ``prepare``
    (if any) may add arguments that themselves read bindings, then every binding of the run
    must have been read (``gin_check.check_bindings_used(name)``), then ``fn`` runs."""
    signature = inspect.signature(fn)
    unknown = set(required) - set(signature.parameters)
    if unknown:
        raise TypeError(f"{fn.__qualname__} has no parameters {sorted(unknown)}")
    parameters = [
        p.replace(default=gin.REQUIRED) if p.name in required else p
        for p in signature.parameters.values()
    ]

    @functools.wraps(fn)
    def stage(**kwargs):
        if prepare is not None:
            kwargs = prepare(kwargs)
        gin_check.check_bindings_used(name)
        return fn(**kwargs)

    stage.__signature__ = signature.replace(parameters=parameters)  # what gin binds
    return gin.configurable(name, denylist=list(denylist) or None)(stage)


def _ni_over_export(trained: Mapping) -> NIConfig:
    """An export's NIConfig (``trained``: its fields) with the run file's ``NIConfig.<field>``
    bindings on top: a binding overrides, what the run file does not say the export does.
    Built by the configurable, so gin fills (and checks) the bound fields."""
    bound = gin.get_bindings("NIConfig")
    return ni_config(**{k: v for k, v in trained.items() if k not in bound})


def _evaluation_ni(kwargs: dict) -> dict:
    """``evaluate.ni`` unless bound: the export's NIConfig under the run's bindings."""
    if kwargs.get("ni") is None:
        ni_config()  # so that NIConfig's bindings count as read by this stage
        kwargs = {**kwargs, "ni": _ni_over_export}
    return kwargs


train = _entry_point(
    "train", loop.train, required=("model_dir", "model", "data"), denylist=("stop_after",)
)
train_lora_teachers = _entry_point(
    "train_lora_teachers",
    teacher_stage.train_lora_teachers,
    required=("model_dir", "base_checkpoint", "data"),
)
evaluate = _entry_point(
    "evaluate",
    evaluation_pipeline.evaluate,
    required=("export_dir", "output_dir", "task_dir"),
    prepare=_evaluation_ni,
)
evaluate_p3 = _entry_point(
    "evaluate_p3", p3_pipeline.evaluate_p3, required=("export_dir", "p3_dir", "output_dir")
)

STAGES = ("train", "lora_teachers")


@gin.configurable("run")
def run(stage: str = "train"):
    """What ``python -m tagi_jax.train`` runs (``run.stage``): ``train`` (the training loop:
    the metatrain, hyper_pretrain and finetune run files are configurations of it) or
    ``lora_teachers`` (the instance-trained LoRA teachers)."""
    if stage not in STAGES:
        raise ValueError(f"run.stage={stage!r} is not one of {STAGES}")
    return train_lora_teachers() if stage == "lora_teachers" else train()
