#!/usr/bin/env bash
# The main job: installs the project into .venv and runs `repoindex demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "repoindex needs Python >= 3.11 (found $("$PYTHON" --version 2>&1)); set PYTHON=..." >&2
  exit 2
fi
command -v git >/dev/null || { echo "missing git: apt-get install git" >&2; exit 2; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -e .
exec .venv/bin/repoindex demo "$@"
