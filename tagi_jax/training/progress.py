"""Training progress: a one-line bar on a terminal (plain log lines otherwise), JSONL metrics and
TensorBoard event files in ``MODEL_DIR``, tokens per second and model FLOPs utilisation.

MFU = (model FLOPs of one step) x (steps per second) / (peak FLOP/s of all devices). The model
FLOPs are counted from the architecture (``training.flops``: matmuls, attention included, the
frozen backbone's backward costing activation gradients only); the peak per device is a
property of the hardware and comes from the mesh gin file (``train.peak_flops_per_device``);
without it MFU is not reported.

``MODEL_DIR`` may be a local directory or a cloud path (``gs://bucket/run``): files are opened
through ``etils.epath`` (``tensorboard.as_path``), never with ``os`` path functions.
``metrics.jsonl`` is flushed at every logged step on a local disk (a killed run keeps every
line); on cloud storage, where an object cannot be appended to, it is kept in memory and the
object rewritten (``tensorboard.CloudFile``, starting from a resumed run's lines) at most every
``tensorboard.CLOUD_FLUSH_SECS`` and at ``close``: each rewrite uploads the whole object and an
object takes about one update per second.
"""

from __future__ import annotations

import json
import sys
import time

from tagi_jax.training import tensorboard


def xla_step_flops(compiled) -> float | None:
    """FLOPs per device of a compiled step by XLA's cost analysis, or None where unavailable.
    Not used for MFU: on GPU it misses matmuls that run as library calls (see training.flops)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001  (some backends do not implement it: MFU is optional)
        return None
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per partition
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


class Progress:
    """Logs a window of steps at a time; only the main process writes (``enabled``).

    ``flops_per_step``: model FLOPs of one (global) step; ``peak_flops``: of all devices.
    """

    def __init__(
        self,
        model_dir: str,
        total: int,
        start: int,
        *,
        enabled: bool = True,
        flops_per_step: float | None = None,
        peak_flops: float | None = None,
    ):
        self.total, self.start_step = total, start
        self.enabled = enabled
        self.flops_per_step = flops_per_step
        self.peak = peak_flops  # all devices together
        self.start_time = time.time()
        self.tty = sys.stdout.isatty()
        directory = tensorboard.as_path(model_dir)
        self.metrics_path = str(directory / "metrics.jsonl")
        self._window_start = time.time()
        self._window_steps = 0
        self._window_tokens = 0
        self._printed_bar = False
        self._flush_secs = (
            tensorboard.CLOUD_FLUSH_SECS if tensorboard.is_cloud_path(model_dir) else 0
        )
        self._flushed = time.time()
        self.metrics_file = None
        self.writer = None
        if enabled:
            directory.mkdir(parents=True, exist_ok=True)
            if tensorboard.is_cloud_path(model_dir):
                # object stores cannot append (gcsfs silently overwrites): see CloudFile
                self.metrics_file = tensorboard.CloudFile(self.metrics_path, append=True)
            else:
                self.metrics_file = (directory / "metrics.jsonl").open("a")  # closed in close()
            self.writer = tensorboard.SummaryWriter(str(directory / "tensorboard"))

    def count(self, tokens: int) -> None:
        """One finished step that processed ``tokens`` (non-padding) tokens."""
        self._window_steps += 1
        self._window_tokens += tokens

    def log(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Writes ``metrics`` plus throughput for the window since the last call; returns all."""
        now = time.time()
        elapsed = max(now - self._window_start, 1e-9)
        record = dict(metrics)
        record["tokens_per_second"] = self._window_tokens / elapsed
        record["steps_per_second"] = self._window_steps / elapsed
        if self.flops_per_step and self.peak:
            record["mfu"] = self.flops_per_step * record["steps_per_second"] / self.peak
        self._window_start, self._window_steps, self._window_tokens = now, 0, 0
        if not self.enabled:
            return record
        done = step - self.start_step
        eta = (now - self.start_time) / max(done, 1) * (self.total - step)
        line = (
            f"step {step}/{self.total}  loss {record['loss']:.4f}  "
            f"tokens/s {record['tokens_per_second']:,.0f}"
            + (f"  MFU {100 * record['mfu']:.1f}%" if "mfu" in record else "")
            + f"  ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        )
        if self.tty:
            print("\r" + line, end="", flush=True)
            self._printed_bar = True
        else:
            print(line, flush=True)
        self.metrics_file.write(json.dumps({"step": step, "time": now} | record) + "\n")
        if now - self._flushed >= self._flush_secs:
            self.metrics_file.flush()
            self._flushed = now
        self.writer.scalars(step, record)
        return record

    def message(self, text: str) -> None:
        """A line that must not be overwritten by the bar."""
        if not self.enabled:
            return
        if self._printed_bar:
            print()
            self._printed_bar = False
        print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._printed_bar:
            print()
        self.metrics_file.close()
        self.writer.close()
