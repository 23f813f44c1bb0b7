"""The one export format: everything inference needs to use a trained TAGI student.

Written by a training run's last step (``<MODEL_DIR>/export``) and by ``python -m
tagi_jax.export`` alike, read by ``load`` (evaluation, ``tagi_jax.predictor``, the PEFT/HF
exporters, ``train.init_from``). A directory copied to another machine works: the backbone, the
vocabulary and the data settings travel with it.

```
E/tagi_config.json   the TagiConfig (TagiConfig.from_json); written last, so a directory that
                     has it is complete
E/params/            orbax StandardCheckpointer save of a flat {"/"-joined path: array}: every
                     student parameter the base does not hold (the hypernetwork, a separate
                     instruction encoder, new layers, trained or seed-initialised t5/ leaves)
E/base.json          {"kind": "included", "path": "t5"} or {"kind": "reference", "path": <abs>,
                     "fingerprint": <SHA-256 of the referenced backbone's tensors>}
E/t5/                (included) the backbone as a parameter checkpoint, itself a base for
                     training (train.base_checkpoint) and for backbone.load_t5
E/vocabulary.json    {"kind": "byte"} or {"kind": "sentencepiece", "file": "spiece.model",
                     "sha256": ..., "extra_ids": 100}; the model file sits next to it
E/data.json          the data settings the student trained with (``data_settings``): task,
                     feature lengths, NIConfig, what the student and the hypernetwork read
E/export.json        format version, step, source, time, counts
```

The base is included by default; a reference (``base_reference``) keeps only its path and
fingerprint, and ``load`` refuses a base whose tensors changed since.

``E`` (and a referenced base) may be local or in cloud storage (``gs://...``): every path goes
through ``tagi_jax.paths``, and orbax writes the parameters wherever the path says.

Safety rules, here so that every writer and reader shares them:

* ``check_replaceable`` decides where an output (this export, a PEFT or a Hugging Face
  directory) may be written: never in, over or above a training run, never over what is not
  that kind of output, and over a previous output only with ``overwrite``. ``save`` writes
  aside and swaps, so nothing is removed before the new output is complete (in cloud storage
  the swap copies, ``tagi_config.json`` last: see ``paths.swap_dir``).
* ``save`` and ``load`` refuse parameters holding NaN or Inf (``NonFiniteParamsError``).

This module imports neither the trainer nor TensorFlow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tagi_jax import paths
from tagi_jax.artifacts import backbone
from tagi_jax.models import tagi, trainable
from tagi_jax.models.tagi_config import TagiConfig

FORMAT_VERSION = 1
CONFIG_FILE = "tagi_config.json"
PARAMS_DIR = "params"
BASE_FILE = "base.json"
BASE_DIR = backbone.BACKBONE_DIR
VOCABULARY_FILE = "vocabulary.json"
SPIECE_FILE = "spiece.model"
DATA_FILE = "data.json"
INFO_FILE = "export.json"
SENTENCEPIECE_EXTRA_IDS = 100  # T5's sentinels, as data.vocab builds the vocabulary
# What a training run directory holds (tagi_jax.training.checkpointing writes them). Spelled
# here, not imported: artifacts must not import the trainer; tests check that they agree.
RUN_FILE = "run.json"
CHECKPOINTS_DIR = "checkpoints"

# Every top-level name ``save`` writes: an existing export holding anything else is not
# replaced (it would be deleted with it).
EXPORT_ENTRIES = frozenset(
    {
        CONFIG_FILE,
        PARAMS_DIR,
        BASE_FILE,
        BASE_DIR,
        VOCABULARY_FILE,
        SPIECE_FILE,
        DATA_FILE,
        INFO_FILE,
    }
)
# What tagi_jax.convert.hf_export writes (hf_t5.save: config + weights; write_tokenizer).
HF_ENTRIES = frozenset(
    {
        "config.json",
        "model.safetensors",
        SPIECE_FILE,
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
)
KINDS = ("export", "peft", "hf")

Flat = dict[str, Any]


class ExportError(ValueError):
    """An export that cannot be written or loaded; the message names the path at fault."""


class OutputRefused(ExportError):
    """An output path that must not be written or replaced (``check_replaceable``)."""


class NonFiniteParamsError(ExportError):
    """Parameters holding NaN or Inf: an export of them would only ever produce garbage."""


@dataclasses.dataclass(frozen=True)
class BaseReference:
    """A backbone kept by reference: ``path`` (a backbone source) and the ``t5/`` paths it
    provides, which the export then leaves out."""

    path: str
    provided: frozenset[str]
    fingerprint: str


@dataclasses.dataclass(frozen=True)
class Export:
    """A loaded export: ``config`` and the full parameter tree ``params`` for ``tagi.forward``
    and the decoders; ``data`` (``data.json``) and ``vocabulary_spec`` (``"byte"`` or the
    SentencePiece file inside the export) give the settings the student was trained with."""

    path: str
    config: TagiConfig
    params: Any
    data: dict
    vocabulary_spec: str
    info: dict

    def vocabulary(self):
        """The student's vocabulary (SeqIO's; imports TensorFlow, hence lazily)."""
        from tagi_jax.data import vocab

        return vocab.from_name(self.vocabulary_spec)

    def ni_config(self):
        """The NIConfig the student trained with (None for P3 / C4 students)."""
        return ni_config_from(self.data)


# --- helpers -----------------------------------------------------------------------------------


def fingerprint(flat: Flat) -> str:
    """SHA-256 of every tensor's path, dtype, shape and bytes: a reference to a base is only
    good while the base is the one the student was exported against."""
    digest = hashlib.sha256()
    for path in sorted(flat):
        value = np.asarray(flat[path])
        digest.update(f"{path}|{value.dtype}|{value.shape}|".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with paths.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def listing(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def unflatten(flat: Flat, structure) -> Any:
    """The tree of ``structure`` (``jax.tree.structure``) from a ``trainable.flatten`` dict."""
    skeleton = jax.tree.unflatten(structure, [0] * structure.num_leaves)
    paths = [trainable.path_string(k) for k, _ in jax.tree_util.tree_flatten_with_path(skeleton)[0]]
    return jax.tree.unflatten(structure, [flat[p] for p in paths])


def _write_json(path: str, value: Any) -> None:
    paths.write_json(path, value)


def _read_json(path: str, what: str) -> dict:
    if not paths.isfile(path):
        raise ExportError(f"missing {path}: the export has no {what}")
    try:
        value = paths.read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read {path}: {e}") from e
    if not isinstance(value, dict):
        raise ExportError(f"{path} is not a JSON object")
    return value


def _restore_target(tree, shardings=None):
    """Restore targets: ``shardings`` (a matching tree) or the first local device. An export
    is read on whatever machine uses it, not on the mesh that wrote it."""
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, tree)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
    )


# --- data settings -----------------------------------------------------------------------------


def spiece_file(vocabulary: str) -> str:
    """The SentencePiece model file a vocabulary setting names (a directory holding
    ``spiece.model``, or the file)."""
    return paths.join(vocabulary, SPIECE_FILE) if paths.isdir(vocabulary) else vocabulary


def data_settings(data: Mapping[str, Any]) -> dict:
    """``data.json`` from a run's ``DataConfig`` (as ``dataclasses.asdict`` gives it).

    Besides the fields themselves it names what the student and the hypernetwork read, and
    resolves the demonstrations the task's variant (``_def`` / ``_def_pos2``) implies, so that
    evaluation and prediction format instances as training did.
    """
    from tagi_jax.data import ni as ni_lib

    task = data.get("task")
    lengths = dict(data.get("feature_lengths") or ())
    settings: dict[str, Any] = {
        "task": task,
        "feature_lengths": lengths,
        "vocabulary": data.get("vocabulary", "byte"),
        "ni": None,
    }
    if task is not None and ni_lib.task_variant(task) is not None:
        fields = {f.name for f in dataclasses.fields(ni_lib.NIConfig)}
        ni = ni_lib.NIConfig(**{k: v for k, v in (data.get("ni") or {}).items() if k in fields})
        ni = ni_lib.for_task(ni, task)
        settings["ni"] = dataclasses.asdict(ni)
        positives = ni.pos_examples
        settings["hypernetwork_reads"] = (
            "definition" if positives == 0 else f"definition + {positives} positive examples"
        )
        settings["student_reads"] = ni.student_input
    elif task is not None and "_p3_" in task:
        settings["hypernetwork_reads"] = "prompt"
        settings["student_reads"] = "prompt"
    else:
        settings["hypernetwork_reads"] = "hyper_inputs"
        settings["student_reads"] = "inputs"
    return settings


def ni_config_from(data: Mapping[str, Any], **overrides):
    """The ``NIConfig`` of ``data.json`` with ``overrides`` (e.g. a run file's bindings), or
    None when the student did not train on natural-instructions data."""
    from tagi_jax.data import ni as ni_lib

    if data.get("ni") is None:
        return ni_lib.NIConfig(**overrides) if overrides else None
    return ni_lib.NIConfig(**{**data["ni"], **overrides})


# --- safety: where an output may go, finite parameters -----------------------------------------


def run_marker(path: str) -> str | None:
    """What makes ``path`` a training run directory, or None when it is not one: its
    ``run.json``, or (a run from before run records) a ``checkpoints/`` that is the trainer's:
    empty or holding step directories (``4``, ``4.orbax-checkpoint-tmp-*``). A
    ``~/checkpoints`` of downloaded models does not make the home directory a run."""
    if paths.isfile(paths.join(path, RUN_FILE)):
        return RUN_FILE
    checkpoints = paths.join(path, CHECKPOINTS_DIR)
    if paths.isdir(checkpoints):
        try:
            names = paths.listdir(checkpoints)
        except OSError:
            names = []  # unreadable: count it, refusing is the safe side
        if not names or any(name.split(".")[0].isdigit() for name in names):
            return f"{CHECKPOINTS_DIR}/"
    return None


def is_run_dir(path: str) -> bool:
    """Whether ``path`` is a training run directory (``run_marker``)."""
    return run_marker(path) is not None


_KIND_NAMES = {"export": "tagi_jax export", "peft": "PEFT LoRA directory", "hf": "Hugging Face T5"}


def _what(kind: str) -> str:
    return _KIND_NAMES[kind]


def _markers(kind: str) -> tuple[str, ...]:
    """The files that say a directory is a ``kind`` output. An export has ``export.json`` and
    ``tagi_config.json`` (written last): either will do, a copy may have lost one of them."""
    if kind == "export":
        return (INFO_FILE, CONFIG_FILE)
    if kind == "peft":
        from tagi_jax.convert import peft_export

        return (peft_export.ADAPTER_CONFIG,)
    return ("config.json",)


def _foreign(path: str, kind: str) -> list[str]:
    """The entries of the ``kind`` output ``path`` that its writer does not write."""
    if kind == "export":
        return sorted(set(paths.listdir(path)) - EXPORT_ENTRIES)
    if kind == "hf":
        return sorted(set(paths.listdir(path)) - HF_ENTRIES)
    from tagi_jax.convert import peft_export

    allowed = HF_ENTRIES - {"config.json", "model.safetensors"} | {
        peft_export.ADAPTER_CONFIG,
        peft_export.ADAPTER_WEIGHTS,
        peft_export.INSTRUCTION_RECORD,
        peft_export.INSTRUCTION_STATES,
        peft_export.BASE_SUBDIR,
    }
    foreign = sorted(set(paths.listdir(path)) - allowed)
    base = paths.join(path, peft_export.BASE_SUBDIR)
    if paths.isdir(base) and not paths.islink(base):  # the HF export of the backbone
        foreign += [f"{peft_export.BASE_SUBDIR}/{name}" for name in _foreign(base, "hf")]
    return foreign


def _run_within(path: str) -> str | None:
    """A training run directory at or below ``path`` (symbolic links not followed), or None."""
    for root, dirs, files in paths.walk(path):
        if (RUN_FILE in files or CHECKPOINTS_DIR in dirs) and is_run_dir(root):
            return root
    return None


def _inside(path: str, parent: str) -> bool:
    return paths.is_within(path, parent)


def check_replaceable(
    out: str,
    kind: str = "export",
    *,
    overwrite: bool = False,
    sources: Sequence[str] = (),
    allow_run_export: bool = False,
) -> str:
    """The absolute ``out`` where a ``kind`` output (``"export"``, ``"peft"``, ``"hf"``) may be
    written; raises when it may not, with one line naming the path and why. The one rule every
    writer follows, so that no typed path loses a run:

    * ``out`` may not be, contain or lie inside a training run directory (``is_run_dir``); the
      exception is ``<run>/export`` with ``allow_run_export`` (the export a run writes of
      itself when it finishes; ``save``'s default, for the training loop);
    * nor be, contain or lie inside one of ``sources`` (what the output is made from: the
      export, its referenced base, the run);
    * an existing ``out`` is replaced only when it is an empty directory or a ``kind`` output
      (its marker file: ``export.json`` / ``tagi_config.json``, ``adapter_config.json``,
      ``config.json``) holding nothing its writer does not write, and only with
      ``overwrite`` (else FileExistsError). A file, a symbolic link or any other directory is
      never replaced.

    Raises OutputRefused (an ExportError, so a ValueError) or FileExistsError.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    out = paths.absolute(out)
    real = paths.realpath(out)

    def refuse(why: str):
        raise OutputRefused(f"refusing to write {out}: {why}")

    # A run first: its checkpoints, metrics and run.json are what a typo must never cost.
    parent = paths.dirname(real)
    while True:
        marker = run_marker(parent)
        if marker is not None:
            slot = parent == paths.dirname(real) and (
                paths.basename(real) == backbone.RUN_EXPORT_DIR
            )
            if slot and allow_run_export and kind == "export":
                # The run's own export, written when it finishes: what lies above the run is
                # not checked, so that the end of a long run never fails over where it was put.
                break
            if slot:
                refuse(
                    f"it is the export of the training run {parent} (it has {marker}), which "
                    "only the run writes; choose a path outside run directories"
                )
            refuse(
                f"it lies inside the training run {parent} (it has {marker}); choose a path "
                "outside run directories"
            )
        if paths.dirname(parent) == parent:
            break
        parent = paths.dirname(parent)
    exists = paths.isdir(real) and not paths.islink(out)
    if exists and is_run_dir(real):
        refuse(
            f"it is a training run directory (it has {run_marker(real)}); --overwrite only "
            f"ever replaces a previous {_what(kind)}"
        )
    if exists:
        for name in sorted(paths.listdir(real)):
            child = paths.join(real, name)
            if paths.isdir(child) and not paths.islink(child) and is_run_dir(child):
                refuse(f"it contains the training run {child} (it has {run_marker(child)})")
    for source in sources:
        source = paths.realpath(source)
        if real == source:
            refuse(f"it is {source}, which this output is made from")
        if _inside(real, source):
            refuse(f"it lies inside {source}, which this output is made from")
        if _inside(source, real):
            refuse(f"it contains {source}, which this output is made from")
    if not paths.lexists(out):
        return out
    if paths.islink(out):
        refuse("it is a symbolic link: name the directory itself")
    if not paths.isdir(out):
        refuse(f"it is a file, not a {_what(kind)}; --overwrite only replaces a previous one")
    if not paths.listdir(out):
        return out  # nothing to lose
    markers = _markers(kind)
    if not any(paths.isfile(paths.join(out, m)) for m in markers):
        refuse(
            f"it is not empty and not a {_what(kind)} (no {' or '.join(markers)}); "
            "--overwrite only replaces a previous one"
        )
    run = _run_within(out)
    if run is not None:
        refuse(f"it contains the training run {run}")
    foreign = _foreign(out, kind)
    if foreign:
        refuse(
            f"it holds what a {_what(kind)} does not ({listing(foreign, 5)}): move them away "
            "or choose another path"
        )
    if not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite (overwrite=True) to replace")
    return out


def _remove_stale(tmp: str) -> None:
    """Removes ``tmp``, the half-written export of an interrupted ``save``, after checking
    that it is one (a directory holding only what an export holds): a user's directory that
    happens to have that name is never removed."""
    if not paths.lexists(tmp):
        return

    def ours(name: str) -> bool:
        # orbax writes params/ as params.orbax-checkpoint-tmp-* first: interrupted, that remains
        return name in EXPORT_ENTRIES or name.startswith(f"{PARAMS_DIR}.")

    if (
        paths.islink(tmp)
        or not paths.isdir(tmp)
        or not all(ours(name) for name in paths.listdir(tmp))
        or _run_within(tmp) is not None
    ):
        raise OutputRefused(
            f"refusing to remove {tmp}: it is not a half-written export (where save writes "
            "before moving into place); move it away"
        )
    paths.rmtree(tmp)


# What marks an export complete, in the order a copy writes them last (``paths.swap_dir``).
_LAST = (INFO_FILE, CONFIG_FILE)


def _swap(tmp: str, out: str) -> None:
    """Moves the complete ``tmp`` to ``out``; a previous ``out`` is moved aside first and
    removed only once the new one is in place (put back if the move fails). Local: renames;
    cloud storage: copies, ``tagi_config.json`` last (``paths.swap_dir``)."""
    paths.swap_dir(tmp, out, last=_LAST)


@jax.jit
def _all_finite(x):
    return jnp.isfinite(x).all()


def nonfinite(flat: Mapping[str, Any]) -> list[str]:
    """The paths of ``flat``'s floating-point tensors holding a NaN or an Inf: one reduction
    per tensor where it lives (sharded tensors included), one transfer of the verdicts."""
    paths = [p for p, v in flat.items() if jnp.issubdtype(v.dtype, jnp.inexact)]
    verdicts = jax.device_get([_all_finite(flat[p]) for p in paths])
    return sorted(p for p, ok in zip(paths, verdicts, strict=True) if not ok)


def check_finite(flat: Mapping[str, Any], where: str) -> None:
    """Raises NonFiniteParamsError naming the first tensors of ``flat`` (and how many) that
    hold NaN or Inf; ``where`` starts the message (the path written or read)."""
    bad = nonfinite(flat)
    if bad:
        raise NonFiniteParamsError(
            f"{where}: {len(bad)} of {len(flat)} parameter tensors hold NaN or Inf "
            f"({listing(bad, 4)}): a diverged run? export an earlier checkpoint (--step)"
        )


# --- writing -----------------------------------------------------------------------------------


def _vocabulary_record(vocabulary: str, directory: str | None) -> dict:
    """``vocabulary.json``'s content; copies a SentencePiece model into ``directory``."""
    if vocabulary == "byte":
        return {"kind": "byte"}
    source = spiece_file(vocabulary)
    if not paths.isfile(source):
        raise ExportError(f"the student's SentencePiece vocabulary does not exist: {source}")
    if directory is not None:
        paths.copyfile(source, paths.join(directory, SPIECE_FILE))
    return {
        "kind": "sentencepiece",
        "file": SPIECE_FILE,
        "sha256": file_sha256(source),
        "extra_ids": SENTENCEPIECE_EXTRA_IDS,
        "source": paths.absolute(source),
    }


def save(
    out: str,
    config: TagiConfig,
    params: Any,
    *,
    vocabulary: str,
    data: Mapping[str, Any],
    info: Mapping[str, Any] | None = None,
    base_reference: BaseReference | None = None,
    overwrite: bool = False,
    is_main: bool = True,
    sync: Callable[[str], None] = lambda name: None,
    sources: Sequence[str] = (),
    allow_run_export: bool = True,
) -> str:
    """Writes the export of the student ``params`` (the full tree) to ``out``; returns its
    absolute path.

    ``vocabulary``: ``"byte"`` or a SentencePiece path (copied in). ``data``: ``data.json``
    (``data_settings``). ``base_reference``: keep the backbone by reference instead of
    including it. ``out`` must pass ``check_replaceable`` (with ``sources``, what the export is
    made from, and the referenced base; ``allow_run_export``: ``<run>/export`` may be written,
    as the training loop does); parameters holding NaN or Inf are refused
    (NonFiniteParamsError), before anything is written. Written to ``out.tmp`` and swapped in,
    so ``out`` is complete or absent, and a previous export is removed only after. On several
    processes every one calls this (orbax saves are collective), ``is_main`` moves files,
    ``sync`` is a barrier.
    """
    out = paths.absolute(out)
    sources = [*sources, *([base_reference.path] if base_reference is not None else [])]
    rule = {
        "overwrite": overwrite,
        "sources": sources,
        "allow_run_export": allow_run_export,
    }
    if is_main:
        check_replaceable(out, "export", **rule)
    flat = trainable.flatten(params)
    expected = trainable.flatten(tagi.abstract_params(config))
    if set(flat) != set(expected):
        raise ExportError(
            f"the parameters do not fit the config: only in the parameters: "
            f"{listing(set(flat) - set(expected)) or '-'}; only in the config: "
            f"{listing(set(expected) - set(flat)) or '-'}"
        )
    # Every process checks (the same global arrays, the same verdict), so all stop together.
    check_finite(flat, f"not writing {out}")
    tmp = out + ".tmp"
    if is_main:
        _remove_stale(tmp)  # a half-written export from an interrupted run
        paths.makedirs(tmp, exist_ok=False)
    sync("export: clean")
    import orbax.checkpoint as ocp

    from tagi_jax.convert import param_checkpoint

    if base_reference is None:
        kept = {p: v for p, v in flat.items() if not p.startswith("t5/")}
        param_checkpoint.save(paths.join(tmp, BASE_DIR), config.t5, params["t5"])
        base_info = {"kind": "included", "path": BASE_DIR}
    else:
        kept = {p: v for p, v in flat.items() if p not in base_reference.provided}
        base_info = {
            "kind": "reference",
            "path": paths.absolute(base_reference.path),
            "fingerprint": base_reference.fingerprint,
        }
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(paths.join(tmp, PARAMS_DIR), kept)
    checkpointer.wait_until_finished()
    sync("export: written")
    if is_main:
        _write_json(paths.join(tmp, BASE_FILE), base_info)
        _write_json(paths.join(tmp, VOCABULARY_FILE), _vocabulary_record(vocabulary, tmp))
        _write_json(paths.join(tmp, DATA_FILE), dict(data))
        n_params = sum(int(np.prod(v.shape)) for v in flat.values())
        _write_json(
            paths.join(tmp, INFO_FILE),
            {
                "format_version": FORMAT_VERSION,
                "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "base": base_info,
                "parameters": n_params,
                "exported_tensors": len(kept),
                **dict(info or {}),
            },
        )
        # The config goes last: a directory with a tagi_config.json has everything else.
        paths.write_text(paths.join(tmp, CONFIG_FILE), config.to_json())
        # Again: the write took a while, and what is at `out` now is what the swap removes.
        check_replaceable(out, "export", **rule)
        _swap(tmp, out)
    sync("export: moved")
    return out


def sources_of(path: str) -> list[str]:
    """What outputs made from the export ``path`` must not overwrite: the export and a base it
    references (unreadable records are left to ``load`` to report)."""
    path = paths.absolute(path)
    try:
        kind, location, _ = _base_info(path)
    except (OSError, ExportError):
        return [path]
    return [path, location] if kind == "reference" else [path]


# --- reading -----------------------------------------------------------------------------------


def check_is_export(path: str) -> str:
    """``path``'s absolute form; a clear error when it is not a complete export."""
    path = paths.absolute(path)
    if not paths.isdir(path):
        raise FileNotFoundError(f"export directory does not exist: {path}")
    if not paths.isfile(paths.join(path, CONFIG_FILE)):
        if paths.isdir(paths.join(path, backbone.RUN_EXPORT_DIR)):
            raise ExportError(
                f"{path} is a training run, not an export: use {path}/"
                f"{backbone.RUN_EXPORT_DIR} (written when the run finished) or python -m "
                "tagi_jax.export --model_dir for one of its checkpoints"
            )
        if paths.isdir(paths.join(path, "tagi", PARAMS_DIR)):
            raise ExportError(
                f"{path} is a run export of an older tagi_jax (tagi/params): export the run "
                "again with python -m tagi_jax.export --model_dir"
            )
        raise ExportError(f"no {CONFIG_FILE} in {path}: not a complete tagi_jax export")
    return path


def read_config(path: str) -> TagiConfig:
    file = paths.join(check_is_export(path), CONFIG_FILE)
    try:
        return TagiConfig.from_json(paths.read_text(file))
    except (
        OSError,
        UnicodeDecodeError,
        json.JSONDecodeError,
        KeyError,
        TypeError,
        ValueError,
    ) as e:
        raise ExportError(f"cannot read {file}: {type(e).__name__}: {e}") from e


def read_data(path: str) -> dict:
    """``data.json``: the data settings the student trained with."""
    return _read_json(paths.join(check_is_export(path), DATA_FILE), "data settings")


def read_info(path: str) -> dict:
    file = paths.join(check_is_export(path), INFO_FILE)
    return _read_json(file, "export record") if paths.isfile(file) else {}


def vocabulary_spec(path: str) -> str:
    """``"byte"`` or the SentencePiece file inside the export, checked against its hash."""
    path = check_is_export(path)
    file = paths.join(path, VOCABULARY_FILE)
    record = _read_json(file, "vocabulary")
    kind = record.get("kind")
    if kind == "byte":
        return "byte"
    if kind != "sentencepiece":
        raise ExportError(f"{file}: vocabulary kind {kind!r} is not byte/sentencepiece")
    model = paths.join(path, record.get("file", SPIECE_FILE))
    if not paths.isfile(model):
        raise ExportError(f"{file} names {model}, which does not exist")
    if record.get("sha256") and file_sha256(model) != record["sha256"]:
        raise ExportError(f"{model} is not the vocabulary the student trained with (hash differs)")
    return model


def vocabulary_for(spec: str, override: str | None, setting: str) -> str:
    """The export's vocabulary ``spec`` (``vocabulary_spec``); an ``override`` (a run file's
    ``setting``) must be the same vocabulary, by hash: the student's embeddings and logits are
    tied to its ids."""
    if override is None or override == spec:
        return spec
    same = False
    if "byte" not in (spec, override):
        file = spiece_file(override)
        same = paths.isfile(file) and file_sha256(file) == file_sha256(spec)
    if not same:
        raise ValueError(
            f"{setting}={override!r} is not the vocabulary the student was trained with "
            f"({spec}, stored in the export): drop the binding to use the export's"
        )
    return spec


def _base_info(path: str) -> tuple[str, str, dict]:
    """``(kind, location, base.json)``; a relative location is inside the export."""
    file = paths.join(path, BASE_FILE)
    info = _read_json(file, "base record")
    kind, location = info.get("kind"), info.get("path")
    if kind not in ("reference", "included") or not isinstance(location, str):
        raise ExportError(f"{file}: needs kind reference/included and a path, got {info}")
    # join keeps an absolute location (a local path or a URI) as is
    return kind, paths.join(path, location), info


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


def load(path: str, *, verify_base: bool = True, shardings=None) -> Export:
    """Reads an export: the full parameter tree (on one device, or placed by ``shardings``, a
    tree matching ``tagi.abstract_params``), its settings and vocabulary.

    ``verify_base``: check a referenced base against the fingerprint taken at export (hashes
    every backbone tensor), refusing a base that changed. Parameters holding NaN or Inf (the
    base's too) are refused: NonFiniteParamsError names them.
    """
    import orbax.checkpoint as ocp

    path = check_is_export(path)
    config = read_config(path)
    data = read_data(path)
    vocabulary = vocabulary_spec(path)
    abstract_tree = tagi.abstract_params(config)
    abstract = trainable.flatten(abstract_tree)
    flat_shardings = None if shardings is None else trainable.flatten(shardings)
    kind, location, info = _base_info(path)
    if not paths.isdir(location):
        raise FileNotFoundError(
            f"the export's base ({kind}, {paths.join(path, BASE_FILE)}) does not exist: {location}"
        )
    _, base = backbone.load_t5(location, shardings=None if shardings is None else shardings["t5"])
    base_flat = {f"t5/{p}": v for p, v in trainable.flatten(base).items()}
    extra = sorted(set(base_flat) - {p for p in abstract if p.startswith("t5/")})
    if extra:
        raise ExportError(
            f"base {location} has parameters the config's backbone does not: {listing(extra)}"
        )
    _check_shapes(location, {p: tuple(v.shape) for p, v in base_flat.items()}, abstract, "base")
    expected = info.get("fingerprint")
    if verify_base and kind == "reference" and expected and fingerprint(base_flat) != expected:
        raise ExportError(
            f"the base {location} is not the one {path} was exported against (its tensors "
            "changed since: a resumed or retrained run?); export the run again, or pass "
            "verify_base=False to use it anyway"
        )

    params_path = paths.join(path, PARAMS_DIR)
    if not paths.isdir(params_path):
        raise FileNotFoundError(f"missing {params_path}: the export has no parameters")
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(params_path)
    metadata = dict(getattr(metadata, "item_metadata", metadata))  # orbax versions differ here
    unknown = sorted(set(metadata) - set(abstract))
    if unknown:
        raise ExportError(f"{params_path} has parameters the config does not: {listing(unknown)}")
    _check_shapes(
        params_path, {p: tuple(m.shape) for p, m in metadata.items()}, abstract, "exported"
    )
    target = _restore_target(
        metadata, None if flat_shardings is None else {p: flat_shardings[p] for p in metadata}
    )
    saved = checkpointer.restore(params_path, target)
    missing = sorted(set(abstract) - set(base_flat) - set(saved))
    if missing:
        raise ExportError(
            f"neither the base {location} nor {params_path} holds: {listing(missing)}"
        )
    flat = {**base_flat, **saved}
    check_finite(flat, f"refusing to load {path}")
    params = unflatten(flat, jax.tree.structure(abstract_tree))
    return Export(
        path=path,
        config=config,
        params=params,
        data=data,
        vocabulary_spec=vocabulary,
        info=read_info(path),
    )
