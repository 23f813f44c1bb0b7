"""Multi-host start-up: ``jax.distributed.initialize`` when a run spans several processes.

On a Cloud TPU pod slice every worker runs the same command and JAX finds the coordinator
itself (``DistributedConfig.enabled = True`` with nothing else set). Under SLURM the arguments
come from SLURM's environment (``slurm_settings``, one process per GPU: see
``launch/slurm_gpu.sbatch`` and ``mesh/gpu_slurm.gin``). Elsewhere (GPU hosts without a
scheduler, the two-process CPU test) give the coordinator address, the process count and each
process's id explicitly (``mesh/gpu_multi_host.gin``). It must run before anything asks JAX for
its devices, which is why the trainer calls it first.

Why compute the SLURM arguments here instead of leaving them to JAX's own SLURM detection: JAX
gives each process exactly the GPU of its local rank (``local_device_ids=[SLURM_LOCALID]``),
whatever the number of tasks per node, so one task per node silently trains on one GPU of
eight; and it cannot tell a task that SLURM bound to its own GPU (``CUDA_VISIBLE_DEVICES`` of
one device, whose index is then 0, not the local rank) from one that sees the whole node. The
function below decides from the task count and the visible GPUs, and is testable without SLURM.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

import jax


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-process run (gin: ``DistributedConfig.<field>``).

    Attributes:
    enabled: call ``jax.distributed.initialize`` (False: one process, the default).
    coordinator_address: ``host:port`` of process 0; None: from SLURM's environment (see
        ``slurm_settings``), else JAX detects it (TPU, Open MPI).
    num_processes, process_id: None: from SLURM's environment, else JAX detects them.
    local_device_ids: the devices this process drives (None: under SLURM the GPUs of this
        task's local rank, elsewhere all devices of the host).
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


# --- SLURM ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SlurmSettings:
    """What one SLURM task passes to ``jax.distributed.initialize``, and where it stands."""

    coordinator_address: str  # first host of the step's node list : port
    num_processes: int  # tasks of the step
    process_id: int  # this task's rank in the step
    local_device_ids: tuple[int, ...] | None  # GPUs this task drives; None: no GPU visible
    job_id: str
    node: str | None  # this task's host
    local_rank: int  # rank among the tasks on this node
    tasks_on_node: int | None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM host list: ``gpu[001-004,007],cpu1`` -> ``gpu001``.

    Brackets may appear more than once (``rack[1-2]-n[01-04]`` -> ``rack1-n01``) and carry a
    suffix (``n[1-2]-ib`` -> ``n1-ib``); zero padding is kept because it is part of the name.
    """
    nodelist = nodelist.strip()
    # The first entry ends at the first comma outside brackets.
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end]
    if not entry or depth < 0:
        raise ValueError(f"cannot read a host from the SLURM node list {nodelist!r}")

    def first(match: re.Match) -> str:
        # "001-004,007" -> "001": the first range's start, or the first single entry
        return re.split(r"[-,]", match.group(1), maxsplit=1)[0]

    host = re.sub(r"\[([^\]]*)\]", first, entry)
    if not host or "[" in host or "]" in host:
        raise ValueError(f"cannot read a host from the SLURM node list {nodelist!r}")
    return host


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM's compressed per-node task counts: ``"8(x2),4"`` -> ``[8, 8, 4]``."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise ValueError(f"cannot read SLURM tasks per node {spec!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def _visible_gpus(environ: Mapping[str, str]) -> int | None:
    """How many GPUs this task sees: CUDA_VISIBLE_DEVICES (what CUDA will enumerate), else the
    GPUs SLURM gave the node; None when neither says."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    on_node = environ.get("SLURM_GPUS_ON_NODE")
    return int(on_node) if on_node and on_node.isdigit() else None


def slurm_settings(environ: Mapping[str, str]) -> SlurmSettings | None:
    """The ``jax.distributed.initialize`` arguments of this SLURM task, from ``environ``.

    None outside SLURM (no ``SLURM_JOB_ID``). Inside a SLURM allocation but outside an ``srun``
    step (the batch script itself, an ``salloc`` shell) it is an error: ``SLURM_NTASKS`` there
    counts tasks that will never start, and process 0 would wait for them.

    - coordinator: the first host of ``SLURM_STEP_NODELIST`` and ``JAX_COORDINATOR_PORT``, else
      JAX's own choice ``61440 + job id % 4096`` (every task derives the same port);
    - process count and id: ``SLURM_STEP_NUM_TASKS``/``SLURM_NTASKS`` and ``SLURM_PROCID``;
    - local devices: the visible GPUs split evenly over the tasks on this node, task
      ``SLURM_LOCALID`` taking its share (8 tasks and 8 GPUs: GPU ``local rank``; 1 task: all 8);
      when SLURM bound each task to its own GPUs (fewer visible than tasks on the node), all the
      visible ones; when nothing says how many GPUs there are, the local rank (JAX's default).
    """
    job_id = environ.get("SLURM_JOB_ID")
    if job_id is None:
        return None
    nodelist = environ.get("SLURM_STEP_NODELIST")
    missing = [k for k in ("SLURM_PROCID", "SLURM_LOCALID") if k not in environ]
    if (
        nodelist is None
        or missing
        or not (environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS"))
    ):
        raise ValueError(
            f"SLURM job {job_id} but not inside an srun step (SLURM_STEP_NODELIST, "
            "SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS needed): start the trainer with srun, "
            "one task per GPU (launch/slurm_gpu.sbatch)"
        )
    num_processes = int(environ.get("SLURM_STEP_NUM_TASKS") or environ["SLURM_NTASKS"])
    process_id = int(environ["SLURM_PROCID"])
    local_rank = int(environ["SLURM_LOCALID"])
    if not 0 <= process_id < num_processes:
        raise ValueError(f"SLURM_PROCID={process_id} is outside [0, {num_processes})")

    port = environ.get("JAX_COORDINATOR_PORT")
    if not port:
        # JAX's SlurmCluster rule, so a process that falls back to JAX's detection agrees.
        digits = re.sub(r"\D", "", job_id) or "0"
        port = str(int(digits) % 2**12 + (65535 - 2**12 + 1))
    coordinator = f"{first_slurm_host(nodelist)}:{port}"

    tasks_on_node = None
    spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    node_id = environ.get("SLURM_NODEID")
    if spec and node_id is not None:
        counts = expand_tasks_per_node(spec)
        if int(node_id) < len(counts):
            tasks_on_node = counts[int(node_id)]
    if tasks_on_node is None and environ.get("SLURM_NTASKS_PER_NODE"):
        tasks_on_node = int(environ["SLURM_NTASKS_PER_NODE"])

    gpus = _visible_gpus(environ)
    if gpus is None or tasks_on_node is None:
        local_device_ids = None if gpus == 0 else (local_rank,)
    elif gpus == 0:
        local_device_ids = None  # CPU-only job: nothing to choose
    elif gpus < tasks_on_node:
        # SLURM bound GPUs to tasks (--gpus-per-task, --gpu-bind): this task sees only its own,
        # numbered from 0 again.
        local_device_ids = tuple(range(gpus))
    else:
        if gpus % tasks_on_node:
            raise ValueError(
                f"{gpus} GPUs on {environ.get('SLURMD_NODENAME', 'this node')} do not split "
                f"evenly over its {tasks_on_node} tasks: use --ntasks-per-node equal to "
                "--gpus-per-node (one process per GPU)"
            )
        share = gpus // tasks_on_node
        local_device_ids = tuple(range(local_rank * share, (local_rank + 1) * share))
    return SlurmSettings(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        job_id=job_id,
        node=environ.get("SLURMD_NODENAME"),
        local_rank=local_rank,
        tasks_on_node=tasks_on_node,
    )


def initialize_arguments(
    config: DistributedConfig, environ: Mapping[str, str]
) -> tuple[dict, SlurmSettings | None]:
    """The keyword arguments of ``jax.distributed.initialize``: what the config gives, the rest
    from SLURM's environment when there is one (None values: JAX detects them itself)."""
    slurm = slurm_settings(environ) if config.coordinator_address is None else None
    local = config.local_device_ids
    if local is None and slurm is not None:
        local = slurm.local_device_ids
    kwargs = {
        "coordinator_address": config.coordinator_address
        or (slurm.coordinator_address if slurm else None),
        "num_processes": config.num_processes
        if config.num_processes is not None
        else (slurm.num_processes if slurm else None),
        "process_id": config.process_id
        if config.process_id is not None
        else (slurm.process_id if slurm else None),
        "local_device_ids": list(local) if local else None,
    }
    return kwargs, slurm


def initialize(config: DistributedConfig | None, environ: Mapping[str, str] | None = None) -> None:
    """Joins the process group (once; a second call is a no-op); every process prints one line
    saying which of the processes it is and which devices it drives."""
    if config is None or not config.enabled:
        return
    if jax.distributed.is_initialized():
        return
    kwargs, slurm = initialize_arguments(config, os.environ if environ is None else environ)
    jax.distributed.initialize(**kwargs)
    where = (
        f" [SLURM job {slurm.job_id}, node {slurm.node or '?'}, local rank {slurm.local_rank}]"
        if slurm
        else ""
    )
    local = ", ".join(str(d) for d in jax.local_devices())
    print(
        f"process {jax.process_index()} of {jax.process_count()}{where}: "
        f"{jax.local_device_count()} local ({local}) of {jax.device_count()} devices",
        flush=True,
    )


def is_main_process() -> bool:
    """The process that writes logs, metrics and exports (all processes write checkpoints)."""
    return jax.process_index() == 0
