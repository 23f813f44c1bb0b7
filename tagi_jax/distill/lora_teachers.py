"""Instance-trained LoRA teachers: one LoRA per task (or category) on the frozen base.

TAGI aligns its generated adapters with these (``losses.adapter_alignment``). ``K`` teachers
train at once: the batch is grouped ``[K, rows, ...]`` (each group one task), and one jitted
step runs ``jax.vmap`` over the teacher axis, so every teacher gets its own gradient, its own
optimizer state and its own data, exactly as if trained alone (a test checks this).

A trained set is a ``TeacherBank``: one safetensors file holding ``a/<target>``
``[K, layers, d_in, r]`` and ``b/<target>`` ``[K, layers, r, d_out]`` with the index
``{name: row}``, rank, alpha, targets and grouping in its metadata. ``bank.adapters_for(names)``
gives each training example its teacher's LoRA (``scale = alpha / rank``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tagi_jax.distill import losses
from tagi_jax.models import lora, t5
from tagi_jax.models.t5_config import T5Config

GROUPINGS = ("task", "category")
FORMAT_VERSION = "1"


@dataclasses.dataclass(frozen=True)
class LoraTeacherConfig:
    """How teachers are trained.

    Attributes:
      targets: adapted projections (the hypernetwork's, so alignment compares like with like).
      rank, alpha: LoRA rank and alpha; the update is ``(alpha / rank) · A·B`` (PEFT's
        convention; the authors used alpha = 2r).
      group_by: one teacher per ``task`` or per ``category`` (the authors: category).
      learning_rate, weight_decay: AdamW.
      seed: teacher k starts from ``fold_in(key(seed), k)``.
    """

    targets: tuple[str, ...] = lora.DEFAULT_TARGETS
    rank: int = 32
    alpha: float = 64.0
    group_by: str = "task"
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "targets", lora.validate_targets(self.targets))
        if not self.targets:
            raise ValueError("LoraTeacherConfig.targets is empty")
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(
                f"LoraTeacherConfig.rank must be a positive integer, got {self.rank!r}"
            )
        if self.group_by not in GROUPINGS:
            raise ValueError(
                f"LoraTeacherConfig.group_by={self.group_by!r} is not one of {GROUPINGS}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# --- one teacher ---------------------------------------------------------------------------


def init_teacher(config: LoraTeacherConfig, t5_config: T5Config, key) -> dict[str, dict]:
    """PEFT's initialisation: A ~ U(±1/sqrt(d_in)) (Kaiming-uniform, a=√5), B = 0."""
    lora.validate_targets(config.targets, t5_config)
    a, b = {}, {}
    for name in config.targets:
        target = lora.TARGETS[name]
        d_in, d_out = target.dims(t5_config)
        layers = target.num_layers(t5_config)
        key, sub = jax.random.split(key)
        bound = 1.0 / np.sqrt(d_in)
        a[name] = jax.random.uniform(sub, (layers, d_in, config.rank), jnp.float32, -bound, bound)
        b[name] = jnp.zeros((layers, config.rank, d_out), jnp.float32)
    return {"a": a, "b": b}


def as_adapters(config: LoraTeacherConfig, teacher: dict, batch_size: int) -> lora.LoraAdapters:
    """One teacher's LoRA for every row of a batch: ``[layers, batch, ...]``."""

    def rows(x):
        return jnp.broadcast_to(x[:, None], (x.shape[0], batch_size, *x.shape[1:]))

    return lora.LoraAdapters(
        a={k: rows(v) for k, v in teacher["a"].items()},
        b={k: rows(v) for k, v in teacher["b"].items()},
        scale=config.scale,
    )


def teacher_loss(config: LoraTeacherConfig, t5_config: T5Config, base_params, teacher, batch):
    """Plain cross-entropy of the frozen base with this teacher's LoRA on ``batch``.

    ``batch``: ``encoder_input_tokens``, ``decoder_input_tokens``, ``decoder_target_tokens``,
    ``decoder_loss_weights``.
    """
    adapters = as_adapters(config, teacher, batch["encoder_input_tokens"].shape[0])
    logits = t5.forward(
        t5_config,
        jax.lax.stop_gradient(base_params),
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
        adapters=adapters,
    )
    loss, metrics = losses.cross_entropy(
        logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"]
    )
    return loss, metrics


def optimizer(config: LoraTeacherConfig) -> optax.GradientTransformation:
    return optax.adamw(config.learning_rate, weight_decay=config.weight_decay)


# --- K teachers at once ------------------------------------------------------------------


def init_teachers(config: LoraTeacherConfig, t5_config: T5Config, count: int) -> dict:
    """``count`` teachers stacked on a leading axis, teacher k from ``fold_in(seed, k)``."""
    base = jax.random.key(config.seed)
    keys = jnp.stack([jax.random.fold_in(base, k) for k in range(count)])
    return jax.vmap(lambda k: init_teacher(config, t5_config, k))(keys)


def make_train_step(config: LoraTeacherConfig, t5_config: T5Config):
    """A jitted ``step(teachers, opt_state, base_params, batch) -> (teachers, opt_state,
    metrics)`` over ``batch`` arrays ``[K, rows, length]``; vmapped over the teacher axis."""
    tx = optimizer(config)

    def one(teacher, opt_state, base_params, batch):
        (loss, metrics), grads = jax.value_and_grad(
            functools.partial(teacher_loss, config, t5_config), argnums=1, has_aux=True
        )(base_params, teacher, batch)
        updates, opt_state = tx.update(grads, opt_state, teacher)
        return optax.apply_updates(teacher, updates), opt_state, {"loss": loss, **metrics}

    step = jax.vmap(one, in_axes=(0, 0, None, 0))
    return jax.jit(step, donate_argnums=(0, 1))


def init_optimizer_states(config: LoraTeacherConfig, teachers):
    return jax.vmap(optimizer(config).init)(teachers)


def train_teachers(
    config: LoraTeacherConfig,
    t5_config: T5Config,
    base_params,
    names: Sequence[str],
    batches: Iterable[dict],
    num_steps: int,
    *,
    log_every: int = 0,
) -> tuple[TeacherBank, list[np.ndarray]]:
    """Trains ``len(names)`` teachers for ``num_steps`` steps; returns the bank and the per-step
    per-teacher losses. Each batch holds ``[K, rows, length]`` arrays, group k for names[k]."""
    names = tuple(names)
    if len(set(names)) != len(names):
        raise ValueError("LoRA teacher names must be unique")
    teachers = init_teachers(config, t5_config, len(names))
    opt_state = init_optimizer_states(config, teachers)
    step = make_train_step(config, t5_config)
    history = []
    for i, batch in zip(range(num_steps), batches, strict=False):
        lead = {k: v.shape[0] for k, v in batch.items()}
        if set(lead.values()) != {len(names)}:
            raise ValueError(f"batch groups {lead} do not match the {len(names)} teachers")
        teachers, opt_state, metrics = step(teachers, opt_state, base_params, batch)
        # Block every step: queued steps with collectives deadlock on multi-device CPU.
        history.append(np.asarray(metrics["loss"]))
        if log_every and (i + 1) % log_every == 0:
            print(f"lora teachers step {i + 1}/{num_steps}: mean loss {history[-1].mean():.4f}")
    if len(history) < num_steps:
        raise ValueError(f"the batch iterator ran out after {len(history)} of {num_steps} steps")
    bank = TeacherBank(
        names=names,
        a=dict(teachers["a"]),
        b=dict(teachers["b"]),
        rank=config.rank,
        alpha=config.alpha,
        group_by=config.group_by,
    )
    return bank, history


# --- the bank on disk ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TeacherBank:
    """Trained teachers: ``a[target]`` ``[K, layers, d_in, r]``, ``b[target]`` ``[K, layers, r,
    d_out]``, row k for ``names[k]``."""

    names: tuple[str, ...]
    a: dict[str, Any]
    b: dict[str, Any]
    rank: int
    alpha: float
    group_by: str = "task"

    @property
    def index(self) -> dict[str, int]:
        return {name: row for row, name in enumerate(self.names)}

    @property
    def targets(self) -> tuple[str, ...]:
        """In ``lora.TARGETS`` order (jit returns dicts with sorted keys)."""
        return lora.validate_targets(self.a)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def save(self, path: str) -> None:
        """One safetensors file; written aside and moved into place (never half-written)."""
        from safetensors.numpy import save

        from tagi_jax import paths

        tensors = {f"a/{k}": np.asarray(v, np.float32) for k, v in self.a.items()}
        tensors |= {f"b/{k}": np.asarray(v, np.float32) for k, v in self.b.items()}
        metadata = {
            "format_version": FORMAT_VERSION,
            "index": json.dumps(self.index),
            "rank": str(self.rank),
            "alpha": repr(float(self.alpha)),
            "targets": json.dumps(list(self.targets)),
            "group_by": self.group_by,
        }
        # paths.write_bytes: local files aside then renamed, cloud objects written whole
        paths.makedirs(paths.dirname(paths.absolute(path)))
        paths.write_bytes(path, save(tensors, metadata=metadata))

    @classmethod
    def load(cls, path: str) -> TeacherBank:
        from safetensors import SafetensorError, safe_open
        from safetensors.numpy import load

        from tagi_jax import paths

        if not paths.isfile(path):
            raise FileNotFoundError(f"LoRA teacher file does not exist: {path}")
        try:
            if paths.is_local(path):  # memory-mapped
                with safe_open(path, framework="numpy") as f:
                    meta = f.metadata() or {}
                    arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
            else:  # cloud storage: one read of the object
                raw = paths.read_bytes(path)
                arrays, meta = load(raw), _safetensors_metadata(raw)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read LoRA teacher file {path}: {e}") from e
        needed = ("index", "rank", "alpha", "targets")
        missing = [k for k in needed if k not in meta]
        if missing:
            raise ValueError(f"{path} is not a LoRA teacher file: metadata lacks {missing}")
        index = json.loads(meta["index"])
        names = tuple(sorted(index, key=index.get))
        targets = json.loads(meta["targets"])
        a = {t: arrays.get(f"a/{t}") for t in targets}
        b = {t: arrays.get(f"b/{t}") for t in targets}
        absent = [t for t in targets if a[t] is None or b[t] is None]
        if absent:
            raise ValueError(f"{path} lists targets {absent} without their arrays")
        for t in targets:
            if a[t].shape[0] != len(names) or b[t].shape[0] != len(names):
                raise ValueError(f"{path}: {t} has {a[t].shape[0]} rows for {len(names)} names")
        return cls(
            names=names,
            a=a,
            b=b,
            rank=int(meta["rank"]),
            alpha=float(meta["alpha"]),
            group_by=meta.get("group_by", "task"),
        )

    def rows_for(self, names: Sequence[str], *, skip_missing: bool = False):
        """Row per example and a keep mask; an unknown name is an error unless skipped."""
        index = self.index
        unknown = sorted({n for n in names if n not in index})
        if unknown and not skip_missing:
            raise KeyError(
                f"no LoRA teacher for {self.group_by}(s) {unknown[:5]} "
                f"({len(unknown)} missing; the file has {len(index)})"
            )
        rows = np.array([index.get(n, 0) for n in names], np.int32)
        keep = np.array([n in index for n in names], bool)
        return rows, keep

    def adapters_for(self, names: Sequence[str], *, skip_missing: bool = False):
        """``(LoraAdapters [layers, batch, ...], keep [batch])``: each example's teacher.

        With ``skip_missing`` an example without a teacher gets row 0 and ``keep=False``; pass
        ``keep`` as ``example_mask`` to ``losses.adapter_alignment``.
        """
        rows, keep = self.rows_for(names, skip_missing=skip_missing)
        adapters = lora.LoraAdapters(
            a={k: jnp.swapaxes(jnp.asarray(v)[rows], 0, 1) for k, v in self.a.items()},
            b={k: jnp.swapaxes(jnp.asarray(v)[rows], 0, 1) for k, v in self.b.items()},
            scale=self.scale,
        )
        return adapters, jnp.asarray(keep)


def _safetensors_metadata(raw: bytes) -> dict:
    """The ``__metadata__`` of a safetensors file's header (an 8-byte length, then JSON)."""
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + size]).get("__metadata__", {})
