#!/usr/bin/env bash
# Creates or refreshes the project virtualenv (.venv, or $TAGI_VENV) from the repo's own
# requirement files, then installs tagi_jax into it in editable mode. Sourced by the other
# launchers; safe to run again: it reinstalls only when a requirements file changed.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TAGI_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "error: tagi_jax needs Python >= 3.11 (found: $("$python" --version 2>&1)); set PYTHON=..." >&2
  exit 2
fi

# CI always starts from a fresh virtualenv; locally an existing one is reused.
if [[ "${CI:-}" == "true" && -d "$venv" && ! -f "$venv/.tagi_ci_fresh" ]]; then
  rm -rf "$venv"
fi
stamp="$venv/.tagi_requirements.sha256"
want="$(cat "$repo/requirements.txt" "$repo/requirements-test.txt" "$repo/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [[ ! -x "$venv/bin/python" || ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "== installing tagi_jax and its pinned dependencies into $venv (about 2 minutes, once)"
  start=$SECONDS
  "$python" -m venv "$venv"
  [[ "${CI:-}" == "true" ]] && touch "$venv/.tagi_ci_fresh"
  # This machine's pip configuration warns about every package it looks up in an empty local
  # index; those lines are noise, everything else is shown.
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$repo/requirements-test.txt" 2>&1 \
    | { grep -v "^WARNING: Location '" || true; }
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -e "$repo" 2>&1 \
    | { grep -v "^WARNING: Location '" || true; }
  "$venv/bin/python" -c "import jax, flax, optax, orbax.checkpoint, transformers, torch, tagi_jax"
  echo "$want" > "$stamp"
  echo "== environment ready in $((SECONDS - start))s"
fi
export PATH="$venv/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
