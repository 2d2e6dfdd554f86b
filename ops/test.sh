#!/usr/bin/env bash
# The test command: installs the project into .venv, then lint, types, and the whole suite
# under coverage (worker subprocesses and their prefork children included).
# Redis and PostgreSQL: see README "Tests" — found or started by the suite itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "repoindex needs Python >= 3.11 (found $("$PYTHON" --version 2>&1)); set PYTHON=..." >&2
  exit 2
fi
for bin in git redis-server; do
  command -v "$bin" >/dev/null || { echo "missing $bin: apt-get install ${bin/-server/} (or brew install ${bin/-server/})" >&2; exit 2; }
done
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
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
