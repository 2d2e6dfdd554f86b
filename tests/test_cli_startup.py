"""What a command loads before it answers (its start-up, README "CLI"): each imports the
client of the service it talks to and nothing of the others, and the console script starts
with the cyclic garbage collector off, turning it on again only in a command that goes on
running. Real processes; the services are unreachable ports, so each command stops at its
first connection (exit 3) having imported what its path needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.devservices import free_port

ROOT = Path(__file__).parents[1]

# Run the console script's own entry (cli.run) and report, at exit, which of these modules
# were loaded and whether the collector was on.
_PROBE = """
import atexit, gc, json, sys
def report():
    loaded = sorted({m.split('.')[0] for m in sys.modules} & set(%r))
    sys.stderr.write('\\nPROBE ' + json.dumps({'loaded': loaded, 'gc': gc.isenabled()}) + '\\n')
atexit.register(report)
sys.argv = ['repoindex', *sys.argv[1:]]
import cli
cli.run()
"""
CLIENTS = ("celery", "kombu", "redis", "psycopg", "psycopg_pool", "rich", "sentry_sdk",
           "psutil", "prometheus_client")


def probe(*args: str) -> tuple[int, dict[str, object]]:
    nowhere = free_port()  # nothing listens there: refused at once
    env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{nowhere}/0",
           "DATABASE_URL": f"postgresql://127.0.0.1:{nowhere}/none",
           "REPOINDEX_RESULT_BACKEND": f"redis://127.0.0.1:{nowhere}/0",
           "REPOINDEX_ROOTS": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _PROBE % (CLIENTS,), *args], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    line = next(x for x in proc.stderr.splitlines() if x.startswith("PROBE "))
    return proc.returncode, json.loads(line.removeprefix("PROBE "))


@pytest.mark.parametrize(("args", "needed"), [
    (("repos",), {"psycopg", "psycopg_pool"}),
    (("search", "ResourceManager"), {"psycopg", "psycopg_pool"}),
    (("enqueue", str(ROOT), "--name", "x"), {"celery", "kombu", "redis"}),
    (("status", "some-job"), {"celery", "kombu", "redis"}),
])
def test_a_command_imports_only_the_client_of_the_service_it_talks_to(
        args: tuple[str, ...], needed: set[str]) -> None:
    code, report = probe(*args)
    assert code == 3, report  # stopped at the unreachable service, with the one-line error
    assert set(report["loaded"]) == needed  # type: ignore[arg-type]
    assert report["gc"] is False  # a short command: no collector walking its imports


def test_a_command_that_goes_on_running_collects_cycles_again() -> None:
    code, report = probe("stats", "--watch", "1", "--timeout", "0.2")
    assert code == 3, report
    assert report["gc"] is True
