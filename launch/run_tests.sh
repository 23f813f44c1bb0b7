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
python -m pytest -q --durations=10 "$@"
