#!/usr/bin/env bash
# Creates or refreshes the project virtualenv (.venv, or $TAGI_VENV) from the repo's own
# requirement files, then installs tagi_jax into it in editable mode. Sourced by the other
# launchers; safe to run again: it reinstalls only when a requirements file changed.
#
# TAGI_INSTALL picks what goes in:
#   run  (launch/run_default.sh) requirements.txt: the runtime + the [data] extra, what the main
#        job needs; no torch, no transformers (about 1.6 GB, 1-2 minutes).
#   test (launch/run_tests.sh, the default) requirements-test.txt: the above + the [torch]
#        extra (CPU torch, transformers, peft) + pytest, ruff, build and the GCS emulator.
# A venv holding the test set also serves run; run -> test installs only the difference.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TAGI_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"
install="${TAGI_INSTALL:-test}"

case "$install" in
  run) requirements="$repo/requirements.txt"; check="seqio" ;;
  test) requirements="$repo/requirements-test.txt"; check="seqio, torch, transformers, pytest" ;;
  *) echo "error: TAGI_INSTALL=$install is not one of: run, test" >&2; exit 2 ;;
esac

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "error: tagi_jax needs Python >= 3.11 (found: $("$python" --version 2>&1)); set PYTHON=..." >&2
  exit 2
fi

# CI always starts from a fresh virtualenv; locally an existing one is reused.
if [[ "${CI:-}" == "true" && -d "$venv" && ! -f "$venv/.tagi_ci_fresh" ]]; then
  rm -rf "$venv"
fi
digest() { cat "$@" | sha256sum | cut -d' ' -f1; }
want_run="run=$(digest "$repo/requirements.txt" "$repo/pyproject.toml")"
want_test="test=$(digest "$repo/requirements.txt" "$repo/requirements-test.txt" "$repo/pyproject.toml")"
stamp="$venv/.tagi_installed"
have() { [[ -f "$stamp" ]] && grep -qxF "$1" "$stamp"; }
if [[ "$install" == "run" ]] && { have "$want_run" || have "$want_test"; }; then
  ready=1
elif [[ "$install" == "test" ]] && have "$want_test"; then
  ready=1
else
  ready=0
fi
if [[ ! -x "$venv/bin/python" || "$ready" != 1 ]]; then
  echo "== installing tagi_jax and its pinned dependencies ($(basename "$requirements")) into $venv"
  start=$SECONDS
  [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
  [[ "${CI:-}" == "true" ]] && touch "$venv/.tagi_ci_fresh"
  # This machine's pip configuration warns about every package it looks up in an empty local
  # index; those lines are noise, everything else is shown.
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements" 2>&1 \
    | { grep -v "^WARNING: Location '" || true; }
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -e "$repo" 2>&1 \
    | { grep -v "^WARNING: Location '" || true; }
  # TensorFlow logs a few lines at import whatever its log level: shown only if the check fails
  if ! imported="$("$venv/bin/python" -c "import jax, flax, optax, orbax.checkpoint, gin, $check, tagi_jax" 2>&1)"; then
    echo "$imported" >&2
    echo "error: the new environment cannot import what it installed" >&2
    exit 1
  fi
  if [[ "$install" == "test" ]]; then
    printf '%s\n%s\n' "$want_run" "$want_test" > "$stamp"
  else
    echo "$want_run" > "$stamp"
  fi
  echo "== environment ready in $((SECONDS - start))s ($(du -sh "$venv" | cut -f1))"
fi
export PATH="$venv/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
