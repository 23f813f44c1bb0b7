#!/usr/bin/env bash
# The main job on the embedded default: a small TAGI trained on the built-in instruction suite
# (everything created locally), evaluated on held-out tasks against the base model.
# Extra arguments go to the job, e.g. --workdir /tmp/main_job --fresh.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/launch/setup_env.sh"
cd "$repo"
exec python -m tagi_jax.demos.main_job "$@"
