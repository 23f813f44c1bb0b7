"""The training loop behind ``python -m tagi_jax.train``: sharded, resumable; gin configures
``train`` in ``tagi_jax.configurables``, the data comes from ``tagi_jax.data.pipeline`` and the
parameters from ``training.model_setup``.

Phases (big_vision style): mesh → parameters (sharded) → trainable partition and optimizer →
restore or start → data (skipping what a restored run already consumed) → steps with progress,
JSONL metrics, periodic and SIGTERM checkpoints → final checkpoint and parameter export.

Stages are configurations of the same loop: ``finetune`` trains the TAGI student
(``TagiConfig.trainable``), ``metatrain`` trains the plain T5 on the instruction data (give a
``TagiConfig`` with no adapter targets, no fusion and ``trainable_patterns=("^t5/",)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from typing import Any

import gin
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from tagi_jax import paths as paths_lib
from tagi_jax.artifacts import backbone, export_format
from tagi_jax.data import pipeline
from tagi_jax.data.config import DataConfig
from tagi_jax.distill import losses
from tagi_jax.distill import teacher as teacher_lib
from tagi_jax.models import trainable
from tagi_jax.models.tagi_config import TagiConfig
from tagi_jax.parallel import distributed as distributed_lib
from tagi_jax.parallel import mesh as mesh_lib
from tagi_jax.parallel import partitioning
from tagi_jax.training import checkpointing, inputs, model_setup, optim
from tagi_jax.training import state as state_lib
from tagi_jax.training.flops import train_step_flops
from tagi_jax.training.progress import Progress

EXPORT_DIR = backbone.RUN_EXPORT_DIR  # <model_dir>/export: the student (export_format)
RUN_FILE = checkpointing.RUN_FILE
# on_nonfinite="skip" drops a bad batch; this many in a row means the state itself is bad.
MAX_CONSECUTIVE_SKIPS = 20


def _config_json(model: TagiConfig, loss: losses.LossConfig) -> str:
    return json.dumps({"model": repr(model), "loss": repr(loss)}, sort_keys=True)


def _check_counts(**counts) -> None:
    """Step and size settings are positive integers (a gin string ``'8'`` or a float is a
    config error here, not a TypeError deep inside the loop)."""
    for name, value in counts.items():
        if value is None and name == "stop_after":
            continue
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"train.{name} must be a positive integer, got {value!r}")


def _check_args(batch_size, grad_accum_steps, on_nonfinite, loss, paths) -> None:
    if on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"train.on_nonfinite={on_nonfinite!r} is not stop/skip")
    if batch_size < 1 or grad_accum_steps < 1 or batch_size % grad_accum_steps:
        raise ValueError(
            f"train.batch_size={batch_size} must be a positive multiple of "
            f"train.grad_accum_steps={grad_accum_steps}"
        )
    for name, path in paths.items():
        if path is not None and not paths_lib.exists(path):
            raise FileNotFoundError(f"train.{name} does not exist: {path}")
    if (loss.kl_weight or loss.standardized_kl_weight) and paths["teacher_checkpoint"] is None:
        raise ValueError("LossConfig weights the KL terms but train.teacher_checkpoint is unset")
    if loss.alignment_weight and paths["teacher_lora_bank"] is None:
        raise ValueError(
            "LossConfig.alignment_weight > 0 but train.teacher_lora_bank (the LoRA teachers "
            "written by the lora_teachers stage) is unset"
        )


def _write_run_files(model_dir, model, data, paths, seed, batch_size, train_steps):
    paths_lib.makedirs(model_dir)
    paths_lib.write_text(paths_lib.join(model_dir, "config.gin"), gin.config_str())
    paths_lib.write_json(
        paths_lib.join(model_dir, RUN_FILE),
        {
            "model": model.to_dict(),
            "base_checkpoint": paths["base_checkpoint"]
            and paths_lib.absolute(paths["base_checkpoint"]),
            "init_from": paths["init_from"] and paths_lib.absolute(paths["init_from"]),
            "instruction_encoder_checkpoint": paths["instruction_encoder_checkpoint"]
            and paths_lib.absolute(paths["instruction_encoder_checkpoint"]),
            "seed": seed,
            "data": dataclasses.asdict(data),
            "batch_size": batch_size,
            "train_steps": train_steps,
        },
    )


def _run_fingerprints(data: DataConfig, batch_size: int, base_checkpoint, init_from) -> dict:
    """What a resumed run must share with its checkpoints besides the model config: the base
    behind ``base_checkpoint`` (files, not path), the data settings (not where the data lives)
    and the batch size (the data position counts batches of it)."""
    settings = export_format.data_settings(dataclasses.asdict(data))
    if settings["vocabulary"] != "byte":  # the SentencePiece model's content, not its path
        settings["vocabulary"] = export_format.file_sha256(
            export_format.spiece_file(settings["vocabulary"])
        )[:16]
    record = {
        "data": checkpointing.fingerprint(json.dumps(settings, sort_keys=True, default=str)),
        "batch_size": int(batch_size),
    }
    if base_checkpoint is not None and init_from is None:
        record["base"] = backbone.fingerprint(base_checkpoint)
    return record


def _optimizer_record(optimizer: optim.OptimizerConfig) -> dict:
    record = dataclasses.asdict(optimizer)
    record.pop("total_steps")  # follows train_steps, which a longer resumed run changes
    return record


def _batches_consumed(meta: dict, batch_size: int) -> int:
    """The data position of a checkpoint in batches of this run (checkpoints count examples;
    older ones counted batches)."""
    if "examples" not in meta:
        return int(meta["data_position"])
    examples = int(meta["examples"])
    if examples % batch_size:
        raise ValueError(
            f"the checkpoint consumed {examples} examples, not a whole number of batches of "
            f"{batch_size}: resume with the batch size it was written with"
        )
    return examples // batch_size


CALIBRATION_FILE = "alignment_calibration.json"  # <model_dir>/: the calibrated alignment weight


def calibrate_alignment(loss: losses.LossConfig) -> bool:
    return bool(loss.alignment_weight) and loss.alignment_grad_ratio is not None


def _calibrated_loss(loss, model_dir, start, main, jit_term_gradients, state, frozen, batch):
    """``loss`` with ``alignment_weight`` set so that, on the first batch of the run, the
    alignment's gradient norm is ``alignment_grad_ratio`` times the weighted CE's. Measured
    once (before the first update, on the state the run starts from) and written to
    ``CALIBRATION_FILE``; a resumed run reads it back, so the objective never changes midway."""
    path = paths_lib.join(model_dir, CALIBRATION_FILE)
    if start > 0:
        if not paths_lib.isfile(path):
            raise FileNotFoundError(
                f"{path} is missing: this run calibrated its alignment weight at step 0 and "
                "cannot resume with the same objective without it"
            )
        weight = float(paths_lib.read_json(path)["alignment_weight"])
        return dataclasses.replace(loss, alignment_weight=weight)
    if not loss.ce_weight:
        raise ValueError(
            "LossConfig.alignment_grad_ratio calibrates the alignment against the cross-entropy, "
            "but LossConfig.ce_weight is 0; set alignment_grad_ratio=None and a fixed weight"
        )
    norms = jax.device_get(jit_term_gradients(loss)(state, frozen, batch))
    ce, align = float(norms["grad_norm/cross_entropy"]), float(norms["grad_norm/alignment"])
    if not (np.isfinite(ce) and np.isfinite(align) and align > 0 and ce > 0):
        raise FloatingPointError(
            f"cannot calibrate the alignment weight on the first batch: gradient norms CE {ce}, "
            f"alignment {align} (no example with a LoRA teacher in it?); set "
            "LossConfig.alignment_grad_ratio=None and a fixed LossConfig.alignment_weight"
        )
    weight = loss.alignment_weight * loss.alignment_grad_ratio * ce / align
    record = {
        "alignment_weight": weight,
        "alignment_grad_ratio": loss.alignment_grad_ratio,
        "first_batch": {k: float(v) for k, v in norms.items()},
        "configured_alignment_weight": loss.alignment_weight,
    }
    if main:
        paths_lib.write_json(path, record)
        print(
            f"alignment weight calibrated to {weight:.4g}: at the start its gradient norm was "
            f"{align / ce:.3g} x CE's at weight {loss.alignment_weight:g}, now "
            f"{loss.alignment_grad_ratio:g} x (written to {path})",
            flush=True,
        )
    return dataclasses.replace(loss, alignment_weight=weight)


def train(
    *,
    model_dir: str,
    model: TagiConfig,
    data: DataConfig,
    loss: losses.LossConfig | None = None,
    optimizer: optim.OptimizerConfig | None = None,
    batch_size: int = 8,
    train_steps: int = 100,
    grad_accum_steps: int = 1,
    mesh_shape: tuple[int, ...] = (-1, 1),
    mesh_axes: tuple[str, ...] = ("data", "model"),
    peak_flops_per_device: float | None = None,
    distributed: distributed_lib.DistributedConfig | None = None,
    save_every: int = 100,
    keep: int = 3,
    log_every: int = 10,
    seed: int = 0,
    base_checkpoint: str | None = None,
    teacher_checkpoint: str | None = None,
    teacher_lora_bank: str | None = None,
    instruction_encoder_checkpoint: str | None = None,
    init_from: str | None = None,
    on_nonfinite: str = "stop",
    log_term_gradients: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Trains until ``train_steps`` (resuming from ``model_dir``); returns the last metrics.

    ``batch_size`` is global (all hosts together); ``grad_accum_steps`` splits it into that many
    sequential micro-batches. ``peak_flops_per_device`` (mesh gin files) turns on MFU.
    ``base_checkpoint``: the frozen backbone (HF dir, parameter checkpoint or a finished run);
    ``init_from``: a finished run of the same architecture whose exported student is the start
    (the hypernetwork pretraining -> fine-tuning hand-off); ``teacher_checkpoint``: the logit
    teacher; ``teacher_lora_bank``: the ``lora_teachers`` stage's bank file;
    ``instruction_encoder_checkpoint``: the weights of a ``separate`` instruction encoder
    (default: the teacher's encoder; see ``model_setup.instruction_encoder_source``).
    ``on_nonfinite``: ``stop`` (raise, naming the step; the last good checkpoint stays) or
    ``skip`` (drop the batch and go on). ``log_term_gradients``: with more than one weighted
    loss term, log each term's gradient norm and share (``state.term_gradients``) at every
    logging step (about one extra step's compute per term there). ``stop_after`` ends this
    process's work after that many steps (tests use it to simulate a kill; gin cannot bind it).
    Gin configures it as ``train`` (``tagi_jax.configurables``).
    """
    # Without teachers (the default) the objective is the cross-entropy alone.
    loss = loss or losses.LossConfig(ce_weight=1.0, kl_weight=0.0, alignment_weight=0.0)
    optimizer = optimizer or optim.OptimizerConfig()
    paths = {
        "base_checkpoint": base_checkpoint,
        "teacher_checkpoint": teacher_checkpoint,
        "teacher_lora_bank": teacher_lora_bank,
        "instruction_encoder_checkpoint": instruction_encoder_checkpoint,
        "init_from": init_from,
    }
    # Resolved here (the teacher's encoder by default) and recorded in run.json as such, so
    # export and evaluation rebuild the same frozen encoder.
    encoder_source = model_setup.instruction_encoder_source(
        model, instruction_encoder_checkpoint, teacher_checkpoint, init_from
    )
    paths["instruction_encoder_checkpoint"] = encoder_source
    _check_counts(
        batch_size=batch_size,
        train_steps=train_steps,
        grad_accum_steps=grad_accum_steps,
        save_every=save_every,
        keep=keep,
        log_every=log_every,
        stop_after=stop_after,
    )
    _check_args(batch_size, grad_accum_steps, on_nonfinite, loss, paths)
    # The data is checked (files, splits, schema, one formatted example per task) before any
    # model work: a bad file is one line in seconds, not a TensorFlow traceback after the build.
    pipeline.preflight(data)
    distributed_lib.initialize(distributed)
    main = distributed_lib.is_main_process()
    paths_lib.makedirs(model_dir)
    # One trainer per directory (the main process holds the lock for all of them).
    with checkpointing.RunLock(model_dir) if main else contextlib.nullcontext():
        return _train(
            model_dir=model_dir,
            model=model,
            data=data,
            loss=loss,
            optimizer=optimizer,
            batch_size=batch_size,
            train_steps=train_steps,
            grad_accum_steps=grad_accum_steps,
            mesh_shape=mesh_shape,
            mesh_axes=mesh_axes,
            peak_flops_per_device=peak_flops_per_device,
            save_every=save_every,
            keep=keep,
            log_every=log_every,
            seed=seed,
            base_checkpoint=base_checkpoint,
            teacher_checkpoint=teacher_checkpoint,
            teacher_lora_bank=teacher_lora_bank,
            init_from=init_from,
            on_nonfinite=on_nonfinite,
            log_term_gradients=log_term_gradients,
            stop_after=stop_after,
            paths=paths,
            encoder_source=encoder_source,
            main=main,
        )


def _train(
    *,
    model_dir: str,
    model: TagiConfig,
    data: DataConfig,
    loss: losses.LossConfig,
    optimizer: optim.OptimizerConfig,
    batch_size: int,
    train_steps: int,
    grad_accum_steps: int,
    mesh_shape: tuple[int, ...],
    mesh_axes: tuple[str, ...],
    peak_flops_per_device: float | None,
    save_every: int,
    keep: int,
    log_every: int,
    seed: int,
    base_checkpoint: str | None,
    teacher_checkpoint: str | None,
    teacher_lora_bank: str | None,
    init_from: str | None,
    on_nonfinite: str,
    log_term_gradients: bool,
    stop_after: int | None,
    paths: dict[str, str | None],
    encoder_source: str | None,
    main: bool,
) -> dict[str, Any]:
    """``train`` after its checks, with the run directory locked."""
    # --- mesh --------------------------------------------------------------------------
    mesh = mesh_lib.make_mesh(mesh_shape, mesh_axes)
    data_parallel = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    if batch_size % data_parallel:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by the data-parallel mesh axes "
            f"(data x fsdp = {data_parallel}, mesh {dict(mesh.shape)})"
        )
    rules = partitioning.DEFAULT_RULES
    scalar = NamedSharding(mesh, PartitionSpec())
    # --- parameters and state, created sharded -------------------------------------------
    base = encoder = None
    if base_checkpoint is not None and init_from is None:
        base = backbone.load_t5(base_checkpoint, mesh)[1]
    if encoder_source is not None:
        encoder = model_setup.load_instruction_encoder(encoder_source, mesh)
    params, param_shardings = model_setup.sharded_params(
        model, mesh, rules, seed, base, init_from, instruction_encoder=encoder
    )
    del base, encoder
    mask = trainable.trainable_mask(model, params)
    structure = jax.tree.structure(params)
    train_params, frozen = state_lib.partition(params, mask)
    train_shardings, frozen_shardings = state_lib.partition(param_shardings, mask)
    if not train_params:
        raise ValueError(
            "nothing trains: the TagiConfig trainable preset/patterns select no parameter"
        )
    n_train, n_total = trainable.count(params, mask)
    del params
    optimizer = dataclasses.replace(optimizer, total_steps=max(train_steps, 1))
    tx = optim.make_optimizer(optimizer)
    learning_rate = optim.schedule(optimizer)  # for the logs
    abstract_trainable = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), train_params
    )
    state_shardings = state_lib.state_shardings(tx, abstract_trainable, train_shardings, scalar)
    init_state = functools.partial(state_lib.init_state, optimizer=tx, seed=seed)
    state = jax.jit(init_state, out_shardings=state_shardings)(train_params)
    backbone_trains = any(k.startswith("t5/") for k in train_params)  # for the FLOPs count
    del train_params  # the state holds them now
    # --- restore or start --------------------------------------------------------------
    ckpt = checkpointing.Checkpointer(
        model_dir,
        config_json=_config_json(model, loss),
        keep=keep,
        run_fingerprints=_run_fingerprints(data, batch_size, base_checkpoint, init_from),
        optimizer=_optimizer_record(optimizer),
    )
    position = 0  # batches consumed
    if ckpt.latest_step() is not None:
        try:
            state, meta = ckpt.restore(state)
        except BaseException:
            ckpt.close()
            raise
        position = _batches_consumed(meta, batch_size)
        if main:
            print(f"resumed from {ckpt.directory}/{int(state.step)} (step {int(state.step)})")
    start = int(state.step)
    if start > train_steps:
        ckpt.close()
        raise ValueError(
            f"{model_dir} is already at step {start}, past train.train_steps={train_steps}: "
            f"set TRAIN_STEPS above {start} to train further, or use a fresh MODEL_DIR"
        )
    # Only now, after a checkpoint of another config has been refused: never rewrite the run
    # files of a model directory that belongs to another model.
    if main:
        _write_run_files(model_dir, model, data, paths, seed, batch_size, train_steps)
    if main and start == train_steps:
        print(
            f"{model_dir} already finished its {train_steps} steps (nothing to train): set "
            f"TRAIN_STEPS above {train_steps} to train further; the export is "
            f"{'rewritten' if not paths_lib.isdir(paths_lib.join(model_dir, EXPORT_DIR)) else 'kept'}",
            flush=True,
        )
    elif main:
        print(
            f"training {n_train:,} of {n_total:,} parameters on {jax.device_count()} device(s) "
            f"in {jax.process_count()} process(es), mesh {dict(mesh.shape)}, "
            f"steps {start}->{train_steps}, batch {batch_size}",
            flush=True,
        )
    # --- teachers ------------------------------------------------------------------------
    teacher_fn = None
    if loss.kl_weight or loss.standardized_kl_weight:
        teacher = teacher_lib.load_teacher(backbone.resolve(teacher_checkpoint), mesh=mesh)
        logits_sharding = partitioning.named_sharding(mesh, ("batch", "length", "vocab"), rules)
        teacher_jit = jax.jit(
            lambda p, t, d: teacher_lib.teacher_logits(
                teacher_lib.LogitTeacher(teacher.config, p), t, d
            ),
            out_shardings=logits_sharding,
        )
        teacher_fn = functools.partial(teacher_jit, teacher.params)
    teacher_adapters = None
    if loss.alignment_weight:
        teacher_adapters = inputs.TeacherAdapters(teacher_lora_bank, data, mesh, rules)

    # --- the step: one jitted pure function, explicit shardings, donated state -------------
    def jit_step(objective):
        step_config = state_lib.StepConfig(
            model,
            objective,
            grad_accum_steps=grad_accum_steps,
            # "skip" goes on from the state before a bad update; "stop" discards the state.
            rollback_nonfinite_updates=on_nonfinite == "skip",
        )
        return jax.jit(
            functools.partial(state_lib.train_step, step_config, tx, structure),
            in_shardings=(state_shardings, frozen_shardings, None),  # batch: rows on data
            out_shardings=(state_shardings, scalar),
            donate_argnums=(0,),
        )

    def jit_term_gradients(objective):
        step_config = state_lib.StepConfig(model, objective, grad_accum_steps=grad_accum_steps)
        return jax.jit(
            functools.partial(state_lib.term_gradients, step_config, structure),
            in_shardings=(state_shardings, frozen_shardings, None),
            out_shardings=scalar,
        )

    compiled = term_gradients = None
    skipped = 0  # consecutive non-finite batches (on_nonfinite="skip")
    # Each process reads only its devices' rows of the global batch, and a resumed run starts
    # at its position by index (nothing before it is formatted or tokenized).
    train_input = inputs.TrainInput(
        data,
        batch_size,
        seed,
        mesh,
        rules,
        start_batch=position,
        with_teacher=teacher_fn is not None,
    )
    progress = None
    last: dict[str, float] = {}
    step = start
    try:
        with checkpointing.PreemptionGuard() as guard, partitioning.use_mesh(mesh, rules):
            while step < train_steps:
                numpy_batch, batch = next(train_input)  # this process's rows; global arrays
                position += 1
                if teacher_fn is not None:
                    teacher_tokens = batch.pop("teacher_input_tokens")
                    batch["teacher_logits"] = teacher_fn(
                        teacher_tokens, batch["decoder_input_tokens"]
                    )
                if teacher_adapters is not None:
                    batch.update(teacher_adapters(numpy_batch, train_input))
                if compiled is None:
                    if calibrate_alignment(loss):
                        loss = _calibrated_loss(
                            loss, model_dir, start, main, jit_term_gradients, state, frozen, batch
                        )
                    compiled = jit_step(loss).lower(state, frozen, batch).compile()
                    if log_term_gradients and len(loss.weighted_terms()) > 1:
                        term_gradients = jit_term_gradients(loss)
                    flops = train_step_flops(
                        model,
                        batch_size,
                        numpy_batch["encoder_input_tokens"].shape[1],
                        numpy_batch["hyper_input_tokens"].shape[1],
                        numpy_batch["decoder_target_tokens"].shape[1],
                        backbone_trains=backbone_trains,
                    )
                    peak = peak_flops_per_device and peak_flops_per_device * jax.device_count()
                    progress = Progress(
                        model_dir,
                        train_steps,
                        start,
                        enabled=main,
                        flops_per_step=flops,
                        peak_flops=peak,
                    )
                logging_step = (step + 1) % log_every == 0 or step + 1 == train_steps
                shares = {}
                if term_gradients is not None and logging_step:
                    # on the state before the update, like the step's own gradient
                    shares = jax.device_get(term_gradients(state, frozen, batch))
                state, metrics = compiled(state, frozen, batch)
                # Reading the metrics blocks on the step: queued CPU collectives deadlock.
                values = {k: float(v) for k, v in metrics.items()}
                values.update({k: float(v) for k, v in shares.items()})
                if values["update_skipped"]:
                    what = (
                        f"non-finite loss at step {step + 1} (loss {values['loss']})"
                        if not values["nonfinite_update"]
                        else f"the update of step {step + 1} made the parameters or optimizer "
                        f"state non-finite (loss {values['loss']:.4g}, gradient norm "
                        f"{values['grad_norm']:.4g}): lower the learning rate or clip gradients"
                    )
                    if on_nonfinite == "stop":
                        raise FloatingPointError(
                            f"{what}; stopped, the last good checkpoint in {ckpt.directory} is kept"
                        )
                    skipped += 1
                    if skipped > MAX_CONSECUTIVE_SKIPS:
                        raise FloatingPointError(
                            f"{skipped} batches in a row gave a non-finite loss at step "
                            f"{step + 1}: the model itself is broken, not one batch; the last "
                            f"good checkpoint in {ckpt.directory} is kept"
                        )
                    progress.message(f"skipped batch {position}: {what}")
                    continue
                skipped = 0
                step += 1
                last = values
                # this process's tokens, scaled to the global batch
                progress.count(
                    round(train_input.local_tokens(numpy_batch) * train_input.tokens_scale)
                )
                if step % log_every == 0 or step == train_steps:
                    values["learning_rate"] = float(learning_rate(step))
                    last = progress.log(step, values)
                preempted = guard.should_stop(step)  # every step, on every host
                if step % save_every == 0 or preempted or step == train_steps:
                    ckpt.save(step, state, examples=position * batch_size)
                if preempted:
                    progress.message(f"SIGTERM: saved step {step} to {ckpt.directory}; exiting")
                    break
                if stop_after is not None and step - start >= stop_after:
                    break
    finally:
        # Close the input pipeline now, not at interpreter exit: a tf.data iterator finalised
        # during shutdown (after an error ended the loop) can abort the process
        # ("terminate called without an active exception") instead of exiting with the error.
        train_input.close()
        if progress is not None:
            progress.close()
        ckpt.close()
    already_exported = start == train_steps and paths_lib.isdir(
        paths_lib.join(model_dir, EXPORT_DIR)
    )
    if step == train_steps and not already_exported:
        full = state_lib.merge(state.trainable, frozen, structure)
        model_setup.export_params(model_dir, model, full, data, step)
        if main:
            paths_lib.write_text(
                paths_lib.join(model_dir, "operative_config.gin"), gin.operative_config_str()
            )
            where = progress.metrics_path if progress is not None else model_dir
            print(f"checkpoints in {ckpt.directory}, metrics in {where} and tensorboard/")
    return last
