"""Launching at scale, on CPU without a scheduler or a network: SLURM's environment to
``jax.distributed`` arguments (faked environments), TensorFlow kept off the accelerators, and the
launch scripts (``bash -n``, their dry runs, the pattern that finds a stale trainer)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import types

import pytest

from tagi_jax.data import tf_setup
from tagi_jax.parallel import distributed
from tagi_jax.parallel.distributed import (
    DistributedConfig,
    expand_tasks_per_node,
    first_slurm_host,
    initialize_arguments,
    slurm_settings,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(ROOT, "launch", "tpu_pod.sh")
SBATCH = os.path.join(ROOT, "launch", "slurm_gpu.sbatch")
JOB_ID = "4242"
PORT = str(int(JOB_ID) % 4096 + 61440)  # JAX's SlurmCluster rule


def slurm_task(rank: int, nodes: int = 2, per_node: int = 8, gpus: str | None = None) -> dict:
    """The environment srun gives task ``rank`` of ``nodes`` x ``per_node`` tasks."""
    node = rank // per_node
    env = {
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_NODELIST": f"gpu[001-{nodes:03d}]",
        "SLURM_STEP_NODELIST": f"gpu[001-{nodes:03d}]",
        "SLURM_NNODES": str(nodes),
        "SLURM_NTASKS": str(nodes * per_node),
        "SLURM_STEP_NUM_TASKS": str(nodes * per_node),
        "SLURM_NTASKS_PER_NODE": str(per_node),
        "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})",
        "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})",
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank % per_node),
        "SLURM_NODEID": str(node),
        "SLURMD_NODENAME": f"gpu{node + 1:03d}",
        "SLURM_GPUS_ON_NODE": "8",
        "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7" if gpus is None else gpus,
    }
    return env


# --- SLURM -> jax.distributed -----------------------------------------------------------------


def test_two_nodes_of_eight_tasks():
    settings = [slurm_settings(slurm_task(rank)) for rank in range(16)]
    assert {s.coordinator_address for s in settings} == {f"gpu001:{PORT}"}
    assert [s.num_processes for s in settings] == [16] * 16
    assert [s.process_id for s in settings] == list(range(16))
    # one process per GPU: each drives the GPU of its local rank
    assert [s.local_device_ids for s in settings] == [(r % 8,) for r in range(16)]
    assert [s.node for s in settings] == ["gpu001"] * 8 + ["gpu002"] * 8
    assert {s.tasks_on_node for s in settings} == {8}


def test_coordinator_agrees_with_jax_own_slurm_detection(monkeypatch):
    from jax._src.clusters.slurm_cluster import SlurmCluster

    for nodelist in ("gpu[001-002]", "gpu[007,009-012],cpu3", "node17", "a-b[01-02]-ib"):
        env = slurm_task(3) | {"SLURM_STEP_NODELIST": nodelist}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert SlurmCluster.is_env_present()
        ours = slurm_settings(env)
        assert ours.coordinator_address.split(":")[1] == PORT
        if "]-" not in nodelist:  # JAX drops a suffix after the brackets; we keep it
            assert ours.coordinator_address == SlurmCluster.get_coordinator_address(None, None)
    env = slurm_task(0) | {"JAX_COORDINATOR_PORT": "12345"}
    assert slurm_settings(env).coordinator_address == "gpu001:12345"


@pytest.mark.parametrize(
    "nodelist,host",
    [
        ("gpu[001-002]", "gpu001"),
        ("gpu001", "gpu001"),
        ("gpu001,gpu002", "gpu001"),
        ("gpu[007,009-012],cpu3", "gpu007"),
        ("rack[1-2]-n[01-04]", "rack1-n01"),
        ("n[1-2]-ib", "n1-ib"),
        (" h1 ", "h1"),
    ],
)
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


@pytest.mark.parametrize("bad", ["", "gpu[001", "[]", ",x"])
def test_unreadable_node_list(bad):
    with pytest.raises(ValueError, match="node list"):
        first_slurm_host(bad)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("8(x2),4") == [8, 8, 4]
    assert expand_tasks_per_node("8") == [8]
    with pytest.raises(ValueError, match="tasks per node"):
        expand_tasks_per_node("8(2)")


def test_one_task_per_node_drives_all_eight_gpus():
    """The old layout (one process per node) no longer silently trains on one GPU of eight."""
    env = slurm_task(1, nodes=2, per_node=1)
    settings = slurm_settings(env)
    assert (settings.process_id, settings.num_processes) == (1, 2)
    assert settings.local_device_ids == tuple(range(8))


def test_gpus_bound_per_task_are_renumbered_from_zero():
    """--gpus-per-task / --gpu-bind: task 5 sees only its GPU, which CUDA calls device 0."""
    assert slurm_settings(slurm_task(5, gpus="5")).local_device_ids == (0,)


def test_four_tasks_share_eight_gpus_two_each():
    ids = [slurm_settings(slurm_task(r, nodes=1, per_node=4)).local_device_ids for r in range(4)]
    assert ids == [(0, 1), (2, 3), (4, 5), (6, 7)]


def test_uneven_split_is_an_error():
    with pytest.raises(ValueError, match="do not split evenly"):
        slurm_settings(slurm_task(0, nodes=1, per_node=3))


def test_cpu_only_and_unknown_gpu_counts():
    cpu = slurm_task(2) | {"CUDA_VISIBLE_DEVICES": ""}
    assert slurm_settings(cpu).local_device_ids is None
    unknown = {
        k: v
        for k, v in slurm_task(2).items()
        if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE")
    }
    assert slurm_settings(unknown).local_device_ids == (2,)  # JAX's own default


def test_outside_slurm_and_outside_an_srun_step():
    assert slurm_settings({"PATH": "/usr/bin"}) is None
    batch_script = {
        k: v for k, v in slurm_task(0).items() if not k.startswith("SLURM_STEP")
    }  # the batch script itself: no step
    with pytest.raises(ValueError, match="srun"):
        slurm_settings(batch_script)


def test_initialize_arguments_config_wins():
    env = slurm_task(9)
    kwargs, slurm = initialize_arguments(DistributedConfig(enabled=True), env)
    assert kwargs == {
        "coordinator_address": f"gpu001:{PORT}",
        "num_processes": 16,
        "process_id": 9,
        "local_device_ids": [1],
    }
    assert slurm.node == "gpu002" and slurm.local_rank == 1
    given = DistributedConfig(enabled=True, local_device_ids=(0, 1, 2, 3, 4, 5, 6, 7))
    assert initialize_arguments(given, env)[0]["local_device_ids"] == list(range(8))
    explicit = DistributedConfig(
        enabled=True, coordinator_address="h:1", num_processes=2, process_id=1
    )
    kwargs, slurm = initialize_arguments(explicit, env)  # an explicit coordinator: no SLURM
    assert slurm is None
    assert kwargs == {
        "coordinator_address": "h:1",
        "num_processes": 2,
        "process_id": 1,
        "local_device_ids": None,
    }
    # Nothing known (a TPU pod): all None, JAX detects it.
    assert set(initialize_arguments(DistributedConfig(enabled=True), {})[0].values()) == {None}


def test_initialize_passes_slurm_arguments_and_prints_one_line(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(distributed.jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    distributed.initialize(DistributedConfig(enabled=True), environ=slurm_task(0))
    assert calls == [
        {
            "coordinator_address": f"gpu001:{PORT}",
            "num_processes": 16,
            "process_id": 0,
            "local_device_ids": [0],
        }
    ]
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"process 0 of 1 [SLURM job {JOB_ID}, node gpu001, local rank 0]: ")
    distributed.initialize(DistributedConfig(enabled=False), environ=slurm_task(0))
    assert len(calls) == 1


# --- TensorFlow off the accelerators ------------------------------------------------------------


def test_tf_setup_hides_gpus_and_tpus_once(monkeypatch):
    """With a stand-in TensorFlow that has a GPU: hidden before anything else, and only once."""
    calls = []
    config = types.SimpleNamespace(
        set_visible_devices=lambda devices, kind: calls.append((devices, kind)),
        get_visible_devices=lambda kind: [],
    )
    monkeypatch.setitem(sys.modules, "tensorflow", types.SimpleNamespace(config=config))
    monkeypatch.setattr(tf_setup, "_tf", None)
    monkeypatch.delenv("TF_FORCE_GPU_ALLOW_GROWTH", raising=False)
    tf = tf_setup.import_tensorflow()
    assert tf is sys.modules["tensorflow"]
    assert calls == [([], "GPU"), ([], "TPU")]
    assert os.environ["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
    assert tf_setup.import_tensorflow() is tf
    assert len(calls) == 2


def test_tf_setup_warns_when_tensorflow_already_holds_a_gpu(monkeypatch, caplog):
    def refuse(devices, kind):
        raise RuntimeError("Visible devices cannot be modified after being initialized")

    config = types.SimpleNamespace(
        set_visible_devices=refuse,
        get_visible_devices=lambda kind: [types.SimpleNamespace(name="GPU:0")] * (kind == "GPU"),
    )
    monkeypatch.setitem(sys.modules, "tensorflow", types.SimpleNamespace(config=config))
    monkeypatch.setattr(tf_setup, "_tf", None)
    tf_setup.import_tensorflow()
    assert "already initialised GPU devices ['GPU:0']" in caplog.text


def test_tf_setup_with_real_tensorflow():
    code = (
        "import os, sys\n"
        "from tagi_jax.data import tf_setup\n"
        "assert 'tensorflow' not in sys.modules\n"  # importing the module is free
        "tf = tf_setup.import_tensorflow()\n"
        "assert tf_setup.import_tensorflow() is tf\n"
        "assert tf.config.get_visible_devices('GPU') == []\n"
        "assert tf.config.get_visible_devices('TPU') == []\n"
        "assert 'CPU' in (tf.constant(1) + 1).device\n"
        "assert os.environ['TF_FORCE_GPU_ALLOW_GROWTH'] == 'true'\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_FORCE_GPU_ALLOW_GROWTH", None)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


# --- launch scripts ---------------------------------------------------------------------------


def _bash(args, env=None, check=True):
    out = subprocess.run(
        ["bash", *args], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT
    )
    if check:
        assert out.returncode == 0, out.stderr
    return out


def _remote_scripts(dry_run_output: str) -> list[tuple[str, str]]:
    """(gcloud command line, remote script) of every ssh in a tpu_pod.sh dry run."""
    return re.findall(r"^(gcloud .*?)<<REMOTE\n(.*?)\nREMOTE$", dry_run_output, re.M | re.S)


@pytest.mark.parametrize("script", ["launch/tpu_pod.sh", "launch/slurm_gpu.sbatch"])
def test_scripts_parse_and_are_executable(script):
    _bash(["-n", os.path.join(ROOT, script)])
    assert os.access(os.path.join(ROOT, script), os.X_OK)
    if shutil.which("shellcheck"):
        out = subprocess.run(
            ["shellcheck", os.path.join(ROOT, script)], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stdout


def _sbatch_env(**extra):
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "TAGI_DRY_RUN": "1",
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_SUBMIT_DIR": ROOT,
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS": "16",
        "SLURM_NTASKS_PER_NODE": "8",
        "SLURM_CPUS_ON_NODE": "96",
        "SLURM_JOB_NODELIST": "gpu[001-002]",
    }
    return env | extra


def test_sbatch_dry_run_command():
    flags = ["--gin_file=runs/finetune_sni.gin", "--gin.MODEL_DIR='/shared/runs/ft'"]
    flags += ["--gin.DATA_DIR='/data dir/sni'"]
    out = _bash([SBATCH, *flags], env=_sbatch_env()).stdout
    lines = out.splitlines()
    (srun,) = [line for line in lines if line.startswith("srun ")]
    words = srun.split()
    assert words[:7] == [
        "srun",
        "--nodes=2",
        "--ntasks-per-node=8",
        "--cpus-per-task=12",
        "--kill-on-bad-exit=1",
        f"--chdir={ROOT}",
        "--output=/shared/runs/ft/logs/slurm-4242/task_%t.log",
    ]
    python = os.path.join(ROOT, ".venv", "bin", "python")
    assert f"{python} -m tagi_jax.train --gin_file=runs/finetune_sni.gin " in srun
    assert r"--gin.MODEL_DIR=\'/shared/runs/ft\'" in srun  # passed through, quoted
    assert r"--gin.DATA_DIR=\'/data\ dir/sni\'" in srun
    assert words[-1] == "--gin_file=mesh/gpu_slurm.gin"  # after the run file
    assert "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.90" in lines
    assert "export TF_FORCE_GPU_ALLOW_GROWTH=true" in lines
    assert "mkdir -p /shared/runs/ft/logs/slurm-4242" in lines


def test_sbatch_logs_for_a_gs_run_and_a_mesh_of_ones_own(tmp_path):
    flags = ["--gin_file=runs/x.gin", "--gin_file=mesh/gpu_8_host.gin"]
    flags += ["--gin.MODEL_DIR='gs://bucket/run'"]
    env = _sbatch_env(SLURM_SUBMIT_DIR=str(tmp_path), TAGI_REPO=ROOT, TAGI_PYTHON="/opt/py")
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "0.8"
    out = _bash([SBATCH, *flags], env=env).stdout
    (srun,) = [line for line in out.splitlines() if line.startswith("srun ")]
    assert f"--output={tmp_path}/logs/slurm-4242/task_%t.log" in srun
    assert "/opt/py -m tagi_jax.train" in srun
    assert "mesh/gpu_slurm.gin" not in srun
    assert "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.8" in out


def test_sbatch_outside_slurm_is_an_error():
    out = _bash([SBATCH, "--gin_file=runs/x.gin"], env={"PATH": os.environ["PATH"]}, check=False)
    assert out.returncode == 2 and "not inside a SLURM job" in out.stderr


def _pod(*args, **env):
    environ = dict(os.environ, TAGI_DRY_RUN="1", **env)
    return _bash([TPU_POD, *args], env=environ, check=False)


def test_tpu_pod_start_runs_detached_with_per_worker_logs():
    flags = ["--gin_file=runs/finetune_sni.gin", "--gin_file=mesh/tpu_v4_pod_slice.gin"]
    flags += ["--gin.MODEL_DIR='/mnt/shared/ft'"]
    out = _pod("tagi-v4-32", "us-central2-b", "proj", "--", *flags)
    assert out.returncode == 0, out.stderr
    ssh = _remote_scripts(out.stdout)
    assert len(ssh) == 3  # unpack, environment, start
    for command, script in ssh:
        assert "--worker=all" in command and "--project proj" in command
        parsed = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
        assert parsed.returncode == 0, (script, parsed.stderr)
    start = ssh[-1][1]
    assert "setsid nohup ~/tagi_venv/bin/python -m tagi_jax.train" in start
    assert r"--gin.MODEL_DIR=\'/mnt/shared/ft\'" in start
    assert "</dev/null &" in start  # detached: nothing ties it to the ssh session
    assert "log_dir=/mnt/shared/ft/logs" in start
    assert 'log="$log_dir/worker_$w.log"' in start
    assert "agent-worker-number" in start
    assert 'ln -sfn "$log" $HOME/tagi_jax_logs/latest.log' in start
    assert "--kill first" in start  # refuses when a trainer already runs
    assert "gcloud compute tpus tpu-vm scp" in out.stdout
    assert "logs: /mnt/shared/ft/logs/worker_<i>.log" in out.stdout


def test_tpu_pod_start_with_a_gs_model_dir_logs_on_each_worker():
    out = _pod("t", "z", "--", "--gin_file=a.gin", "--gin.MODEL_DIR='gs://b/run'", SKIP_SETUP="1")
    assert out.returncode == 0, out.stderr
    ((command, start),) = _remote_scripts(out.stdout)
    assert "--project" not in command
    assert "log_dir=$HOME/tagi_jax_logs" in start
    assert "on each worker's own disk" in out.stdout


def test_tpu_pod_kill_logs_status():
    out = _pod("--kill", "t", "z", TAGI_KILL_GRACE="7")
    assert out.returncode == 0, out.stderr
    ((command, kill),) = _remote_scripts(out.stdout)
    assert "--worker=all" in command
    assert "kill -TERM" in kill and "kill -KILL" in kill and "seq 7" in kill
    assert "rm -f /tmp/libtpu_lockfile" in kill
    assert subprocess.run(["bash", "-n"], input=kill, text=True).returncode == 0

    ((command, logs),) = _remote_scripts(_pod("--logs", "t", "z").stdout)
    assert "--worker=0" in command
    assert logs == "tail -n 100 -F $HOME/tagi_jax_logs/latest.log"

    ((command, status),) = _remote_scripts(_pod("--status", "t", "z", "p").stdout)
    assert "--worker=all" in command and "--project p" in command
    assert "pgrep -f" in status
    assert subprocess.run(["bash", "-n"], input=status, text=True).returncode == 0


@pytest.mark.parametrize(
    "args",
    [[], ["t"], ["t", "z"], ["t", "z", "--"], ["--kill", "t", "z", "--", "--gin_file=x"]],
)
def test_tpu_pod_usage_errors(args):
    out = _pod(*args)
    assert out.returncode == 2
    assert "launch/tpu_pod.sh" in out.stderr  # the usage text


def test_stale_trainer_pattern_matches_the_trainer_not_its_shell():
    """--kill / --status / the start check find `python -m tagi_jax.train` by its command line;
    the remote shell, whose command line contains the launch command, must not match."""
    ((_, kill),) = _remote_scripts(_pod("--kill", "t", "z").stdout)
    quoted = re.search(r"^pattern=(.*)$", kill, re.M).group(1)
    pattern = subprocess.run(
        ["bash", "-c", f"printf %s {quoted}"], capture_output=True, text=True
    ).stdout
    assert pattern == "^[^ ]*python[0-9.]* -m tagi_jax[.]train( |$)"
    marker = f"--gin.MODEL_DIR=/tmp/marker-{os.getpid()}"
    trainer = subprocess.Popen(
        ["bash", "-c", f'exec -a "/x/tagi_venv/bin/python -m tagi_jax.train {marker}" sleep 30']
    )
    # `read -t` is a builtin: no child process is left behind when the shell is killed
    shell = subprocess.Popen(
        ["bash", "-c", f"read -t 30 x; ~/tagi_venv/bin/python -m tagi_jax.train {marker}"],
        stdin=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 10
        found: set[int] = set()
        while trainer.pid not in found and time.time() < deadline:
            time.sleep(0.05)
            listed = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
            found = {int(p) for p in listed.stdout.split()}
        assert trainer.pid in found
        assert shell.pid not in found
    finally:
        for process in (trainer, shell):
            process.kill()
            process.wait()


def test_two_cpu_processes_join_through_a_fake_slurm_step():
    """What srun starts, on this machine: two tasks whose only settings are SLURM's variables
    (node list `localhost`) join one jax.distributed group through ``distributed.initialize``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import jax\n"
        "from tagi_jax.parallel import distributed\n"
        "distributed.initialize(distributed.DistributedConfig(enabled=True))\n"
        "print('joined', jax.process_index(), jax.process_count(), jax.device_count())\n"
    )
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
        env |= {k: v for k, v in slurm_task(rank, nodes=1, per_node=2).items()}
        env.pop("CUDA_VISIBLE_DEVICES")
        env.pop("SLURM_GPUS_ON_NODE")
        env |= {"SLURM_STEP_NODELIST": "localhost", "JAX_COORDINATOR_PORT": str(port)}
        env |= {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    for rank, (out, _) in enumerate(outs):
        assert f"process {rank} of 2 [SLURM job {JOB_ID}, node gpu001, local rank {rank}]" in out
        assert f"joined {rank} 2 2" in out
