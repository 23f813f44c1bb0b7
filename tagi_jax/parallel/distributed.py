"""Multi-host start-up: ``jax.distributed.initialize`` when a run spans several processes.

On a Cloud TPU pod slice every worker runs the same command and JAX finds the coordinator
itself (``DistributedConfig.enabled = True`` with nothing else set); SLURM and Open MPI are
detected the same way. Elsewhere (GPU hosts without a scheduler, the two-process CPU test) give
the coordinator address, the process count and each process's id explicitly. It must run before
anything asks JAX for its devices, which is why the trainer calls it first.
"""

from __future__ import annotations

import dataclasses

import gin
import jax


@gin.configurable("DistributedConfig")
@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Attributes:
    enabled: call ``jax.distributed.initialize`` (False: one process, the default).
    coordinator_address: ``host:port`` of process 0; None lets JAX detect it (TPU, SLURM, MPI).
    num_processes, process_id: None lets JAX detect them.
    local_device_ids: the devices this process drives (GPU hosts with one process per GPU).
    """

    enabled: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        given = [self.coordinator_address, self.num_processes, self.process_id]
        if any(v is not None for v in given) and not self.enabled:
            raise ValueError(
                "DistributedConfig has a coordinator/process setting but enabled=False"
            )
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"DistributedConfig.num_processes={self.num_processes} must be >= 1")
        known = self.process_id is not None and self.num_processes is not None
        if known and not 0 <= self.process_id < self.num_processes:
            raise ValueError(
                f"DistributedConfig.process_id={self.process_id} is outside "
                f"[0, {self.num_processes})"
            )


def initialize(config: DistributedConfig | None) -> None:
    """Joins the process group (once; a second call is a no-op) and says where we stand."""
    if config is None or not config.enabled:
        return
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize(
        coordinator_address=config.coordinator_address,
        num_processes=config.num_processes,
        process_id=config.process_id,
        local_device_ids=list(config.local_device_ids) if config.local_device_ids else None,
    )
    print(
        f"process {jax.process_index()} of {jax.process_count()}: "
        f"{jax.local_device_count()} local of {jax.device_count()} devices",
        flush=True,
    )


def is_main_process() -> bool:
    """The process that writes logs, metrics and exports (all processes write checkpoints)."""
    return jax.process_index() == 0
