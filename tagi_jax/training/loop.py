"""The training loop behind ``python -m tagi_jax.train``: gin-configured, sharded, resumable.

Phases (big_vision style): mesh → parameters (sharded) → trainable partition and optimizer →
restore or start → data (skipping what a restored run already consumed) → steps with progress,
JSONL metrics, periodic and SIGTERM checkpoints → final checkpoint and parameter export.

Stages are configurations of the same loop: ``finetune`` trains the TAGI student
(``TagiConfig.trainable``), ``metatrain`` trains the plain T5 on the instruction data (give a
``TagiConfig`` with no adapter targets, no fusion and ``trainable_patterns=("^t5/",)``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import gin
import jax
import jax.numpy as jnp

from tagi_jax.distill import losses
from tagi_jax.distill import teacher as teacher_lib
from tagi_jax.models import tagi, trainable
from tagi_jax.models.tagi_config import TagiConfig
from tagi_jax.parallel import mesh as mesh_lib
from tagi_jax.parallel import partitioning
from tagi_jax.training import checkpointing, optim
from tagi_jax.training import state as state_lib

MODEL_FEATURES = (
    "encoder_input_tokens",
    "hyper_input_tokens",
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_loss_weights",
)
EXPORT_DIR = "export"  # <model_dir>/export/{t5,tagi}: the trained parameters (orbax)


@gin.configurable("DataConfig")
@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which SeqIO task to train on and where its data lives (registered on demand).

    Attributes:
      task: the SeqIO task or mixture name (e.g. ``tagi_suite_def_pos2``).
      feature_lengths: ``inputs``, ``hyper_inputs``, ``teacher_inputs``, ``targets`` lengths.
      sni_dir, suite_dir, p3_dir: data directories passed to ``register_tasks``.
      vocabulary: ``byte`` or a SentencePiece path (a checkpoint directory or spiece.model).
      student_input: how the student's input is built for natural-instructions data.
    """

    task: str = gin.REQUIRED
    feature_lengths: tuple[tuple[str, int], ...] = (
        ("inputs", 1024),
        ("hyper_inputs", 1024),
        ("teacher_inputs", 1024),
        ("targets", 128),
    )
    sni_dir: str | None = None
    suite_dir: str | None = None
    p3_dir: str | None = None
    vocabulary: str = "byte"
    student_input: str = "definition_and_input"
    max_train_instances_per_task: int | None = 100


def make_vocabulary(data: DataConfig):
    from tagi_jax.data import vocab

    if data.vocabulary == "byte":
        return vocab.get_vocabulary("byte")
    return vocab.get_vocabulary("sentencepiece", data.vocabulary)


def register_data(data: DataConfig, vocabulary) -> None:
    from tagi_jax.data import ni, tasks

    for path in (data.sni_dir, data.suite_dir, data.p3_dir):
        if path is not None and not os.path.isdir(path):
            raise FileNotFoundError(f"data directory does not exist: {path}")
    config = ni.NIConfig(
        student_input=data.student_input,
        max_train_instances_per_task=data.max_train_instances_per_task,
    )
    tasks.register_tasks(
        vocabulary=vocabulary,
        sni_dir=data.sni_dir,
        suite_dir=data.suite_dir,
        p3_dir=data.p3_dir,
        sni_config=config,
    )


def train_batches(data: DataConfig, batch_size: int, seed: int, skip: int) -> Iterator[dict]:
    """Endless numpy batches of the training split, in a seed-fixed order, after ``skip``."""
    import seqio

    from tagi_jax.data import feature_converter

    vocabulary = make_vocabulary(data)
    register_data(data, vocabulary)
    conv = feature_converter.TagiFeatureConverter()
    ds = seqio.get_dataset(
        data.task,
        task_feature_lengths=conv.task_feature_lengths(dict(data.feature_lengths)),
        dataset_split="train",
        shuffle=True,
        seed=seed,
        num_epochs=None,
        feature_converter=conv,
    )
    batches = feature_converter.numpy_batches(ds, batch_size)
    for _ in range(skip):
        next(batches)
    yield from batches


class Progress:
    """A one-line progress bar on a terminal, plain log lines otherwise; JSONL metrics."""

    def __init__(self, model_dir: str, total: int, start: int):
        self.total, self.start_step = total, start
        self.start_time = time.time()
        self.tty = sys.stdout.isatty()
        self.metrics_file = open(os.path.join(model_dir, "metrics.jsonl"), "a")  # noqa: SIM115

    def log(self, step: int, metrics: dict[str, float], tokens_per_second: float) -> None:
        done = step - self.start_step
        elapsed = time.time() - self.start_time
        eta = elapsed / max(done, 1) * (self.total - step)
        line = (
            f"step {step}/{self.total}  loss {metrics['loss']:.4f}  "
            f"tokens/s {tokens_per_second:,.0f}  ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        )
        if self.tty:
            print("\r" + line, end="", flush=True)
        else:
            print(line, flush=True)
        record = {"step": step, "time": time.time(), "tokens_per_second": tokens_per_second}
        self.metrics_file.write(json.dumps(record | metrics) + "\n")
        self.metrics_file.flush()

    def close(self) -> None:
        if self.tty:
            print()
        self.metrics_file.close()


def _config_json(model: TagiConfig, loss: losses.LossConfig) -> str:
    return json.dumps({"model": repr(model), "loss": repr(loss)}, sort_keys=True)


def _load_base(path: str):
    """T5 parameters from a parameter checkpoint, a finished run's model_dir, or an HF dir."""
    from tagi_jax.convert import hf_t5, param_checkpoint

    exported = os.path.join(path, EXPORT_DIR, "t5")
    for candidate in (path, exported):
        if os.path.exists(os.path.join(candidate, param_checkpoint.CONFIG_FILE)):
            return param_checkpoint.load(candidate)
    return hf_t5.load(path)


@gin.configurable("train", denylist=["stop_after"])
def train(
    *,
    model_dir: str = gin.REQUIRED,
    model: TagiConfig = gin.REQUIRED,
    data: DataConfig = gin.REQUIRED,
    loss: losses.LossConfig | None = None,
    optimizer: optim.OptimizerConfig | None = None,
    batch_size: int = 8,
    train_steps: int = 100,
    mesh_shape: tuple[int, ...] = (-1, 1),
    mesh_axes: tuple[str, ...] = ("data", "model"),
    save_every: int = 100,
    keep: int = 3,
    log_every: int = 10,
    seed: int = 0,
    base_checkpoint: str | None = None,
    teacher_checkpoint: str | None = None,
    on_nonfinite: str = "stop",
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Trains until ``train_steps`` (resuming from ``model_dir``); returns the last metrics.

    ``stop_after`` ends the process's work after that many steps (tests use it to simulate a
    kill); ``on_nonfinite``: ``stop`` (raise, naming the step; the last checkpoint stays) or
    ``skip`` (drop the batch and go on).
    """
    # Without teachers (the default) the objective is the cross-entropy alone.
    loss = loss or losses.LossConfig(ce_weight=1.0, kl_weight=0.0, alignment_weight=0.0)
    optimizer = optimizer or optim.OptimizerConfig()
    if on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"train.on_nonfinite={on_nonfinite!r} is not stop/skip")
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "config.gin"), "w") as f:
        f.write(gin.config_str())
    # --- mesh --------------------------------------------------------------------------
    mesh = mesh_lib.make_mesh(mesh_shape, mesh_axes)
    data_size = mesh.shape.get("data", 1)
    if batch_size % data_size:
        raise ValueError(f"batch_size={batch_size} is not divisible by the data axis ({data_size})")
    rules = partitioning.DEFAULT_RULES
    # --- parameters --------------------------------------------------------------------
    base = None
    if base_checkpoint is not None:
        if not os.path.isdir(base_checkpoint):
            raise FileNotFoundError(f"base checkpoint does not exist: {base_checkpoint}")
        _, base = _load_base(base_checkpoint)
    params = tagi.init_params(model, jax.random.key(seed), t5_params=base)
    shardings = partitioning.logical_to_shardings(tagi.param_logical_axes(model), mesh, rules)
    params = jax.device_put(params, shardings)
    mask = trainable.trainable_mask(model, params)
    structure = jax.tree.structure(params)
    train_params, frozen = state_lib.partition(params, mask)
    n_train, n_total = trainable.count(params, mask)
    optimizer = dataclasses.replace(optimizer, total_steps=max(train_steps, 1))
    tx = optim.make_optimizer(optimizer)
    step_config = state_lib.StepConfig(model, loss)
    with partitioning.use_mesh(mesh, rules):
        state = jax.jit(functools.partial(state_lib.init_state, optimizer=tx, seed=seed))(
            train_params
        )
    # --- restore or start --------------------------------------------------------------
    ckpt = checkpointing.Checkpointer(model_dir, config_json=_config_json(model, loss), keep=keep)
    position = 0
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
        position = meta["data_position"]
        print(f"resumed from {ckpt.directory}/{ckpt.latest_step()} (step {int(state.step)})")
    start = int(state.step)
    print(
        f"training {n_train:,} of {n_total:,} parameters on {jax.device_count()} device(s), "
        f"mesh {dict(mesh.shape)}, steps {start}->{train_steps}, batch {batch_size}"
    )
    # --- teacher -----------------------------------------------------------------------
    teacher = None
    if loss.kl_weight or loss.standardized_kl_weight:
        if teacher_checkpoint is None:
            raise ValueError(
                "LossConfig weights the KL terms but train.teacher_checkpoint is unset"
            )
        teacher = teacher_lib.load_teacher(teacher_checkpoint)
        teacher_fn = jax.jit(functools.partial(teacher_lib.teacher_logits, teacher))
    # --- step --------------------------------------------------------------------------
    data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    step_fn = jax.jit(
        functools.partial(state_lib.train_step, step_config, tx, structure),
        donate_argnums=(0,),
    )
    batches = train_batches(data, batch_size, seed, skip=position)
    progress = Progress(model_dir, train_steps, start)
    last: dict[str, float] = {}
    step = start
    tokens = 0
    window_start = time.time()
    try:
        with checkpointing.PreemptionGuard() as guard, partitioning.use_mesh(mesh, rules):
            while step < train_steps:
                numpy_batch = next(batches)
                position += 1
                batch = {
                    k: jax.device_put(jnp.asarray(numpy_batch[k]), data_sharding)
                    for k in MODEL_FEATURES
                }
                if teacher is not None:
                    batch["teacher_logits"] = teacher_fn(
                        jnp.asarray(numpy_batch["teacher_input_tokens"]),
                        batch["decoder_input_tokens"],
                    )
                state, metrics = step_fn(state, frozen, batch)
                # Reading the loss blocks on the step: queued CPU collectives deadlock.
                values = {k: float(v) for k, v in metrics.items()}
                tokens += int(numpy_batch["decoder_loss_weights"].sum())
                tokens += int((numpy_batch["encoder_input_tokens"] > 0).sum())
                if values["update_skipped"]:
                    if on_nonfinite == "stop":
                        raise FloatingPointError(
                            f"non-finite loss at step {step + 1} (loss {values['loss']}); "
                            f"stopped, the last good checkpoint in {ckpt.directory} is kept"
                        )
                    print(f"skipped batch {position}: non-finite loss at step {step + 1}")
                    continue
                step += 1
                last = values
                if step % log_every == 0 or step == train_steps:
                    elapsed = max(time.time() - window_start, 1e-9)
                    values["learning_rate"] = float(optim.schedule(optimizer)(step))
                    progress.log(step, values, tokens / elapsed)
                    tokens, window_start = 0, time.time()
                if step % save_every == 0 or guard.requested or step == train_steps:
                    ckpt.save(step, state, data_position=position)
                if guard.requested:
                    print(f"SIGTERM: saved step {step} to {ckpt.directory}; exiting")
                    break
                if stop_after is not None and step - start >= stop_after:
                    break
    finally:
        progress.close()
        ckpt.close()
    if step == train_steps:
        export_params(model_dir, model, state_lib.merge(state.trainable, frozen, structure))
        with open(os.path.join(model_dir, "operative_config.gin"), "w") as f:
            f.write(gin.operative_config_str())
        print(f"checkpoints in {ckpt.directory}, metrics in {progress.metrics_file.name}")
    return last


def export_params(model_dir: str, model: TagiConfig, params) -> str:
    """``<model_dir>/export/``: ``t5/`` (the backbone as a parameter checkpoint, loadable as a
    base) and ``tagi/`` (the whole student). Written aside and moved into place, so a finished
    run always leaves a complete export."""
    import shutil

    import orbax.checkpoint as ocp

    from tagi_jax.convert import param_checkpoint

    target = os.path.join(os.path.abspath(model_dir), EXPORT_DIR)
    tmp = target + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    param_checkpoint.save(os.path.join(tmp, "t5"), model.t5, params["t5"])
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(tmp, "tagi", "params"), params)
    checkpointer.wait_until_finished()
    with open(os.path.join(tmp, "tagi", "tagi_config.txt"), "w") as f:
        f.write(repr(model))
    if os.path.exists(target):
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def load_exported(model_dir: str, model: TagiConfig):
    """The whole student ``export_params`` wrote, for evaluation."""
    import orbax.checkpoint as ocp

    path = os.path.join(os.path.abspath(model_dir), EXPORT_DIR, "tagi", "params")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no exported parameters at {path}: has training finished?")
    return ocp.StandardCheckpointer().restore(path, tagi.abstract_params(model))
