#!/usr/bin/env bash
# The main job on the embedded default: the paper's experiment in miniature on the built-in
# instruction suite (everything created locally): base, metatrain, LoRA teachers and TAGI, then
# the held-out comparison table (runs/main_job/results.md, results.png).
# Extra arguments go to the job, e.g. --ablations, --workdir /tmp/main_job, --fresh.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Only what the main job needs (requirements.txt: no torch); a venv with the test set serves too.
TAGI_INSTALL=run source "$repo/launch/setup_env.sh"
cd "$repo"
exec python -m tagi_jax.demos.main_job "$@"
