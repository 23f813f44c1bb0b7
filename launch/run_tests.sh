#!/usr/bin/env bash
# Installs what the tests need, checks formatting and lint, and runs the test suite (CPU,
# 8 fake devices for the sharding tests, no network). Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/launch/setup_env.sh"
cd "$repo"
echo "== ruff format --check, ruff check"
ruff format --check --quiet .
ruff check --quiet .
echo "== pytest"
# XLA's persistent compilation cache (tests/conftest.py): CI starts from an empty one, so the
# time it reports is a fresh clone's; a local run keeps tests/conftest.py's between runs.
if [[ "${CI:-}" == "true" ]]; then
  JAX_COMPILATION_CACHE_DIR="$(mktemp -d)"
  export JAX_COMPILATION_CACHE_DIR
  trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
fi
# Two test processes (pytest-xdist), one test file at a time each, so a module's fixtures are
# built once; TAGI_TEST_WORKERS=0 runs in this process only.
workers=()
if [[ "${TAGI_TEST_WORKERS:-2}" != "0" ]] && python -c "import xdist" 2>/dev/null; then
  workers=(-n "${TAGI_TEST_WORKERS:-2}" --dist loadfile)
fi
python -m pytest -q --durations=20 "${workers[@]}" "$@"
