"""Orbax checkpoints of the train state: trainable parameters, optimizer state, step, RNG and
the data position — never the frozen base, which is re-read from its own checkpoint.

Layout (``<model_dir>/checkpoints/<step>/``): ``state`` (orbax StandardSave of ``TrainState``)
and ``meta`` (JSON: data position, the model config fingerprint, wall time). Saves are atomic
(orbax writes to a temporary directory and renames), the last ``keep`` are preserved, and a
state whose loss went non-finite is never saved, so the newest checkpoint is always good.
Restoring checks the fingerprint: a checkpoint of another model config is refused.

``PreemptionGuard`` turns SIGTERM (a preempted TPU VM, ``kill``) into a flag the training loop
polls: it saves a checkpoint at the current step and exits cleanly.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKPOINTS_DIR = "checkpoints"  # <model_dir>/checkpoints/<step>/{state,meta}
RUN_FILE = "run.json"  # <model_dir>/run.json: what `tagi_jax.export` needs to rebuild the model


class CheckpointMismatchError(ValueError):
    """A checkpoint written for another model configuration."""


def fingerprint(config_json: str) -> str:
    return hashlib.sha256(config_json.encode()).hexdigest()[:16]


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` (one place to change for orbax v1)."""

    def __init__(self, model_dir: str, *, config_json: str, keep: int = 3):
        self.directory = os.path.join(os.path.abspath(model_dir), CHECKPOINTS_DIR)
        self.fingerprint = fingerprint(config_json)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            create=True,
            # Synchronous: a save has finished (and can be trusted) when save() returns, which
            # the SIGTERM path needs before the process exits.
            enable_async_checkpointing=False,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, *, data_position: int) -> None:
        meta = {
            "step": int(step),
            "data_position": int(data_position),
            "config_fingerprint": self.fingerprint,
            "time": time.time(),
        }
        self.manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """``(state, meta)`` of ``step`` (default: the latest), placed as ``abstract_state``'s
        shardings say."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]
        if meta.get("config_fingerprint") != self.fingerprint:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} was written for another model config "
                f"(fingerprint {meta.get('config_fingerprint')}, this run {self.fingerprint}); "
                "use a fresh MODEL_DIR or the original gin files"
            )
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            abstract_state,
        )
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        return restored["state"], meta

    def close(self) -> None:
        self.manager.close()


class PreemptionGuard:
    """Records SIGTERM instead of dying, so the loop can checkpoint and exit (context manager)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        del signum, frame
        self.requested = True

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous)
        return False


def write_json(path: str, value: Any) -> None:
    """Atomic JSON write (temporary file, then rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
