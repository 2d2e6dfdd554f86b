"""The repoindex CLI against a real worker: every command, human and --json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cli import main
from devtools.launcher import WorkerProcess
from tests import gitrepo


def last_json(output: str) -> Any:
    return json.loads(output.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cli_repo(roots: Path) -> Path:
    repo = gitrepo.init(roots / "cli-repo")
    gitrepo.write(repo / "src/app.py", "def handler():\n    return 'needle-in-cli'\n")
    gitrepo.write(repo / "README.md", "# cli repo\n")
    gitrepo.commit(repo)
    return repo


def test_enqueue_wait_status_repos_search(worker: WorkerProcess, cli_repo: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(main, ["enqueue", str(cli_repo), "--name", "cli", "--wait", "--json"])
    assert out.exit_code == 0, out.output
    doc = last_json(out.output)
    assert doc["state"] == "SUCCESS" and doc["result"]["files"] == 2
    status = runner.invoke(main, ["status", doc["id"], "--json"])
    assert last_json(status.output) == {"id": doc["id"], "state": "SUCCESS",
                                        "result": doc["result"]}
    human = runner.invoke(main, ["status", doc["id"]])
    assert f"{doc['id']} SUCCESS" in human.output
    repos = last_json(runner.invoke(main, ["repos", "--json"]).output)
    cli = next(r for r in repos if r["name"] == "cli")
    assert cli["files"] == 2 and cli["source"] == str(cli_repo) and len(cli["commit"]) == 40
    assert "cli\t2 files" in runner.invoke(main, ["repos"]).output
    found = last_json(runner.invoke(main, ["search", "needle-in-cli", "--json"]).output)
    assert [{k: m[k] for k in ("repo", "path", "line", "text")} for m in found] == \
        [{"repo": "cli", "path": "src/app.py", "line": 2, "text": "    return 'needle-in-cli'"}]
    assert (found[0]["column"], found[0]["cut"]) == (13, False)  # fields added, none renamed
    plain = runner.invoke(main, ["search", "needle-in-.li", "--regex", "--repo", "cli"])
    assert plain.output.strip() == "cli:src/app.py:2:     return 'needle-in-cli'"
    bad = runner.invoke(main, ["search", "(", "--regex"])
    assert bad.exit_code != 0 and "invalid regular expression" in bad.output


def test_enqueue_failure_and_no_wait(worker: WorkerProcess) -> None:
    runner = CliRunner()
    out = runner.invoke(main, ["enqueue", "/nope", "--wait", "--json"])
    assert out.exit_code == 1
    doc = last_json(out.output)
    assert doc["state"] == "FAILURE" and "outside the allowed roots" in doc["error"]
    human = runner.invoke(main, ["enqueue", "/nope", "--wait"])
    assert "FAILURE: source '/nope' is outside the allowed roots" in human.output
    queued = last_json(runner.invoke(main, ["enqueue", "/nope", "--json"]).output)
    assert queued["state"] == "PENDING" and len(queued["id"]) == 36


def test_status_of_unknown_job_and_ledger_fallback(worker: WorkerProcess, db: Any) -> None:
    runner = CliRunner()
    out = runner.invoke(main, ["status", "no-such-job", "--json"])
    assert out.exit_code == 2  # neither backend, ledger nor queue knows it
    assert last_json(out.output) == {"id": "no-such-job", "state": "UNKNOWN"}
    assert "UNKNOWN: no such job" in runner.invoke(main, ["status", "no-such-job"]).output
    db.execute("INSERT INTO runs (job_id, task, attempt, state, error) VALUES"
               " ('expired-job', 'repoindex.index_repository', 1, 'failed', 'gone wrong')")
    out = runner.invoke(main, ["status", "expired-job", "--json"])
    assert out.exit_code == 1  # a failed job: as `enqueue --wait` says it
    assert last_json(out.output) == {"id": "expired-job", "state": "FAILURE", "ledger": "failed",
                                     "error": "gone wrong"}


def test_enqueue_wait_with_no_worker_says_so_and_stops_at_timeout(
        session_env: dict[str, str], roots: Path) -> None:
    """Redis database 3 of the suite's private server: no worker consumes its queue."""
    env = {**os.environ, **session_env,
           "REDIS_URL": session_env["REDIS_URL"].rsplit("/", 1)[0] + "/3"}
    cli = [sys.executable, "-m", "cli"]
    root = Path(__file__).parents[2]
    done = subprocess.run([*cli, "enqueue", str(roots / "anything"), "--wait", "--timeout", "6"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 5, done.stderr
    job_id = done.stdout.splitlines()[0]
    assert len(job_id) == 36 and done.stdout.count(job_id) == 2  # first line: the id alone
    assert "no worker is consuming queue 'celery' at redis://127.0.0.1:" in done.stderr
    assert f"not finished after 6s (still PENDING); it stays queued: `repoindex status " \
           f"{job_id}`" in done.stderr
    later = subprocess.run([*cli, "status", job_id], env=env, capture_output=True, text=True,
                           timeout=60, cwd=root)
    assert (later.returncode, later.stdout.strip()) == \
        (5, f"{job_id} PENDING: queued, no worker has taken it yet")


def test_delete_and_migrate(worker: WorkerProcess, cli_repo: Path) -> None:
    runner = CliRunner()
    runner.invoke(main, ["enqueue", str(cli_repo), "--name", "to-delete", "--wait"])
    out = runner.invoke(main, ["delete", "to-delete", "--json"])
    assert out.exit_code == 0 and last_json(out.output)["result"]["deleted"] is True
    again = runner.invoke(main, ["delete", "to-delete"])
    assert again.exit_code == 1
    assert again.output.strip() == "repository 'to-delete' does not exist; nothing deleted"
    assert "schema is current" in runner.invoke(main, ["migrate"]).output


def test_demo_runs_end_to_end(session_env: dict[str, str], tmp_path: Path) -> None:
    """The quick start's main job, as a user runs it (services from the environment)."""
    # Redis database 1: the demo's jobs must reach the demo's workers, not the shared one.
    redis_url = session_env["REDIS_URL"].rsplit("/", 1)[0] + "/1"
    env = {**os.environ, **session_env, "REDIS_URL": redis_url, "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "cli", "demo", "--json"], env=env,
                         capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr[-3000:]
    report = last_json(out.stdout)
    assert report["ok"] and report["exit_codes"] == [0, 0]
    assert report["job"]["result"]["files"] > 20
    assert any("ResourceManager" in m["text"] for m in report["matches"])


def test_worker_command_execs_celery(session_env: dict[str, str], tmp_path: Path) -> None:
    exe = shutil.which("repoindex") or str(Path(sys.executable).parent / "repoindex")
    log = tmp_path / "w.log"
    proc = WorkerProcess({**os.environ, **session_env}, name="cliworker", log_path=log,
                         concurrency=1)
    proc.argv = [exe, "worker", "--pool", "prefork", "-c", "1", "-n", "cliworker@%h",
                 "--without-mingle", "--without-gossip"]
    proc.start()
    assert proc.stop() == 0
    assert "cliworker@" in log.read_text()


def test_benchmarks_run_and_print_tables(session_env: dict[str, str],
                                         monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Small runs of both benchmarks, in a database of their own (the figures are not
    asserted: speeds are for the benchmark command, not CI)."""
    for key in ("REPOINDEX_ROOTS", "REPOINDEX_TEMP_DIR"):
        monkeypatch.setenv(key, os.environ[key])  # restored after the test
    runner = CliRunner()
    out = runner.invoke(main, ["bench", "index", "--files", "40", "--runs", "1",
                               "--json-out", str(tmp_path / "i.json")])
    assert out.exit_code == 0, out.output
    assert "ratio ours/floor" in out.output
    doc = json.loads((tmp_path / "i.json").read_text())
    assert doc["files"] == 40 and len(doc["samples"]["ours"]) == 1
    out = runner.invoke(main, ["bench", "reindex", "--sizes", "60,120", "--runs", "1",
                               "--json-out", str(tmp_path / "r.json")])
    assert out.exit_code == 0, out.output
    assert "| 120 |" in out.output and "per changed file" in out.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [(r["nochange"]["strategy"], r["3 files"]["strategy"], r["1 %"]["changed"])
            for r in doc["results"].values()] == [(["unchanged"], ["delta"], 1)] * 2
    out = runner.invoke(main, ["bench", "lifecycle", "--files", "40", "--runs", "2"])
    assert out.exit_code == 0, out.output
    assert "| overhead" in out.output
    out = runner.invoke(main, ["bench", "all", "--quick", "--json-out", str(tmp_path / "a.json")])
    assert out.exit_code == 0, out.output
    assert "| ratio ours / floor" in out.output and "at once: pool wait p50" in out.output
    every = json.loads((tmp_path / "a.json").read_text())
    conc = every["concurrent"]
    assert (conc["succeeded"], conc["waiting_together"], conc["errors"]) == (8, 8, [])
    assert conc["peak_server_connections"] <= conc["connection_budget"] == 8
    assert conc["pool_wait"]["checkouts"] >= 16  # ledger + operation, each
    assert every["volume"]["temp_left"] == 0 and every["volume"]["leak_warnings"] == 0
    out = runner.invoke(main, ["bench", "replicas", "--counts", "1,2", "--jobs", "4",
                               "--files", "20", "--runs", "1"])
    assert out.exit_code == 0, out.output
    assert "| 2 |" in out.output
    summary = every["shutdown"]["summary"]
    # counts, not speeds: ours requeues both jobs and leaves nothing; the stock path
    # is SIGKILLed after the 2 s grace and leaves its temp areas behind
    assert (summary["ours"]["sigkilled"], summary["ours"]["jobs_not_accounted"],
            summary["ours"]["temp_left"], summary["ours"]["half_written"]) == (0, 0, 0, 0)
    assert summary["stock"]["sigkilled"] == 1 and summary["stock"]["temp_left"] == 2
    out = runner.invoke(main, ["bench", "shutdown", "--runs", "1", "--op-seconds", "3",
                               "--grace", "1"])
    assert out.exit_code == 0 and "| ours |" in out.output, out.output
    png = tmp_path / "soak.png"
    out = runner.invoke(main, ["bench", "soak", "--ops", "60", "--png", str(png),
                               "--json-out", str(tmp_path / "soak.json")])
    assert out.exit_code == 0, out.output
    soak = json.loads((tmp_path / "soak.json").read_text())
    assert soak["operations"] == 60 and soak["failed"] == 6  # the rotation's bad inputs
    assert soak["leak_warnings"] == 0 and soak["suspected_memory_leaks"] == 0
    assert [c["fd_growth_after_warmup"] for c in soak["children"].values()] == [0, 0]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = runner.invoke(main, ["bench", "soak", "--duration", "soon"])
    assert out.exit_code == 2 and "use a number and s, m or h" in out.output
