#!/usr/bin/env bash
# The main job: installs the project into .venv and runs `repoindex demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ops/system.sh --for demo   # git, redis-server, PostgreSQL: installed (root + apt-get) or named
source ops/venv.sh
.venv/bin/pip install --quiet --disable-pip-version-check -e .
exec .venv/bin/repoindex demo "$@"
