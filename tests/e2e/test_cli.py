"""The repoindex CLI against a real worker: every command, human and --json. What a user
types runs through the installed console script (``.venv/bin/repoindex``) in a process of
its own, as the user runs it; the benchmark commands run in-process (CliRunner)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cli import main
from devtools import devservices
from devtools.devservices import free_port
from devtools.launcher import WorkerProcess
from tests import gitrepo
from tests.conftest import SESSION

ROOT = Path(__file__).parents[2]
EXE = str(Path(sys.executable).parent / "repoindex")  # the console script pip installed


def last_json(output: str) -> Any:
    return json.loads(output.strip().splitlines()[-1])


def repoindex(*args: str, env: dict[str, str] | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``repoindex ARGS`` as a user runs it, its stdout and stderr apart (not a terminal)."""
    return subprocess.run([EXE, *args], env={**os.environ, **(env or {})}, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def cli_repo(roots: Path) -> Path:
    repo = gitrepo.init(roots / "cli-repo")
    gitrepo.write(repo / "src/app.py", "def handler():\n    return 'needle-in-cli'\n")
    gitrepo.write(repo / "README.md", "# cli repo\n")
    gitrepo.commit(repo)
    return repo


def test_enqueue_wait_status_repos_search(worker: WorkerProcess, cli_repo: Path) -> None:
    out = repoindex("enqueue", str(cli_repo), "--name", "cli", "--wait", "--json")
    assert out.returncode == 0, out.stderr
    doc = last_json(out.stdout)
    assert doc["state"] == "SUCCESS" and doc["result"]["files"] == 2
    assert out.stderr.splitlines()[0] == doc["id"]  # --json: the id first, on stderr
    status = repoindex("status", doc["id"], "--json")
    assert (status.returncode, last_json(status.stdout)) == \
        (0, {"id": doc["id"], "state": "SUCCESS", "result": doc["result"]})
    human = repoindex("status", doc["id"])
    assert human.stdout.startswith(f"{doc['id']} SUCCESS\n")
    repos = last_json(repoindex("repos", "--json").stdout)
    cli = next(r for r in repos if r["name"] == "cli")
    assert cli["files"] == 2 and cli["source"] == str(cli_repo) and len(cli["commit"]) == 40
    assert "cli\t2 files" in repoindex("repos").stdout
    found = last_json(repoindex("search", "needle-in-cli", "--json").stdout)
    assert [{k: m[k] for k in ("repo", "path", "line", "text")} for m in found] == \
        [{"repo": "cli", "path": "src/app.py", "line": 2, "text": "    return 'needle-in-cli'"}]
    assert (found[0]["column"], found[0]["cut"]) == (13, False)  # fields added, none renamed
    plain = repoindex("search", "needle-in-.li", "--regex", "--repo", "cli")
    assert (plain.returncode, plain.stdout) == \
        (0, "cli:src/app.py:2:     return 'needle-in-cli'\n")
    assert repoindex("search", "no-such-needle-anywhere").returncode == 1
    # README "Exit statuses": 2 for bad input, the reason said once
    bad = repoindex("search", "(", "--regex")
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr == "Error: invalid regular expression: parentheses () not balanced\n"


def test_progress_off_a_terminal_is_plain_lines(worker: WorkerProcess, cli_repo: Path) -> None:
    """Piped: the id, then one plain line per phase seen (no bar, no empty line), then
    the summary; each line's done never exceeds its total (one backend read per look)."""
    out = repoindex("enqueue", str(cli_repo), "--name", "cli-plain", "--wait")
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.splitlines()[0]
    assert out.stdout.startswith(f"{job_id}\n{job_id} SUCCESS\n{{")
    for line in out.stderr.splitlines():
        assert re.fullmatch(rf"{job_id}: (reading tree|reading blobs|storing|commit|indexing)"
                            r" \((\d+)/(\d+)\)", line), out.stderr
        done, total = map(int, re.findall(r"\d+", line.rsplit("(", 1)[1]))
        assert done <= total, line


def test_enqueue_failure_and_no_wait(worker: WorkerProcess, cli_repo: Path) -> None:
    out = repoindex("enqueue", "/nope", "--wait", "--json")
    assert out.returncode == 1
    doc = last_json(out.stdout)
    assert doc["state"] == "FAILURE" and "outside the allowed roots" in doc["error"]
    human = repoindex("enqueue", "/nope", "--wait")
    assert "FAILURE: source '/nope' is outside the allowed roots" in human.stdout
    queued = repoindex("enqueue", "/nope", "--json")
    assert queued.returncode == 0
    assert last_json(queued.stdout)["state"] == "PENDING"
    assert len(last_json(queued.stdout)["id"]) == 36
    # README: revision expressions are refused as `invalid ref`; a commit id is taken
    expr = repoindex("enqueue", str(cli_repo), "--ref", "HEAD~50", "--wait")
    assert expr.returncode == 1 and "FAILURE: invalid ref 'HEAD~50'" in expr.stdout


def test_status_of_unknown_job_and_ledger_fallback(worker: WorkerProcess, db: Any) -> None:
    out = repoindex("status", "no-such-job", "--json")
    assert out.returncode == 2  # neither backend, ledger nor queue knows it
    assert last_json(out.stdout) == {"id": "no-such-job", "state": "UNKNOWN"}
    assert "UNKNOWN: no such job" in repoindex("status", "no-such-job").stdout
    db.execute("INSERT INTO runs (job_id, task, attempt, state, error) VALUES"
               " ('expired-job', 'repoindex.index_repository', 1, 'failed', 'gone wrong')")
    out = repoindex("status", "expired-job", "--json")
    assert out.returncode == 1  # a failed job: as `enqueue --wait` says it
    assert last_json(out.stdout) == {"id": "expired-job", "state": "FAILURE", "ledger": "failed",
                                     "error": "gone wrong"}


def test_unreachable_services_are_one_line_and_status_3(session_env: dict[str, str]) -> None:
    """README "Exit statuses": 3, one line naming the scrubbed URL, for either service."""
    dead = f"127.0.0.1:{free_port()}"
    pg = repoindex("repos", env={"DATABASE_URL": f"postgresql://u:pw@{dead}/x"})
    assert (pg.returncode, pg.stdout) == (3, "")
    assert pg.stderr.startswith(f"repoindex: cannot reach PostgreSQL at postgresql://u:***@{dead}"
                                "/x (connection failed: ") and pg.stderr.count("\n") == 1
    assert "is DATABASE_URL right?" in pg.stderr and "pw" not in pg.stderr
    missing_db = session_env["DATABASE_URL"].rsplit("/", 1)[0] + "/no_such_database_here"
    gone = repoindex("search", "x", env={"DATABASE_URL": missing_db})
    assert gone.returncode == 3 and 'database "no_such_database_here" does not exist' in gone.stderr
    rd = repoindex("status", "some-id", env={"REDIS_URL": f"redis://:pw@{dead}/0"})
    assert (rd.returncode, rd.stdout) == (3, "")
    assert rd.stderr.startswith(f"repoindex: cannot reach Redis at redis://:***@{dead}/0 (")


def test_enqueue_wait_with_no_worker_says_so_and_stops_at_timeout(
        session_env: dict[str, str], roots: Path) -> None:
    """Redis database 3 of the suite's private server: no worker consumes its queue."""
    env = {"REDIS_URL": session_env["REDIS_URL"].rsplit("/", 1)[0] + "/3"}
    done = repoindex("enqueue", str(roots / "anything"), "--wait", "--timeout", "6", env=env)
    assert done.returncode == 5, done.stderr
    job_id = done.stdout.splitlines()[0]
    assert len(job_id) == 36 and done.stdout.count(job_id) == 2  # first line: the id alone
    assert "no worker is consuming queue 'celery' at redis://127.0.0.1:" in done.stderr
    assert "(`repoindex worker`, README \"Running workers\")" in done.stderr
    assert f"not finished after 6s (still PENDING); it stays queued: `repoindex status " \
           f"{job_id}`" in done.stderr
    later = repoindex("status", job_id, env=env)
    assert (later.returncode, later.stdout.strip()) == \
        (5, f"{job_id} PENDING: queued, no worker has taken it yet")
    # Ctrl-C stops waiting, not the job: said how to look later, ended as by SIGINT
    proc = subprocess.Popen([EXE, "enqueue", str(roots / "anything"), "--wait"],
                            env={**os.environ, **env}, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout is not None
    interrupted_id = proc.stdout.readline().strip()  # the id comes first, at once
    time.sleep(1)  # waiting now
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out) == (-signal.SIGINT, "")
    assert f"stopped waiting; job {interrupted_id} goes on (it is durable): `repoindex " \
           f"status {interrupted_id}` tells later" in err
    assert repoindex("status", interrupted_id, env=env).returncode == 5


def test_delete_and_migrate(worker: WorkerProcess, cli_repo: Path, db: Any) -> None:
    assert repoindex("enqueue", str(cli_repo), "--name", "to-delete", "--wait").returncode == 0
    out = repoindex("delete", "to-delete", "--json")
    assert out.returncode == 0 and last_json(out.stdout)["result"]["deleted"] is True
    again = repoindex("delete", "to-delete")
    assert (again.returncode, again.stdout) == \
        (1, "repository 'to-delete' does not exist; nothing deleted\n")
    assert repoindex("migrate").stdout == "applied: nothing, schema is current\n"
    # a fresh database: the command lists what it applied (its connection does not migrate
    # first and then find nothing to do)
    admin = SESSION["endpoints"].admin_url
    name = f"fresh_{uuid.uuid4().hex[:8]}"
    fresh = devservices.create_database(admin, name)
    try:
        first = repoindex("migrate", env={"DATABASE_URL": fresh})
        migrations = sorted(p.stem for p in (ROOT / "ops" / "migrations").glob("[0-9]*.sql"))
        assert (first.returncode, first.stdout) == (0, f"applied: {', '.join(migrations)}\n")
        assert repoindex("migrate", env={"DATABASE_URL": fresh}).stdout == \
            "applied: nothing, schema is current\n"
    finally:
        devservices.drop_database(admin, name)


def test_demo_runs_end_to_end(session_env: dict[str, str], tmp_path: Path) -> None:
    """The quick start's main job, as a user runs it (services from the environment), off a
    terminal: the report's lines as README shows them, no empty line where a bar would be,
    and search hits where code uses ResourceManager, not text quoting a search for it."""
    # Redis database 1: the demo's jobs must reach the demo's workers, not the shared one.
    env = {"REDIS_URL": session_env["REDIS_URL"].rsplit("/", 1)[0] + "/1",
           "TMPDIR": str(tmp_path)}
    out = repoindex("demo", env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "" not in lines, out.stdout
    heads = [ln for ln in lines if not ln.startswith("  ")]
    starts = ["redis: ", "workers: ", "indexing ", "state: SUCCESS in ",
              "summary: repository=demo, ", "workers stopped with exit codes [0, 0]", "cleanup: "]
    assert len(heads) == len(starts) and all(map(str.startswith, heads, starts)), heads
    hits = [ln for ln in lines if ln.startswith("  demo:")]
    assert hits and all(re.fullmatch(r"  demo:\S+\.py:\d+: (from \S+ import|class) "
                                     r"ResourceManager.*", h) for h in hits), hits
    assert re.fullmatch(r"cleanup: op=\S+ repo=demo outcome=succeeded files=0 connections=\d "
                        r"temp=\d processes=\d threads=\d tasks=0 failures=0 ms=\d+\.\d",
                        lines[-1]), lines[-1]
    for line in out.stderr.splitlines():  # plain progress lines
        assert re.fullmatch(r"\S+: (reading tree|reading blobs|storing|commit|indexing) "
                            r"\(\d+/\d+\)", line), out.stderr
    report = last_json(repoindex("demo", "--json", env=env, timeout=300).stdout)
    assert report["ok"] and report["exit_codes"] == [0, 0]
    assert report["job"]["result"]["files"] > 20


def test_worker_command_execs_celery(session_env: dict[str, str], tmp_path: Path) -> None:
    """`repoindex worker` is Celery's worker; a clean start sweeps nothing and says so
    (its own stats directory is not a dead process's temp area)."""
    log = tmp_path / "w.log"
    temp = tmp_path / "temp"
    proc = WorkerProcess({**os.environ, **session_env, "REPOINDEX_TEMP_DIR": str(temp)},
                         name="cliworker", log_path=log, concurrency=2)
    proc.argv = [EXE, "worker", "--pool", "prefork", "-c", "2", "-n", "cliworker@%h",
                 "--without-mingle", "--without-gossip", "-Q", f"cli-{uuid.uuid4().hex[:6]}"]
    proc.start()
    assert [p.name for p in temp.iterdir()] == [f"stats-{proc.pid}"]
    assert proc.stop() == 0
    text = log.read_text()
    assert "cliworker@" in text and " ready." in text
    assert "swept" not in text and " WARNING " not in text.split(" ready.", 1)[0], text


def test_search_benchmark_grows_with_other_code(session_env: dict[str, str],
                                               monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    """`bench search --grow-with`: a plain directory of other code becomes a repository of
    its own and grows the corpus; every pattern is timed before and after (the figures are
    not asserted)."""
    from bench.common import make_repo
    from bench.search import PATTERNS

    for key in ("REPOINDEX_ROOTS", "REPOINDEX_TEMP_DIR"):
        monkeypatch.setenv(key, os.environ[key])
    source = make_repo(tmp_path / "source", 30)
    other = tmp_path / "other"
    for i in range(40):
        (other / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        (other / f"d{i % 4}" / f"m{i}.c").write_text(
            "".join(f"int settings_{i}_{j}(void) {{ return {j}; }}\n" for j in range(50)))
    (other / "__pycache__").mkdir()
    (other / "__pycache__" / "x.pyc").write_bytes(b"\0")  # left out, as caches are
    out = CliRunner().invoke(main, ["bench", "search", "--source", str(source), "--grow-with",
                                    str(other), "--runs", "1", "--json-out",
                                    str(tmp_path / "s.json")])
    assert out.exit_code == 0, out.output
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["grown_with"] == [str(other)]
    lines = sum(p.read_text().count("\n") for p in other.rglob("*.c"))  # 50 a file
    assert doc["growth_factor"] == pytest.approx((doc["lines"] + lines) / doc["lines"])
    assert [r["pattern"] for r in doc["patterns"]] == [p for _, p, _, _ in PATTERNS]
    assert all(r["ours_grown"] > 0 and r["git grep"] > 0 for r in doc["patterns"])
    assert "other code, by lines" in out.output and "| rare literal |" in out.output


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
    out = runner.invoke(main, ["bench", "lifecycle", "--files", "40", "--runs", "2", "--steps"])
    assert out.exit_code == 0, out.output
    assert "| overhead" in out.output
    assert "| step LedgerRow.before (median)" in out.output  # every step timed, both halves
    assert out.output.count("| step ") == 2 * 7
    out = runner.invoke(main, ["bench", "startup", "--runs", "1",
                               "--json-out", str(tmp_path / "s.json")])
    assert out.exit_code == 0, out.output
    codes = {k: v["exit_codes"] for k, v in
             json.loads((tmp_path / "s.json").read_text())["commands"].items()}
    # every command ran to its own answer (an unknown id: 2), none stopped at a service
    assert codes == {"python -c pass": [0], "--help": [0], "status (finished job)": [0],
                     "status (unknown id)": [2], "repos": [0], "search": [0],
                     "enqueue": [0], "stats": [0]}, out.output
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
