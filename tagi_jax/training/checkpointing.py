"""Orbax checkpoints of the train state: trainable parameters, optimizer state, step, RNG and
the data position — never the frozen base, which is re-read from its own checkpoint.

Layout (``<model_dir>/checkpoints/<step>/``): ``state`` (orbax StandardSave of ``TrainState``)
and ``meta`` (JSON: examples consumed, the model config fingerprint, the run fingerprints —
base, data settings, batch size —, the optimizer and the state's layout, wall time).

Guarantees: saves are atomic (orbax writes to a temporary directory and renames) and only of
finite state, so the newest checkpoint is always one to resume from; the last ``keep`` are
preserved; a failed write is one line and leaves the earlier checkpoints intact. Restoring
refuses a checkpoint of another model config, base, data settings, batch size or optimizer
(each by name); an unreadable checkpoint is moved aside to ``checkpoints.corrupt/`` (never
deleted) and the next older one restored. ``RunLock`` keeps a second trainer off a directory.

``PreemptionGuard`` turns SIGTERM (a preempted TPU VM, ``kill``) into a flag the training loop
polls: it saves a checkpoint at the current step and exits cleanly.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from tagi_jax import paths
from tagi_jax.artifacts import export_format

# <model_dir>/checkpoints/<step>/{state,meta} and <model_dir>/run.json (what `tagi_jax.export`
# needs to rebuild the model): named by the export format, which must recognise a run directory
# without importing the trainer.
CHECKPOINTS_DIR = export_format.CHECKPOINTS_DIR
RUN_FILE = export_format.RUN_FILE
CORRUPT_DIR = "checkpoints.corrupt"  # <model_dir>/: unreadable checkpoints, set aside
LOCK_FILE = ".train.lock"  # <model_dir>/: held by the running trainer


class CheckpointMismatchError(ValueError):
    """A checkpoint written for another model configuration, base, data or batch size."""


class OptimizerChangedError(CheckpointMismatchError):
    """A checkpoint whose optimizer state does not fit this run's optimizer."""


class CorruptCheckpointError(ValueError):
    """No intact checkpoint to resume from (every step failed to read)."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (a full disk, a quota, a lost mount)."""


class NonFiniteStateError(FloatingPointError):
    """A state with NaN/inf in its parameters or optimizer statistics: never checkpointed."""


class RunLockedError(RuntimeError):
    """Another trainer is running on the same model directory."""


def fingerprint(config_json: str) -> str:
    return hashlib.sha256(config_json.encode()).hexdigest()[:16]


def state_layout(state: Any) -> list[str]:
    """Every leaf's key path, shape and dtype: what a restore needs to fit. Key paths name the
    optimizer's statistics (``mu``/``nu``, ``v_row``/``v_col``), so another optimizer shows."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return [
        f"{jax.tree_util.keystr(path)}|{tuple(leaf.shape)}|{leaf.dtype}" for path, leaf in leaves
    ]


def all_finite(state: Any) -> bool:
    """Whether every floating leaf of ``state`` (parameters, optimizer statistics) is finite."""
    from tagi_jax.training import state as state_lib

    return bool(jax.device_get(jax.jit(state_lib.all_finite)(state)))


def _reason(error: BaseException) -> str:
    """The most specific line of an exception chain (orbax and TensorStore wrap OS errors in
    several layers; the innermost names the file and the errno)."""
    seen, chain = set(), []
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    for e in reversed(chain):
        if isinstance(e, OSError) and e.strerror:
            where = f" ({e.filename})" if e.filename else ""
            return f"{e.strerror}{where}"
    for e in reversed(chain):
        # TensorStore: '... Failed writing: "<file>": ...: File too large [os_error_code='27']'
        code = re.search(r"os_error_code='?(\d+)", str(e))
        if code:
            files = re.findall(r'"(/[^"]+)"', str(e))
            where = f" ({files[-1]})" if files else ""
            return f"{os.strerror(int(code.group(1)))}{where}"
    text = str(chain[0]).strip().splitlines() or [type(chain[0]).__name__]
    # TensorStore appends its whole spec after the reason
    first = text[0].split(" [tensorstore_spec=", 1)[0]
    return f"{type(chain[0]).__name__}: {first[:400]}"


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` (one place to change for orbax v1).

    ``run_fingerprints``: what else a resumed run must share with the checkpoint besides the
    model config (the base's fingerprint, the data settings, the batch size); a difference is
    a ``CheckpointMismatchError`` naming the item. ``optimizer``: the optimizer's settings,
    stored so that a restore into another optimizer can say so.
    """

    def __init__(
        self,
        model_dir: str,
        *,
        config_json: str,
        keep: int = 3,
        run_fingerprints: dict[str, Any] | None = None,
        optimizer: dict[str, Any] | None = None,
    ):
        # A URI (gs://) reaches orbax unchanged: orbax writes cloud storage itself.
        self.model_dir = paths.absolute(model_dir)
        self.directory = paths.join(self.model_dir, CHECKPOINTS_DIR)
        self.fingerprint = fingerprint(config_json)
        self.run_fingerprints = dict(run_fingerprints or {})
        self.optimizer = optimizer
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            create=True,
            # a save that failed half-way (a full disk) leaves a temporary directory behind
            cleanup_tmp_directories=True,
            # Synchronous: a save has finished (and can be trusted) when save() returns, which
            # the SIGTERM path needs before the process exits.
            enable_async_checkpointing=False,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, *, examples: int) -> None:
        """Saves ``state`` as ``step`` after ``examples`` training examples were consumed.
        Refuses a non-finite state (the newest checkpoint is always one to resume from); a
        failed write (full disk) is one ``CheckpointWriteError`` line and leaves the previous
        checkpoints as they were."""
        if not all_finite(state):
            raise NonFiniteStateError(
                f"refusing to checkpoint step {step}: the parameters or optimizer state hold "
                f"NaN/inf; the last good checkpoint in {self.directory} is kept"
            )
        meta = {
            "step": int(step),
            "examples": int(examples),
            "config_fingerprint": self.fingerprint,
            "run": self.run_fingerprints,
            "optimizer": self.optimizer,
            "state_layout": fingerprint("\n".join(state_layout(state))),
            "time": time.time(),
        }
        try:
            self.manager.save(
                int(step),
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )
            self.manager.wait_until_finished()
        except Exception as e:  # orbax re-raises OS errors in its own wrappers
            previous = [s for s in self.manager.all_steps() if s != int(step)]
            kept = f"step {max(previous)}" if previous else "none yet"
            raise CheckpointWriteError(
                f"could not write checkpoint step {step} to {self.directory}: {_reason(e)}; "
                f"the previous checkpoints are intact (newest: {kept}): free space and rerun "
                "to resume"
            ) from None

    def _check(self, step: int, meta: dict, abstract_state: Any) -> None:
        where = f"{self.directory}/{step}"
        if meta.get("config_fingerprint") != self.fingerprint:
            raise CheckpointMismatchError(
                f"checkpoint {where} was written for another model config "
                f"(fingerprint {meta.get('config_fingerprint')}, this run {self.fingerprint}); "
                "use a fresh MODEL_DIR or the original gin files"
            )
        for name, ours in self.run_fingerprints.items():
            theirs = meta.get("run", {}).get(name)
            if theirs is not None and theirs != ours:  # checkpoints before the field: no check
                raise CheckpointMismatchError(
                    f"checkpoint {where} was written with another {RUN_ITEMS.get(name, name)} "
                    f"({theirs!r}, this run {ours!r}); resume with the original setting or use "
                    "a fresh MODEL_DIR"
                )
        layout = meta.get("state_layout")
        if layout is not None and layout != fingerprint("\n".join(state_layout(abstract_state))):
            theirs, ours = meta.get("optimizer"), self.optimizer
            changed = (
                f"the optimizer changed ({_describe(theirs)} -> {_describe(ours)})"
                if theirs and ours and theirs != ours
                else "its optimizer state does not fit this run's optimizer"
            )
            raise OptimizerChangedError(
                f"cannot resume from {where}: {changed}; the optimizer statistics cannot carry "
                "over. Resume with the original OptimizerConfig (see MODEL_DIR/config.gin), or "
                "start a fresh MODEL_DIR with train.init_from pointing at a finished run"
            )

    def _read(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]
        if not isinstance(meta, dict):
            raise ValueError(f"meta is {type(meta).__name__}, not a JSON object")
        self._check(step, meta, abstract_state)
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            abstract_state,
        )
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        return restored["state"], meta

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """``(state, meta)`` of ``step`` (default: the newest intact checkpoint), placed as
        ``abstract_state``'s shardings say.

        A checkpoint that fails to read (a truncated or overwritten file, a deleted manifest
        or ``meta``) is corrupt: the next older one is tried, and once one restores the
        corrupt ones are moved aside to ``<model_dir>/checkpoints.corrupt/`` (never deleted)
        with a log line. A checkpoint of another config, base, data, batch size or optimizer
        is not corrupt: that is an error at once."""
        steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        corrupt: list[tuple[int, str]] = []
        for candidate in steps:
            try:
                state, meta = self._read(candidate, abstract_state)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # anything orbax/TensorStore/JSON raise on a damaged step
                corrupt.append((candidate, _reason(e)))
                print(
                    f"checkpoint {self.directory}/{candidate} is corrupt ({corrupt[-1][1]})",
                    flush=True,
                )
                continue
            self._agree_across_processes(candidate)
            if corrupt:
                self._set_aside([s for s, _ in corrupt], fallback=candidate)
            return state, meta
        listed = "; ".join(f"step {s}: {why}" for s, why in corrupt)
        raise CorruptCheckpointError(
            f"no intact checkpoint in {self.directory} ({listed}); nothing was moved or "
            "deleted: move the checkpoints directory aside to start over"
        )

    def _agree_across_processes(self, step: int) -> None:
        """Every process must resume from the same step (a damaged shard may be read by one
        host only)."""
        if jax.process_count() == 1:
            return
        from jax.experimental import multihost_utils

        steps = multihost_utils.process_allgather(np.asarray(step))
        if len(set(np.asarray(steps).reshape(-1).tolist())) != 1:
            raise CorruptCheckpointError(
                f"processes restored different steps from {self.directory} "
                f"({np.asarray(steps).tolist()}): a checkpoint is readable on some hosts only"
            )

    def _set_aside(self, steps: list[int], fallback: int) -> None:
        aside = paths.join(self.model_dir, CORRUPT_DIR)
        if jax.process_index() == 0:
            paths.makedirs(aside)
            for step in steps:
                target = paths.join(aside, f"{step}-{int(time.time())}")
                paths.move_dir(paths.join(self.directory, str(step)), target)
                print(
                    f"checkpoint step {step} is corrupt: moved aside to {target}; resuming from "
                    f"step {fallback}",
                    flush=True,
                )
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("tagi_checkpoint_set_aside")
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()


def _describe(optimizer: dict | None) -> str:
    if not optimizer:
        return "unknown"
    name = optimizer.get("name", "?")
    extras = [f"{k}={optimizer[k]}" for k in ("adafactor_factored",) if name == "adafactor"]
    return " ".join([name, *extras])


RUN_ITEMS = {
    "base": "base checkpoint (the files behind train.base_checkpoint changed)",
    "data": "data settings (task, formats, lengths)",
    "batch_size": "batch size",
}


class RunLock:
    """An exclusive lock on a model directory for one trainer: a second trainer on the same
    directory fails at once instead of writing the same steps twice. ``flock`` is released by
    the kernel when the holder dies (kill -9 included), so a crashed run never leaves a stale
    lock. Local and NFS paths; the holder's pid and host are written into the file for the
    error message. Cloud storage has no such lock: a ``gs://`` directory is not locked (one
    line says so), and keeping a second job off it is the scheduler's job."""

    def __init__(self, model_dir: str):
        self.directory = paths.absolute(model_dir)
        self.path = paths.join(self.directory, LOCK_FILE)
        self._file = None

    def __enter__(self):
        import fcntl
        import socket

        if paths.is_uri(self.directory):
            print(f"note: {self.directory} is cloud storage: no trainer lock on it", flush=True)
            return self
        os.makedirs(self.directory, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise RunLockedError(
                f"another trainer is running on {self.directory} ({holder}); wait for it to "
                "finish or stop it, or use another MODEL_DIR"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}")
        handle.flush()
        self._file = handle
        return self

    def __exit__(self, *exc):
        if self._file is not None:
            self._file.close()  # closing releases the flock
            self._file = None
        return False


class PreemptionGuard:
    """When to checkpoint and stop for a preemption (context manager).

    One process: SIGTERM is recorded instead of killing it, and ``should_stop(step)`` is True
    from the next step on. Several processes (``jax.distributed``): a SIGTERM reaches one host,
    or each at a different time, and a host that decided alone would wait forever in the
    collective save. JAX's preemption service (started by ``jax.distributed.initialize``,
    listening for SIGTERM itself) propagates the notice to every host and picks one safe step
    for all; ``should_stop`` is its ``reached_preemption_sync_point`` and must be called at
    every step on every host. No Python handler is installed then: it would replace the
    service's own.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self._coordinated = False

    def _handler(self, signum, frame):
        del signum, frame
        self.requested = True

    def __enter__(self):
        self._coordinated = jax.distributed.is_initialized()
        if not self._coordinated:
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def should_stop(self, step: int) -> bool:
        """True at the step where this process (with all the others) saves and stops."""
        if self._coordinated:
            from jax.experimental import multihost_utils

            self.requested = self.requested or multihost_utils.reached_preemption_sync_point(
                int(step)
            )
        return self.requested

    def __exit__(self, *exc):
        if not self._coordinated:
            signal.signal(signal.SIGTERM, self._previous)
        return False
