#!/usr/bin/env bash
# The test command: installs the project into .venv, then lint, types, and the whole suite
# under coverage (worker subprocesses and their prefork children included).
# Redis and PostgreSQL: see README "Tests" — found or started by the suite itself.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ops/system.sh --for test   # installs missing system programs (root + apt-get) or names them
source ops/venv.sh
# compat: a path entry, not setuptools' import finder (~10 ms off every process start)
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]" --config-settings editable_mode=compat
echo "== ruff" && .venv/bin/ruff check .
echo "== mypy" && .venv/bin/mypy
echo "== import rules" && .venv/bin/lint-imports --no-cache
echo "== pytest"
rm -f .coverage .coverage.*
.venv/bin/coverage run -m pytest "$@"
.venv/bin/coverage combine --quiet
.venv/bin/coverage report --fail-under=90
.venv/bin/coverage report --include='workers/*' --fail-under=95 >/dev/null \
  || { echo "workers/ line coverage is below 95%:"; .venv/bin/coverage report --include='workers/*'; exit 1; }
