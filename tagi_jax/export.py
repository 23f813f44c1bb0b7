"""``python -m tagi_jax.export``: write a trained student for others to use.

Three outputs, one source format (``tagi_jax.artifacts.export_format``, which also says what an
export holds):

* ``--model_dir D --out E [--step N] [--base_by_reference]``: the export of a training run's
  checkpoint (default: the latest). A finished run already holds one for its last step
  (``D/export``); this writes one for any step. The backbone is included unless
  ``--base_by_reference`` (then kept by path + fingerprint, when none of it trained).
* ``--peft --export E --instruction "..." --out P``: the adapters TAGI generates for one
  instruction as a PEFT LoRA directory on top of the HF export of the base
  (``tagi_jax.convert.peft_export``), for PyTorch users.
* ``--hf --export E --out H [--instruction "..."]``: the student's backbone (with
  ``--instruction``: merged with that task's adapters) as a Hugging Face T5 directory with its
  tokenizer files (``tagi_jax.convert.hf_export``).

Every output is written aside and renamed, so it is complete or absent. Every path may be local
or in cloud storage (``gs://...``, ``tagi_jax.paths``): there the rename is a copy whose marker
file (``tagi_config.json``, ``config.json``, ``adapter_config.json``) comes last. ``--overwrite`` only
ever replaces a previous output of the same kind (``export_format.check_replaceable``): an
``--out`` that is, contains or lies inside a training run, or the export / base it is made from,
or that is anything but that kind of output (a file, a directory without its marker file or with
files its writer does not write) is refused. Parameters holding NaN or Inf are refused too (a
diverged run: export an earlier ``--step``). Bad input is one ``error:`` line, exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from typing import Any

import jax
import numpy as np

from tagi_jax import paths
from tagi_jax.artifacts import backbone, export_format
from tagi_jax.artifacts.export_format import ExportError, listing
from tagi_jax.models import tagi, trainable
from tagi_jax.models.tagi_config import TagiConfig
from tagi_jax.training.checkpointing import CHECKPOINTS_DIR, RUN_FILE

Flat = dict[str, Any]


def _mib(path: str) -> float:
    total = 0
    for root, _, files in paths.walk(path):
        total += sum(paths.getsize(paths.join(root, f)) for f in files)
    return total / 2**20


def _nbytes(flat: Flat) -> float:
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in flat.values()) / 2**20


@contextlib.contextmanager
def _quiet_absl():
    """Orbax logs a WARNING for every read-only manager ("setting save_interval_steps=0"...):
    noise for a tool that only reads checkpoints."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _single_device_target(tree):
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


# --- reading a run -----------------------------------------------------------------------------


def read_run(model_dir: str) -> dict:
    """``run.json`` of a training run, with ``model`` turned into a ``TagiConfig``."""
    model_dir = paths.absolute(model_dir)
    if not paths.isdir(model_dir):
        raise FileNotFoundError(f"model_dir does not exist: {model_dir}")
    path = paths.join(model_dir, RUN_FILE)
    if not paths.isfile(path):
        raise FileNotFoundError(
            f"no {RUN_FILE} in {model_dir}: not a tagi_jax.train run directory (or one written "
            "before run records existed)"
        )
    try:
        run = paths.read_json(path)
        run["model"] = TagiConfig.from_dict(run["model"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ExportError(f"cannot read {path}: {e}") from e
    return run


def _checkpoint_manager(model_dir: str):
    import orbax.checkpoint as ocp

    directory = paths.join(model_dir, CHECKPOINTS_DIR)
    if not paths.isdir(directory):
        raise FileNotFoundError(f"no checkpoint in {model_dir} ({directory} does not exist)")
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    with _quiet_absl():
        options = ocp.CheckpointManagerOptions(read_only=True, create=False)
        return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def restore_trainable(model_dir: str, model: TagiConfig, step: int | None = None):
    """``(step, trainable)``: the flat trainable partition of checkpoint ``step`` (default: the
    latest), checked against the config's trainable mask and shapes."""
    import orbax.checkpoint as ocp

    manager = _checkpoint_manager(model_dir)
    try:
        steps = list(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {manager.directory}")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {manager.directory} (available steps: "
                f"{', '.join(map(str, sorted(steps)))})"
            )
        with _quiet_absl():
            metadata = manager.item_metadata(step)["state"]
        if metadata is None or "trainable" not in metadata:
            raise ExportError(f"{manager.directory}/{step}/state holds no trainable partition")
        abstract = trainable.flatten(tagi.abstract_params(model))
        mask = trainable.flatten(trainable.trainable_mask(model, tagi.abstract_params(model)))
        expected = {p for p, t in mask.items() if t}
        saved = set(metadata["trainable"])
        if saved != expected:
            raise ExportError(
                f"checkpoint {manager.directory}/{step} does not match the trainable mask of "
                f"{RUN_FILE}'s model: only in the checkpoint: {listing(saved - expected) or '-'}; "
                f"only in the mask: {listing(expected - saved) or '-'}"
            )
        wrong = [
            f"{p} {tuple(metadata['trainable'][p].shape)} (config: {tuple(abstract[p].shape)})"
            for p in sorted(saved)
            if tuple(metadata["trainable"][p].shape) != tuple(abstract[p].shape)
        ]
        if wrong:
            raise ExportError(
                f"checkpoint {manager.directory}/{step} has shapes the config does not: "
                + "; ".join(wrong[:8])
            )
        # The whole state is restored (orbax's standard restore wants the full tree) and only
        # the trainable partition is kept: the optimizer state is of no use to inference.
        target = _single_device_target(metadata)
        with _quiet_absl():
            restored = manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            )
        return step, dict(restored["state"]["trainable"])
    finally:
        manager.close()


def _initial_params(
    model: TagiConfig,
    seed: int,
    trained: Flat,
    base_checkpoint,
    init_from,
    instruction_encoder_checkpoint=None,
):
    """``(initial, provided)``: the run's initial parameters as a flat dict (every leaf the
    checkpoint's trainable partition does not replace), and the ``t5/`` paths its backbone
    source provides.

    The loop creates parameters with a jitted init (``model_setup.sharded_params``); an eager
    ``tagi.init_params`` differs from it in the last bit (XLA fuses the initialisers), so when
    a frozen parameter comes from the seed it is rebuilt by that same function (on a one-device
    mesh). When the base provides every frozen parameter (the usual TAGI run) no initialisation
    runs at all: the loop's init passes grafted base leaves through unchanged, and a random
    backbone of billions of parameters would only be thrown away.
    """
    # The trainer's model setup builds the initial parameters; only a run whose frozen
    # parameters are not all in its base (seed-initialised ones) needs it: imported here.
    from tagi_jax.parallel import mesh as mesh_lib
    from tagi_jax.parallel import partitioning
    from tagi_jax.training import model_setup

    source = init_from or base_checkpoint
    base = None
    if source is not None:
        _, base = backbone.load_t5(source)
        what = "the initial student's backbone" if init_from else "the base"
        print(f"loaded {what} from {source}")
    base_flat = (
        {f"t5/{p}": v for p, v in trainable.flatten(base).items()} if base is not None else {}
    )
    frozen = set(trainable.flatten(tagi.abstract_params(model))) - set(trained)
    if frozen <= set(base_flat):
        # (an init_from run's export/t5 is its exported student's backbone, bit for bit)
        return base_flat, set(base_flat)
    mesh = mesh_lib.make_mesh((1, 1), ("data", "model"), devices=jax.devices()[:1])
    graft = None if init_from is not None else base
    encoder = None
    if instruction_encoder_checkpoint is not None and init_from is None:
        # the frozen separate instruction encoder the run loaded (the teacher's, by default)
        encoder = model_setup.load_instruction_encoder(instruction_encoder_checkpoint)
        print(f"loaded the instruction encoder from {instruction_encoder_checkpoint}")
    params, _ = model_setup.sharded_params(
        model, mesh, partitioning.DEFAULT_RULES, seed, graft, init_from, instruction_encoder=encoder
    )
    reason = "the initial student" if init_from else f"seed {seed}'s initialisation"
    print(f"rebuilt {len(frozen - set(base_flat))} frozen tensors from {reason}")
    return trainable.flatten(params), set(base_flat)


# --- export ------------------------------------------------------------------------------------


def export_run(
    model_dir: str,
    out: str,
    *,
    step: int | None = None,
    base_by_reference: bool = False,
    overwrite: bool = False,
) -> str:
    """Writes the export of ``model_dir``'s checkpoint ``step`` (default: latest) to ``out``;
    returns ``out``'s absolute path. ``base_by_reference``: keep the backbone by path and
    fingerprint (only when the run has a base and none of its ``t5/`` parameters trained).
    ``out`` is checked first (``export_format.check_replaceable``: not in, over or above a run,
    nor the run's base; an existing export is replaced only with ``overwrite``); a checkpoint
    holding NaN or Inf is refused (``export_format.NonFiniteParamsError``)."""
    model_dir = paths.absolute(model_dir)
    run = read_run(model_dir)
    model: TagiConfig = run["model"]
    seed = int(run.get("seed", 0))
    init_from = run.get("init_from")
    # Where the run's frozen backbone came from: an `init_from` run replaces the whole student
    # (its export/t5 holds that backbone), otherwise the base checkpoint grafted onto the
    # seed's initialisation.
    base_path = init_from or run.get("base_checkpoint")
    # Refused before the (long) restore; an export by reference needs its base intact.
    rule = {
        "overwrite": overwrite,
        "sources": [model_dir, *([base_path] if base_path else [])],
        "allow_run_export": False,  # the run's own export is the run's to write
    }
    out = export_format.check_replaceable(out, "export", **rule)

    step, trained = restore_trainable(model_dir, model, step)
    print(
        f"restored step {step}: {len(trained)} trainable tensors ({_nbytes(trained):.2f} MiB) "
        f"from {paths.join(model_dir, CHECKPOINTS_DIR, str(step))}"
    )
    initial, provided = _initial_params(
        model,
        seed,
        trained,
        run.get("base_checkpoint"),
        init_from,
        run.get("instruction_encoder_checkpoint"),
    )
    reference = None
    if base_by_reference:
        trained_t5 = sorted(p for p in trained if p.startswith("t5/"))
        if base_path is None or trained_t5:
            why = (
                "the run has no base checkpoint"
                if base_path is None
                else f"its backbone trained ({listing(trained_t5)})"
            )
            raise ExportError(f"cannot keep {model_dir}'s backbone by reference: {why}")
        reference = export_format.BaseReference(
            path=backbone.resolve(base_path),
            provided=frozenset(provided),
            fingerprint=export_format.fingerprint({p: initial[p] for p in provided}),
        )
    structure = jax.tree.structure(tagi.abstract_params(model))
    params = export_format.unflatten({**initial, **trained}, structure)
    export_format.save(
        out,
        model,
        params,
        vocabulary=run["data"].get("vocabulary", "byte"),
        data=export_format.data_settings(run["data"]),
        info={
            "step": int(step),
            "model_dir": model_dir,
            "run_base_checkpoint": run.get("base_checkpoint"),
            "run_init_from": init_from,
            "seed": seed,
            "trainable_tensors": len(trained),
            "trainable_parameters": sum(int(np.prod(v.shape)) for v in trained.values()),
        },
        base_reference=reference,
        **rule,
    )
    where = (
        f"by reference to {reference.path}"
        if reference
        else f"included in {export_format.BASE_DIR}/ "
        f"({_mib(paths.join(out, export_format.BASE_DIR)):.2f} MiB)"
    )
    print(f"wrote {out} ({_mib(out):.2f} MiB), backbone {where}")
    return out


# --- PyTorch outputs ---------------------------------------------------------------------------


def _instruction_tokens(loaded: export_format.Export, instruction: str) -> np.ndarray:
    """The instruction as the hypernetwork reads it: the export's vocabulary, trimmed to the
    instruction length the student trained with."""
    from tagi_jax.data import tokens

    length = loaded.data.get("feature_lengths", {}).get("hyper_inputs", 1024)
    return tokens.encode_padded(loaded.vocabulary(), [instruction], length)


def export_peft(
    export_dir: str, instruction: str, out: str, *, fused_states: bool = False, overwrite=False
) -> str:
    """The adapters generated for ``instruction`` as a PEFT LoRA directory (see
    ``tagi_jax.convert.peft_export``). ``out`` must pass ``export_format.check_replaceable``
    (kind ``peft``, made from the export and its base)."""
    from tagi_jax.convert import peft_export

    sources = export_format.sources_of(export_dir)
    out = export_format.check_replaceable(out, "peft", overwrite=overwrite, sources=sources)
    loaded = export_format.load(export_dir)
    peft_export.write_peft(
        loaded.config,
        loaded.params,
        _instruction_tokens(loaded, instruction),
        out,
        vocabulary=loaded.vocabulary_spec,
        fused_states=fused_states,
        overwrite=overwrite,
    )
    print(f"wrote {out} (PEFT LoRA for one instruction, HF base in base/)")
    return out


def export_hf(export_dir: str, out: str, *, instruction: str | None = None, overwrite=False):
    """The student's backbone (merged with ``instruction``'s adapters when given) as a Hugging
    Face T5 directory with tokenizer files (see ``tagi_jax.convert.hf_export``). ``out`` must
    pass ``export_format.check_replaceable`` (kind ``hf``, made from the export and its base)."""
    from tagi_jax.convert import hf_export

    sources = export_format.sources_of(export_dir)
    out = export_format.check_replaceable(out, "hf", overwrite=overwrite, sources=sources)
    loaded = export_format.load(export_dir)
    if instruction is not None:
        hf_export.write_task_hf(
            loaded.config,
            loaded.params,
            _instruction_tokens(loaded, instruction),
            out,
            vocabulary=loaded.vocabulary_spec,
            overwrite=overwrite,
        )
    else:
        hf_export.write_hf(
            loaded.config.t5,
            loaded.params["t5"],
            out,
            vocabulary=loaded.vocabulary_spec,
            overwrite=overwrite,
        )
    what = "merged with one instruction's adapters" if instruction else "backbone"
    print(f"wrote {out} (Hugging Face T5, {what})")
    return out


# --- CLI ---------------------------------------------------------------------------------------


def _export_source(args) -> str:
    """``--export`` or, for a finished run, ``--model_dir``'s own export."""
    if args.export:
        return args.export
    if args.model_dir:
        return paths.join(args.model_dir, backbone.RUN_EXPORT_DIR)
    raise ValueError("--peft and --hf need --export E (or --model_dir of a finished run)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tagi_jax.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model_dir", help="a tagi_jax.train MODEL_DIR")
    parser.add_argument("--export", help="an export directory (for --peft / --hf)")
    parser.add_argument("--out", required=True, help="the directory to write")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument(
        "--base_by_reference",
        action="store_true",
        help="keep the backbone by path + fingerprint instead of copying it in",
    )
    parser.add_argument("--peft", action="store_true", help="write a PEFT LoRA directory")
    parser.add_argument("--hf", action="store_true", help="write a Hugging Face T5 directory")
    parser.add_argument("--instruction", help="the task instruction (--peft; --hf: merge it)")
    parser.add_argument(
        "--fused_states",
        action="store_true",
        help="--peft for a fusion student: also write the encoded instruction (see peft_export)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous output of the same kind at --out (never a run or other files)",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.peft and args.hf:
            raise ValueError("--peft and --hf are separate outputs: pass one")
        if args.peft:
            if not args.instruction:
                raise ValueError("--peft needs --instruction: the adapters are one task's")
            export_peft(
                _export_source(args),
                args.instruction,
                args.out,
                fused_states=args.fused_states,
                overwrite=args.overwrite,
            )
        elif args.hf:
            export_hf(
                _export_source(args),
                args.out,
                instruction=args.instruction,
                overwrite=args.overwrite,
            )
        else:
            if not args.model_dir:
                raise ValueError("--model_dir is required (or --peft / --hf with --export)")
            export_run(
                args.model_dir,
                args.out,
                step=args.step,
                base_by_reference=args.base_by_reference,
                overwrite=args.overwrite,
            )
    except (OSError, ValueError) as e:  # ExportError, CheckpointError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
