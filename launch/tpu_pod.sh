#!/usr/bin/env bash
# Runs a tagi_jax stage on every worker of a Cloud TPU pod slice (v4 / v5e), the t5x way: the
# same command on all hosts at once; jax.distributed (mesh/tpu_*_pod_slice.gin) finds the
# coordinator and process ids itself, and each host feeds its own rows of the global batch.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] -- <python -m tagi_jax.train flags>
#
# e.g.
#   launch/tpu_pod.sh tagi-v4-32 us-central2-b my-project -- \
#     --gin_file=runs/finetune_sni.gin --gin_file=mesh/tpu_v4_pod_slice.gin \
#     --gin.MODEL_DIR="'/mnt/shared/runs/finetune'" --gin.DATA_DIR="'/mnt/shared/sni'" ...
#
# Steps (each one `gcloud compute tpus tpu-vm ... --worker=all`):
#   1. copy this checkout to ~/tagi_jax on every worker (scp; no git access needed there);
#   2. create ~/tagi_venv there from requirements.txt plus jax[tpu] of the pinned version;
#   3. run the training command on every worker, output prefixed per worker by gcloud.
# MODEL_DIR, data and weights must be the same path on every worker: a Filestore/NFS or
# gcsfuse mount (orbax writes each host's shards and restores them from that shared path).
# DRY_RUN=1 prints the gcloud commands instead of running them. SKIP_SETUP=1 skips steps 1-2.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  sed -n '2,20p' "$0" >&2
  exit 2
fi
tpu="$1" zone="$2"
shift 2
project=()
if [[ "$1" != "--" ]]; then
  project=(--project "$1")
  shift
fi
[[ "${1:-}" == "--" ]] && shift
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
jax_version="$(grep -E '^jax==' "$repo/requirements.txt" | cut -d= -f3)"

run() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}
ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${project[@]}" --worker=all \
    --command "$1"
}

if [[ "${SKIP_SETUP:-0}" != "1" ]]; then
  echo "== 1/3 copying $repo to every worker of $tpu"
  archive="$(mktemp -d)/tagi_jax.tar.gz"
  run tar -czf "$archive" -C "$repo" --exclude=.venv --exclude=runs --exclude=.git .
  run gcloud compute tpus tpu-vm scp "$archive" "$tpu":~/tagi_jax.tar.gz --zone "$zone" \
    "${project[@]}" --worker=all
  ssh_all "rm -rf ~/tagi_jax && mkdir -p ~/tagi_jax && tar -xzf ~/tagi_jax.tar.gz -C ~/tagi_jax"
  echo "== 2/3 creating the environment on every worker (jax[tpu]==$jax_version)"
  # The runtime requirements only (the test extras pull torch, which a TPU host does not need).
  ssh_all "python3 -m venv ~/tagi_venv && ~/tagi_venv/bin/pip install --quiet \
-r ~/tagi_jax/requirements.txt 'jax[tpu]==$jax_version' \
-f https://storage.googleapis.com/jax-releases/libtpu_releases.html \
&& ~/tagi_venv/bin/pip install --quiet --no-deps -e ~/tagi_jax"
fi
echo "== 3/3 training on every worker"
flags="$(printf '%q ' "$@")"
ssh_all "cd ~/tagi_jax && TF_CPP_MIN_LOG_LEVEL=3 ~/tagi_venv/bin/python -m tagi_jax.train $flags"
