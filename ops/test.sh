#!/usr/bin/env bash
# The test command: installs the project into .venv, then lint, types, and the whole suite
# under coverage (worker subprocesses and their prefork children included).
# Redis and PostgreSQL: see README "Tests" — found or started by the suite itself.
set -euo pipefail
cd "$(dirname "$0")/.."
source ops/venv.sh
command -v redis-server >/dev/null || { echo "missing redis-server: apt-get install redis-server (or brew install redis)" >&2; exit 2; }
command -v promtool >/dev/null && command -v prometheus >/dev/null \
  || { echo "missing prometheus/promtool: apt-get install prometheus (or brew install prometheus)" >&2; exit 2; }
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]"
echo "== ruff" && .venv/bin/ruff check .
echo "== mypy" && .venv/bin/mypy
echo "== pytest"
rm -f .coverage .coverage.*
.venv/bin/coverage run -m pytest "$@"
.venv/bin/coverage combine --quiet
.venv/bin/coverage report --fail-under=90
.venv/bin/coverage report --include='workers/*' --fail-under=95 >/dev/null \
  || { echo "workers/ line coverage is below 95%:"; .venv/bin/coverage report --include='workers/*'; exit 1; }
