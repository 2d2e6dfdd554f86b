#!/usr/bin/env bash
# The main job: installs the project into .venv and runs `repoindex demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ops/system.sh --for demo   # git, redis-server, PostgreSQL: installed (root + apt-get) or named
source ops/venv.sh
# compat: a path entry, not setuptools' import finder (~10 ms off every process start)
.venv/bin/pip install --quiet --disable-pip-version-check -e . --config-settings editable_mode=compat
exec .venv/bin/repoindex demo "$@"
