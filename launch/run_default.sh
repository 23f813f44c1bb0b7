#!/usr/bin/env bash
# The main job on the embedded default. Until training lands this is the T5 parity demo: a
# random tiny T5 (v1.0 and v1.1) built locally, compared with PyTorch transformers.
# Extra arguments go to the job, e.g. --workdir /tmp/demo.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/launch/setup_env.sh"
cd "$repo"
exec python -m tagi_jax.demos.t5_parity "$@"
