#!/usr/bin/env bash
# Runs a tagi_jax stage on every worker of a Cloud TPU pod slice (v4 / v5e), the t5x way: the
# same command on all hosts at once; jax.distributed (mesh/tpu_*_pod_slice.gin) finds the
# coordinator and process ids itself, and each host feeds its own rows of the global batch.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] -- <python -m tagi_jax.train flags>   start
#   launch/tpu_pod.sh --kill   TPU_NAME ZONE [PROJECT]   stop the trainer on every worker, free the TPU
#   launch/tpu_pod.sh --logs   TPU_NAME ZONE [PROJECT]   follow worker 0's log (Ctrl-C: the job goes on)
#   launch/tpu_pod.sh --status TPU_NAME ZONE [PROJECT]   per worker: running or not, last log lines
#
# e.g.
#   launch/tpu_pod.sh tagi-v4-32 us-central2-b my-project -- \
#     --gin_file=runs/finetune_sni.gin --gin_file=mesh/tpu_v4_pod_slice.gin \
#     --gin.MODEL_DIR="'/mnt/shared/runs/finetune'" --gin.DATA_DIR="'/mnt/shared/sni'" ...
#
# Start (each step one `gcloud compute tpus tpu-vm ... --worker=all`):
#   1. copy this checkout to ~/tagi_jax on every worker (scp; no git access needed there);
#   2. create ~/tagi_venv there from requirements.txt plus jax[tpu] of the pinned version;
#   3. start the trainer detached on every worker (setsid nohup: a dropped ssh connection does
#      not end it) and return. A worker where a trainer already runs refuses: --kill first.
# Logs: each worker appends to <MODEL_DIR>/logs/worker_<i>.log (i: the TPU worker number), or,
# when MODEL_DIR is a gs:// path or not given as --gin.MODEL_DIR, to ~/tagi_jax_logs/worker_<i>.log
# on the worker's own disk; TAGI_LOG_DIR=DIR overrides. ~/tagi_jax_logs/latest.log on every
# worker links to its current log (what --logs and --status read), ~/tagi_jax_logs/train.pid
# holds the trainer's pid (also its process group).
# --kill: SIGTERM to every tagi_jax.train on every worker (the trainer saves a checkpoint and
# exits), SIGKILL after TAGI_KILL_GRACE seconds (default 60), then removes /tmp/libtpu_lockfile
# and names any other process still holding the TPU.
# MODEL_DIR, data and weights must be the same path on every worker: a Filestore/NFS or
# gcsfuse mount (orbax writes each host's shards there and restores them from there).
# TAGI_DRY_RUN=1 (or DRY_RUN=1) prints the commands instead of running them.
# SKIP_SETUP=1 skips steps 1-2.
set -euo pipefail

usage() {
  awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0" >&2 # the header above
  exit 2
}

mode=start
case "${1:-}" in
  --kill) mode="kill"; shift ;;
  --logs) mode="logs"; shift ;;
  --status) mode="status"; shift ;;
  -h | --help) usage ;;
esac
[[ $# -lt 2 ]] && usage
tpu="$1" zone="$2"
shift 2
project=()
if [[ $# -gt 0 && "$1" != "--" ]]; then
  project=(--project "$1")
  shift
fi
[[ "${1:-}" == "--" ]] && shift
if [[ "$mode" == start && $# -eq 0 ]]; then
  echo "error: no training flags after --" >&2
  usage
fi
if [[ "$mode" != start && $# -gt 0 ]]; then
  echo "error: --$mode takes no training flags" >&2
  usage
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dry_run="${TAGI_DRY_RUN:-${DRY_RUN:-0}}"

# The trainer's command line starts with its interpreter ("/home/u/tagi_venv/bin/python -m
# tagi_jax.train ..."); anchoring the pattern there keeps pgrep/pkill from matching the remote
# shell whose own command line contains the launch command.
pattern='^[^ ]*python[0-9.]* -m tagi_jax[.]train( |$)'
# shellcheck disable=SC2016  # both expanded on the worker, not here
state='$HOME/tagi_jax_logs'
# The worker number the TPU VM's metadata server gives (0 is the coordinator's host).
# shellcheck disable=SC2016
worker_id='w=$(curl -sf -H "Metadata-Flavor: Google" http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)'

run() {
  if [[ "$dry_run" == "1" ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}
# One gcloud ssh on the given workers. A dry run prints the remote script as it is sent, between
# markers, so that it can be read (and tested) without shell quoting.
ssh_workers() {
  local workers="$1" script="$2"
  local cmd=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${project[@]}"
    "--worker=$workers" --command)
  if [[ "$dry_run" == "1" ]]; then
    printf '%q ' "${cmd[@]}"
    printf '<<REMOTE\n%s\nREMOTE\n' "$script"
  else
    "${cmd[@]}" "$script"
  fi
}

case "$mode" in
  kill)
    grace="${TAGI_KILL_GRACE:-60}"
    [[ "$grace" =~ ^[0-9]+$ ]] || { echo "error: TAGI_KILL_GRACE=$grace is not a number" >&2; exit 2; }
    echo "== stopping tagi_jax.train on every worker of $tpu"
    ssh_workers all "$worker_id
pattern=$(printf '%q' "$pattern")
pids=\$(pgrep -f \"\$pattern\" | tr '\n' ' ' || true)
if [ -n \"\$pids\" ]; then
  echo \"worker \$w: SIGTERM to \$pids (the trainer saves a checkpoint, then exits)\"
  for p in \$pids; do kill -TERM -- \"-\$p\" 2>/dev/null || kill -TERM \"\$p\" 2>/dev/null || true; done
  for i in \$(seq $grace); do pgrep -f \"\$pattern\" >/dev/null || break; sleep 1; done
  left=\$(pgrep -f \"\$pattern\" | tr '\n' ' ' || true)
  if [ -n \"\$left\" ]; then
    echo \"worker \$w: still running after ${grace} s: SIGKILL to \$left\"
    for p in \$left; do kill -KILL -- \"-\$p\" 2>/dev/null || kill -KILL \"\$p\" 2>/dev/null || true; done
    sleep 2
  fi
else
  echo \"worker \$w: no tagi_jax.train running\"
fi
rm -f /tmp/libtpu_lockfile 2>/dev/null || sudo -n rm -f /tmp/libtpu_lockfile || true
rm -f $state/train.pid
holders=\$(sudo -n lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | sort -u | tr '\n' ' ' || true)
if [ -n \"\$holders\" ]; then
  echo \"worker \$w: the TPU is still held by: \$(ps -o pid=,args= -p \$holders | tr '\n' ';')\"
else
  echo \"worker \$w: TPU free\"
fi"
    exit 0
    ;;
  logs)
    # tail -F follows the file across the link being re-pointed by a new launch.
    ssh_workers 0 "tail -n ${TAGI_LOG_LINES:-100} -F $state/latest.log"
    exit 0
    ;;
  status)
    ssh_workers all "$worker_id
pids=\$(pgrep -f $(printf '%q' "$pattern") | tr '\n' ' ' || true)
echo \"worker \$w: \${pids:+running, pid \$pids}\${pids:-no tagi_jax.train running}; log \$(readlink $state/latest.log || echo none)\"
tail -n ${TAGI_LOG_LINES:-3} $state/latest.log 2>/dev/null | sed 's/^/  /' || true"
    exit 0
    ;;
esac

# --- start --------------------------------------------------------------------------------------
# Where the worker logs go: beside the run when MODEL_DIR is a path every worker shares,
# otherwise (gs://, or MODEL_DIR set inside a gin file) on each worker's own disk.
model_dir=""
for flag in "$@"; do
  if [[ "$flag" == --gin.MODEL_DIR=* ]]; then
    model_dir="${flag#--gin.MODEL_DIR=}"
    model_dir="${model_dir#[\"\']}"
    model_dir="${model_dir%[\"\']}"
  fi
done
if [[ -n "${TAGI_LOG_DIR:-}" ]]; then
  log_dir="$(printf '%q' "$TAGI_LOG_DIR")"
  where="$TAGI_LOG_DIR/worker_<i>.log"
elif [[ -n "$model_dir" && "$model_dir" != *://* ]]; then
  log_dir="$(printf '%q' "$model_dir/logs")"
  where="$model_dir/logs/worker_<i>.log"
else
  log_dir="$state"
  # shellcheck disable=SC2088  # a message: ~ is the worker's home
  where="~/tagi_jax_logs/worker_<i>.log on each worker's own disk"
  [[ -n "$model_dir" ]] && where+=" (MODEL_DIR $model_dir is not a shared mount)"
fi

if [[ "${SKIP_SETUP:-0}" != "1" ]]; then
  jax_version="$(grep -E '^jax==' "$repo/requirements.txt" | cut -d= -f3)"
  echo "== 1/3 copying $repo to every worker of $tpu"
  if [[ "$dry_run" == "1" ]]; then
    archive="/tmp/tagi_jax.tar.gz"
  else
    archive="$(mktemp -d)/tagi_jax.tar.gz"
  fi
  run tar -czf "$archive" -C "$repo" --exclude=.venv --exclude=runs --exclude=.git .
  run gcloud compute tpus tpu-vm scp "$archive" "$tpu":~/tagi_jax.tar.gz --zone "$zone" \
    "${project[@]}" --worker=all
  ssh_workers all "rm -rf ~/tagi_jax && mkdir -p ~/tagi_jax && tar -xzf ~/tagi_jax.tar.gz -C ~/tagi_jax"
  echo "== 2/3 creating the environment on every worker (jax[tpu]==$jax_version)"
  # The runtime requirements only (the test extras pull torch, which a TPU host does not need).
  ssh_workers all "python3 -m venv ~/tagi_venv && ~/tagi_venv/bin/pip install --quiet \
-r ~/tagi_jax/requirements.txt 'jax[tpu]==$jax_version' \
-f https://storage.googleapis.com/jax-releases/libtpu_releases.html \
&& ~/tagi_venv/bin/pip install --quiet --no-deps -e ~/tagi_jax"
fi

echo "== 3/3 starting the trainer on every worker, detached; logs: $where"
flags="$(printf '%q ' "$@")"
ssh_workers all "set -e
$worker_id
cd ~/tagi_jax
pattern=$(printf '%q' "$pattern")
if pgrep -f \"\$pattern\" >/dev/null; then
  echo \"worker \$w: tagi_jax.train already runs here (pid \$(pgrep -d ' ' -f \"\$pattern\")): launch/tpu_pod.sh --kill first\" >&2
  exit 1
fi
log_dir=$log_dir
mkdir -p \"\$log_dir\" $state
log=\"\$log_dir/worker_\$w.log\"
echo \"== \$(date -u +%Y-%m-%dT%H:%M:%SZ) worker \$w:\" python -m tagi_jax.train $flags >>\"\$log\"
# setsid: a session of its own, so neither the end of this ssh session (SIGHUP) nor a signal to
# its process group reaches the trainer; nohup for good measure; stdin closed, output to the log.
TF_CPP_MIN_LOG_LEVEL=3 TF_FORCE_GPU_ALLOW_GROWTH=true HF_HUB_OFFLINE=1 \\
  setsid nohup ~/tagi_venv/bin/python -m tagi_jax.train $flags >>\"\$log\" 2>&1 </dev/null &
echo \$! >$state/train.pid
ln -sfn \"\$log\" $state/latest.log
echo \"worker \$w: started pid \$!, log \$log\""
echo "== started; follow worker 0 with: launch/tpu_pod.sh --logs $tpu $zone ${project[*]:+${project[1]}}"
