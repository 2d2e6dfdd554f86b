# Sourced by ops/demo.sh and ops/test.sh: checks Python and git, makes .venv.
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "repoindex needs Python >= 3.11 (found: $("$PYTHON" --version 2>&1)); set PYTHON=..." >&2
  exit 2
fi
command -v git >/dev/null || { echo "missing git: apt-get install git (or brew install git)" >&2; exit 2; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
