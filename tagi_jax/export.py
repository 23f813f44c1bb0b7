"""``python -m tagi_jax.export --model_dir D --out E [--step N] [--include_base] [--overwrite]``.

Turns a training run (``tagi_jax.train``'s ``MODEL_DIR``) into a self-contained inference
checkpoint. A run's checkpoints hold only the trainable partition (with optimizer state); the
frozen rest is the base model or the seed's initialisation. An export keeps what inference needs
and nothing it can re-read from the base:

```
E/tagi_config.json   the TagiConfig (TagiConfig.from_json)
E/params/            orbax StandardCheckpointer save of a flat {"/"-joined path: array}: the
                     trainable partition, every frozen parameter outside t5/, and any frozen
                     t5/ parameter the base does not provide (the run initialised it from its seed)
E/base.json          {"path": ..., "kind": "reference" | "included"} (+ "fingerprint", a
                     SHA-256 of the referenced backbone's tensors, checked when loading)
E/t5/                (kind "included") the backbone as a parameter checkpoint, itself loadable as
                     a base (train.base_checkpoint) and by ``loop.load_base``; path "t5"
E/export.json        step, source model_dir, time, counts
```

The backbone is a ``reference`` to the absolute path it came from (the run's ``base_checkpoint``,
or its ``init_from`` run, whose ``export/t5`` holds it) when there is one, none of the run's
``t5/`` parameters trained, and ``--include_base`` is not given; otherwise it is written into
``E/t5``. ``load_export(E)`` rebuilds the full parameter tree for ``tagi.forward`` /
``tagi.greedy_decode`` and checks the base against the config's shapes, naming any mismatch.

The export is written to ``E.tmp`` and renamed, so ``E`` is either complete or absent; an
existing ``E`` is only replaced with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np

from tagi_jax.models import tagi, trainable
from tagi_jax.models.tagi_config import TagiConfig
from tagi_jax.training import loop
from tagi_jax.training import state as state_lib
from tagi_jax.training.checkpointing import CHECKPOINTS_DIR
from tagi_jax.training.loop import RUN_FILE

CONFIG_FILE = "tagi_config.json"
PARAMS_DIR = "params"
BASE_FILE = "base.json"
BASE_DIR = "t5"
INFO_FILE = "export.json"

Flat = dict[str, Any]


class ExportError(ValueError):
    """An export that cannot be written or loaded; the message names the path at fault."""


# --- small helpers -----------------------------------------------------------------------------


def fingerprint(flat: Flat) -> str:
    """SHA-256 of every tensor's path, dtype, shape and bytes: a reference to a base is only
    good while the base is the one the run trained on (a resumed run rewrites its export)."""
    digest = hashlib.sha256()
    for path in sorted(flat):
        value = np.asarray(flat[path])
        digest.update(f"{path}|{value.dtype}|{value.shape}|".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def _mib(path: str) -> float:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total / 2**20


def _nbytes(flat: Flat) -> float:
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in flat.values()) / 2**20


def _listing(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


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
    """Restore targets on one device: an export is read on whatever machine evaluates it, not
    on the mesh that wrote the checkpoint."""
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


# --- reading a run -----------------------------------------------------------------------------


def read_run(model_dir: str) -> dict:
    """``run.json`` of a training run, with ``model`` turned into a ``TagiConfig``."""
    model_dir = os.path.abspath(model_dir)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model_dir does not exist: {model_dir}")
    path = os.path.join(model_dir, RUN_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no {RUN_FILE} in {model_dir}: not a tagi_jax.train run directory (or one written "
            "before run records existed)"
        )
    try:
        with open(path) as f:
            run = json.load(f)
        run["model"] = TagiConfig.from_dict(run["model"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ExportError(f"cannot read {path}: {e}") from e
    return run


def _checkpoint_manager(model_dir: str):
    import orbax.checkpoint as ocp

    directory = os.path.join(model_dir, CHECKPOINTS_DIR)
    if not os.path.isdir(directory):
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
                f"{RUN_FILE}'s model: only in the checkpoint: {_listing(saved - expected) or '-'}; "
                f"only in the mask: {_listing(expected - saved) or '-'}"
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


def load_base(path: str):
    """``(T5Config, t5_params)`` of a base checkpoint, as the training loop reads it."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"base checkpoint does not exist: {path}")
    return loop.load_base(path)


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

    The loop creates parameters with a jitted init (``loop.sharded_params``); an eager
    ``tagi.init_params`` differs from it in the last bit (XLA fuses the initialisers), so when
    a frozen parameter comes from the seed it is rebuilt by that same function (on a one-device
    mesh). When the base provides every frozen parameter (the usual TAGI run) no initialisation
    runs at all: the loop's init passes grafted base leaves through unchanged, and a random
    backbone of billions of parameters would only be thrown away.
    """
    from tagi_jax.parallel import mesh as mesh_lib
    from tagi_jax.parallel import partitioning

    source = init_from or base_checkpoint
    base = None
    if source is not None:
        _, base = load_base(source)
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
        encoder = loop.load_instruction_encoder(instruction_encoder_checkpoint)
        print(f"loaded the instruction encoder from {instruction_encoder_checkpoint}")
    params, _ = loop.sharded_params(
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
    include_base: bool = False,
    overwrite: bool = False,
) -> str:
    """Writes the export of ``model_dir``'s checkpoint ``step`` (default: latest) to ``out``;
    returns ``out``'s absolute path."""
    model_dir = os.path.abspath(model_dir)
    out = os.path.abspath(out)
    run = read_run(model_dir)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite (overwrite=True) to replace")
    model: TagiConfig = run["model"]
    seed = int(run.get("seed", 0))
    init_from = run.get("init_from")
    # Where the run's frozen backbone came from: an `init_from` run replaces the whole student
    # (its export/t5 holds that backbone, and loop.load_base reads a run directory), otherwise
    # the base checkpoint grafted onto the seed's initialisation.
    base_path = init_from or run.get("base_checkpoint")

    step, trained = restore_trainable(model_dir, model, step)
    print(
        f"restored step {step}: {len(trained)} trainable tensors ({_nbytes(trained):.2f} MiB) "
        f"from {os.path.join(model_dir, CHECKPOINTS_DIR, str(step))}"
    )
    initial, provided = _initial_params(
        model,
        seed,
        trained,
        run.get("base_checkpoint"),
        init_from,
        run.get("instruction_encoder_checkpoint"),
    )
    trained_t5 = sorted(p for p in trained if p.startswith("t5/"))
    reference = base_path is not None and not trained_t5 and not include_base

    def kept(path: str) -> bool:
        if path in trained:
            return True
        if not path.startswith("t5/"):
            return True  # e.g. a frozen separate instruction encoder (the teacher's)
        # Frozen backbone leaves the base lacks came from the seed: only a reference loses them.
        return reference and path not in provided

    merged = {**initial, **trained}
    exported = {p: v for p, v in merged.items() if kept(p)}

    tmp = out + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)  # a stale half-written export from an interrupted run
    os.makedirs(tmp)
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(tmp, PARAMS_DIR), exported)
    checkpointer.wait_until_finished()
    if reference:
        base_info = {
            "path": os.path.abspath(base_path),
            "kind": "reference",
            "fingerprint": fingerprint({p: initial[p] for p in provided}),
        }
    else:
        from tagi_jax.convert import param_checkpoint

        full = state_lib.merge(merged, {}, jax.tree.structure(tagi.abstract_params(model)))
        param_checkpoint.save(os.path.join(tmp, BASE_DIR), model.t5, full["t5"])
        base_info = {"path": BASE_DIR, "kind": "included"}
    _write_json(os.path.join(tmp, BASE_FILE), base_info)
    n_train = sum(int(np.prod(v.shape)) for v in trained.values())
    _write_json(
        os.path.join(tmp, INFO_FILE),
        {
            "step": int(step),
            "model_dir": model_dir,
            "time": time.time(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "base": base_info,
            "run_base_checkpoint": run.get("base_checkpoint"),
            "run_init_from": init_from,
            "seed": seed,
            "trainable_tensors": len(trained),
            "trainable_parameters": n_train,
            "exported_tensors": len(exported),
        },
    )
    # The config goes last: a directory with a tagi_config.json has everything else.
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
        f.write(model.to_json())
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(
        f"wrote {out} ({_mib(out):.2f} MiB): {len(exported)} tensors in {PARAMS_DIR}/ "
        f"({_mib(os.path.join(out, PARAMS_DIR)):.2f} MiB), backbone "
        + (
            f"by reference to {base_info['path']}"
            if reference
            else f"included in {BASE_DIR}/ ({_mib(os.path.join(out, BASE_DIR)):.2f} MiB)"
        )
    )
    return out


def _write_json(path: str, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)


# --- loading -----------------------------------------------------------------------------------


def read_config(path: str) -> TagiConfig:
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"export directory does not exist: {path}")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no {CONFIG_FILE} in {path}: not a complete tagi_jax export")
    try:
        with open(file) as f:
            return TagiConfig.from_json(f.read())
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ExportError(f"cannot read {file}: {e}") from e


def _base_info(path: str) -> tuple[str, str, dict]:
    """``(kind, location, base.json)``; a relative location is inside the export."""
    file = os.path.join(path, BASE_FILE)
    try:
        with open(file) as f:
            info = json.load(f)
        kind, location = info["kind"], info["path"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ExportError(f"cannot read {file}: {e}") from e
    if kind not in ("reference", "included"):
        raise ExportError(f"{file}: kind {kind!r} is not reference/included")
    return kind, os.path.join(path, location), info  # join keeps an absolute location as is


def load_export(path: str, *, verify_base: bool = True) -> tuple[TagiConfig, Any]:
    """``(config, params)``: the full parameter tree of an export, on one device.

    ``verify_base``: check a referenced base against the fingerprint taken at export (hashes
    every backbone tensor: seconds for a billion parameters), refusing a base that changed.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    model = read_config(path)
    abstract = trainable.flatten(tagi.abstract_params(model))
    kind, location, info = _base_info(path)
    if not os.path.isdir(location):
        raise FileNotFoundError(
            f"the export's base ({kind}, {os.path.join(path, BASE_FILE)}) does not exist: "
            f"{location}"
        )
    _, base = load_base(location)
    base_flat = {f"t5/{p}": v for p, v in trainable.flatten(base).items()}
    extra = sorted(set(base_flat) - {p for p in abstract if p.startswith("t5/")})
    if extra:
        raise ExportError(
            f"base {location} has parameters the config's backbone does not: {_listing(extra)}"
        )
    _check_shapes(location, {p: tuple(v.shape) for p, v in base_flat.items()}, abstract, "base")
    expected = info.get("fingerprint")
    if verify_base and kind == "reference" and expected and fingerprint(base_flat) != expected:
        raise ExportError(
            f"the base {location} is not the one {path} was exported against (its tensors "
            "changed since: a resumed or retrained run?); export the run again, or pass "
            "verify_base=False to use it anyway"
        )

    params_path = os.path.join(path, PARAMS_DIR)
    if not os.path.isdir(params_path):
        raise FileNotFoundError(f"missing {params_path}: the export has no parameters")
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(params_path)
    metadata = getattr(metadata, "item_metadata", metadata)  # orbax versions differ here
    unknown = sorted(set(metadata) - set(abstract))
    if unknown:
        raise ExportError(f"{params_path} has parameters the config does not: {_listing(unknown)}")
    _check_shapes(
        params_path, {p: tuple(m.shape) for p, m in metadata.items()}, abstract, "exported"
    )
    saved = checkpointer.restore(params_path, _single_device_target(dict(metadata)))
    missing = sorted(set(abstract) - set(base_flat) - set(saved))
    if missing:
        raise ExportError(
            f"neither the base {location} nor {params_path} holds: {_listing(missing)}"
        )
    structure = jax.tree.structure(tagi.abstract_params(model))
    return model, state_lib.merge({**base_flat, **saved}, {}, structure)


def _check_shapes(where: str, shapes: dict[str, tuple], abstract: Flat, what: str) -> None:
    wrong = [
        f"{p} {shape} (config: {tuple(abstract[p].shape)})"
        for p, shape in sorted(shapes.items())
        if shape != tuple(abstract[p].shape)
    ]
    if wrong:
        raise ExportError(
            f"{what} parameters in {where} do not fit the config: " + "; ".join(wrong)
        )


# --- CLI ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tagi_jax.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model_dir", required=True, help="a tagi_jax.train MODEL_DIR")
    parser.add_argument("--out", required=True, help="the export directory to write")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument(
        "--include_base", action="store_true", help="copy the backbone even if a reference works"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        export_run(
            args.model_dir,
            args.out,
            step=args.step,
            include_base=args.include_base,
            overwrite=args.overwrite,
        )
    except (OSError, ValueError) as e:  # ExportError, CheckpointError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
