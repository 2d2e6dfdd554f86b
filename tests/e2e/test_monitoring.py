"""Monitoring against real processes: a worker serving /metrics, Flower with a login, a
real Prometheus, promtool, and a loopback stand-in for Sentry (issue 6)."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devtools.devservices import free_port
from devtools.launcher import WorkerProcess
from tests.conftest import start_worker
from tests.e2e.support import send, wait_until

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-c", "from cli import main; main()"]
EXE = str(Path(sys.executable).parent / "repoindex")  # the console script, as a user runs it


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items()
               if n == name and set(labels.items()) <= set(ls))


def pids_of(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> set[int]:
    return {int(dict(ls)["pid"]) for (n, ls) in samples if n == "repoindex_child_open_fds"}


class Sink:
    """The stand-in Sentry server (tests/sentry_sink.py) in a process of its own."""

    def __init__(self, directory: Path) -> None:
        self.out = directory / "sentry-events.jsonl"
        portfile = directory / "sentry-port"
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.sentry_sink", str(portfile),
                                      str(self.out)], cwd=ROOT)
        wait_until(lambda: portfile.exists() and portfile.read_text() != "", 15, "sink port")
        self.dsn = f"http://public@127.0.0.1:{portfile.read_text()}/1"

    def events(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines() if line]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sink]:
    server = Sink(tmp_path_factory.mktemp("sentry"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def monitored(sink: Sink, probe_table: None) -> Iterator[tuple[WorkerProcess, int]]:
    port = free_port()
    proc = start_worker("monitored", concurrency=2, queue=f"mon-{uuid.uuid4().hex[:6]}",
                        env={"REPOINDEX_METRICS_PORT": str(port), "SENTRY_DSN": sink.dsn})
    try:
        yield proc, port
    finally:
        assert proc.stop() == 0


def child_pids(rows: dict[str, Any]) -> set[int]:
    return {int(k.split()[2]) for k in rows
            if k.startswith("repoindex child ") and k.endswith(" open files")}


def worker_doc(docs: list[dict[str, Any]], worker: WorkerProcess) -> dict[str, Any]:
    return next(d for d in docs if d["worker"] == worker.node)


def flower_get(port: int, path: str, auth: str | None) -> tuple[int, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if auth is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code, None


@pytest.fixture
def flower(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    env = {**os.environ, "FLOWER_PASSWORD": "s3cret-flower", "FLOWER_USER": "ops"}
    log = (tmp_path / "flower.log").open("wb")
    proc = subprocess.Popen([*CLI, "flower", f"--port={port}"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_until(lambda: _answers(port), 60, "flower listening")
        yield port
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=5):
            return True
    except urllib.error.HTTPError as exc:
        exc.close()
        return True
    except OSError:
        return False


def test_flower_refuses_to_start_without_a_password() -> None:
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_PASSWORD"}
    done = subprocess.run([*CLI, "flower"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode != 0 and "set FLOWER_PASSWORD" in done.stderr


def test_a_leak_shows_in_metrics_stats_flower_sentry_and_fires_its_alert(
        monitored: tuple[WorkerProcess, int], celery_app: Any, sink: Sink, flower: int,
        tmp_path: Path) -> None:
    worker, port = monitored
    before = scrape(port)
    assert value(before, "repoindex_leaks_total", kind="fd") == 0  # present, at zero
    assert pids_of(before) == set(worker.children())
    send(celery_app, worker, "probe.leak_fd").get(timeout=60)
    wait_until(lambda: value(scrape(port), "repoindex_leaks_total", kind="fd") == 1, 30,
               "the leak in /metrics")
    after = scrape(port)
    assert value(after, "repoindex_operations_total", outcome="succeeded") \
        == value(before, "repoindex_operations_total", outcome="succeeded") + 1

    # inspect stats (Celery's own command) carries the replica's figures as labelled rows
    node = worker.node
    rows = celery_app.control.inspect(destination=[node], timeout=5).stats()[node]
    assert rows["repoindex leaks"] == "fd 1"
    assert child_pids(rows) == set(worker.children())

    # the custom remote-control command, through `repoindex stats --json` and the table
    done = subprocess.run([*CLI, "stats", "--json"], capture_output=True, text=True,
                          timeout=60, check=True)
    doc = worker_doc(json.loads(done.stdout.strip().splitlines()[-1]), worker)
    assert doc["totals"]["leaks"] == {"fd": 1}
    children = doc["children"]
    assert {c["pid"] for c in children} == set(worker.children())
    assert all(c["fds"] > 0 and c["rss"] > c["uss"] > 0 and c["threads"] > 0 for c in children)
    # piped, as a user's `repoindex stats | grep`: full width, nothing cut to 80 columns
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    table = subprocess.run([EXE, "stats"], capture_output=True, text=True, timeout=60,
                           check=True, env=env).stdout
    assert "fd=1" in table and str(children[0]["pid"]) in table
    assert worker.node in table and "…" not in table

    # Flower: no login, no API; with it, the worker page's stats hold the leak
    assert flower_get(flower, "/api/workers", None)[0] == 401
    assert flower_get(flower, "/api/workers", "ops:wrong")[0] == 401
    status, workers = flower_get(flower, "/api/workers?refresh=1", "ops:s3cret-flower")
    assert status == 200
    assert workers[node]["stats"]["repoindex leaks"] == "fd 1"

    # Sentry: one warning event fingerprinted by kind, from the child
    wait_until(lambda: any(e.get("fingerprint") == ["repoindex-leak", "fd"]
                           for e in sink.events()), 30, "the leak event in Sentry")

    # the alert rule fires on a series built from the scraped values
    series = (f'repoindex_leaks_total{{worker="{doc["worker"]}", kind="fd"}}')
    assert_alert_fires(tmp_path, series,
                       f'{value(before, "repoindex_leaks_total", kind="fd"):g}x10 '
                       f'{value(after, "repoindex_leaks_total", kind="fd"):g}x30',
                       "RepoindexLeakDetected", {"worker": doc["worker"], "kind": "fd"},
                       {"summary": f"{doc['worker']}: an operation leaked (fd)",
                        "description": "The leak sentinel found 1 fd leak(s) in 15 min. The worker"
                        " log has one `leak op=<job id> kind=...` line per leak; Sentry one"
                        " issue per kind."})


def assert_alert_fires(tmp_path: Path, series: str, values: str, alert: str,
                       labels: dict[str, str], annotations: dict[str, str]) -> None:
    test = tmp_path / "scraped_test.yml"
    test.write_text(textwrap.dedent(f"""\
        rule_files: [{ROOT / 'ops' / 'prometheus' / 'alerts.yml'}]
        evaluation_interval: 1m
        tests:
          - interval: 1m
            input_series:
              - series: '{series}'
                values: '{values}'
            alert_rule_test:
              - eval_time: 15m
                alertname: {alert}
                exp_alerts:
                  - exp_labels: {json.dumps({**labels, "severity": "warning"})}
                    exp_annotations: {json.dumps(annotations)}
        """))
    done = subprocess.run(["promtool", "test", "rules", str(test)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_stats_watch_refreshes_until_interrupted(monitored: tuple[WorkerProcess, int]) -> None:
    """Off a terminal: one whole, uncut table per refresh; Ctrl-C ends it with status 0."""
    worker, _ = monitored
    # Ctrl-C as a terminal delivers it: SIGINT at its default (a suite started in the
    # background, e.g. `nohup … &`, has it ignored, and children inherit that)
    proc = subprocess.Popen([EXE, "stats", "--watch", "0.3"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        for line in proc.stdout:  # until two tables were written (the first and a refresh)
            seen.append(line)
            if sum("worker children" in ln for ln in seen) == 2:
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    text = "".join(seen) + out
    assert text.count("worker children") >= 2
    assert worker.name in text  # not cut at 80 columns: the whole node name is there


def test_errors_and_a_dead_child_reach_sentry_from_child_and_main(
        monitored: tuple[WorkerProcess, int], celery_app: Any, sink: Sink) -> None:
    worker, port = monitored
    failing = send(celery_app, worker, "probe.open_files", n=1, fail=True)
    failing.get(timeout=60, propagate=False)
    assert failing.state == "FAILURE"
    wait_until(lambda: any(e.get("fingerprint") == ["repoindex-task-failed", "probe.open_files",
                                                    "ProbeFailure"]
                           and "failing with 1 files open" in json.dumps(e["exception"])
                           and e["tags"]["job"] == failing.id for e in sink.events()),
               30, "the task error in Sentry")
    victim = worker.children()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: value(scrape(port), "repoindex_child_recycles_total", reason="died") == 1,
               30, "the dead child counted")
    wait_until(lambda: any(e.get("fingerprint") == ["repoindex-child-died"]
                           for e in sink.events()), 30, "the dead child in Sentry")
    wait_until(lambda: len(worker.children()) == 2, 30, "the child replaced")
    assert pids_of(scrape(port)) == set(worker.children())


def test_hundred_child_replacements_keep_every_count_and_no_stale_series(
        celery_app: Any, temp_root: Path) -> None:
    port = free_port()
    queue = f"recycle-{uuid.uuid4().hex[:6]}"
    worker = start_worker("recycle", concurrency=2, queue=queue,
                          env={"REPOINDEX_METRICS_PORT": str(port)},
                          args=("--max-tasks-per-child=1",))
    try:
        jobs = [celery_app.send_task("repoindex.canary", queue=queue, kwargs={"seconds": 0})
                for _ in range(100)]
        for job in jobs:
            job.get(timeout=120)
        wait_until(lambda: value(scrape(port), "repoindex_child_recycles_total",
                                 reason="max_tasks") == 100, 60, "100 recycles counted")
        wait_until(lambda: len(worker.children()) == 2
                   and pids_of(scrape(port)) == set(worker.children()), 30,
                   "two live children, each with its series")
        samples = scrape(port)
        assert value(samples, "repoindex_operations_total", outcome="succeeded") == 100
        assert value(samples, "repoindex_operation_duration_seconds_count") == 100
        assert value(samples, "repoindex_cleanups_total", outcome="clean") == 100
        assert value(samples, "repoindex_child_recycles_total", reason="died") == 0, \
            worker.log()[-4000:]
        live = set(worker.children())
        assert pids_of(samples) == live
        files = list((temp_root / f"stats-{worker.pid}").iterdir())
        assert {int(f.stem) for f in files} <= live, files
    finally:
        assert worker.stop() == 0


def test_dashboard_panels_have_data_in_a_real_prometheus(
        monitored: tuple[WorkerProcess, int], celery_app: Any, tmp_path: Path) -> None:
    worker, port = monitored
    send(celery_app, worker, "repoindex.canary", seconds=0).get(timeout=60)
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(textwrap.dedent(f"""\
        global: {{scrape_interval: 1s, evaluation_interval: 1s}}
        scrape_configs:
          - job_name: repoindex
            static_configs: [{{targets: ["127.0.0.1:{port}"]}}]
        """))
    log = (tmp_path / "prometheus.log").open("wb")
    prom = subprocess.Popen(["prometheus", f"--config.file={config}",
                             f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        dashboard = json.loads((ROOT / "ops/grafana/repoindex-workers.json").read_text())
        exprs = [t["expr"].replace("$worker", ".*").replace("$__rate_interval", "30s")
                 for p in dashboard["panels"] for t in p["targets"]]
        assert len(dashboard["panels"]) >= 12
        send(celery_app, worker, "repoindex.canary", seconds=0).get(timeout=60)
        empty: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            empty = [e for e in exprs if not _query(prom_port, e)]
            if not empty:
                break
            time.sleep(1)
        assert not empty, f"panels without data: {empty}"
    finally:
        prom.terminate()
        prom.wait(30)
        log.close()


def _query(port: int, expr: str) -> list[Any]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            result: list[Any] = json.loads(resp.read())["data"]["result"]
            return result
    except OSError:
        return []


def test_alert_rules_pass_their_unit_tests() -> None:
    rules = ROOT / "ops" / "prometheus"
    for argv in (["promtool", "check", "rules", str(rules / "alerts.yml")],
                 ["promtool", "check", "config", "--syntax-only", str(rules / "prometheus.yml")],
                 ["promtool", "test", "rules", str(rules / "alerts_test.yml")]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stdout + done.stderr


def test_metrics_listen_on_loopback_in_the_main_process_only(
        monitored: tuple[WorkerProcess, int]) -> None:
    """REPOINDEX_METRICS_ADDR is unset here: the default binds 127.0.0.1; children close
    their inherited copy of the listening socket."""
    worker, port = monitored
    listening = [c for c in psutil.Process(worker.pid).net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert [c.laddr.ip for c in listening] == ["127.0.0.1"]
    for pid in worker.children():
        assert not [c for c in psutil.Process(pid).net_connections("tcp")
                    if c.status == psutil.CONN_LISTEN]


def browser_dom(url: str, tmp_path: Path) -> str:
    """The page as headless chromium renders it (Debian's chromium; README's test command
    installs it)."""
    done = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                           f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def other_rows(dom: str) -> dict[str, str]:
    """The name/value rows of the worker page's "Other statistics" table."""
    import html
    import re

    table = dom.split("Other statistics", 1)[1].split("</table>", 1)[0]
    cells = [html.unescape(re.sub(r"<[^>]+>", "", c)).strip()
             for c in re.findall(r"<td[^>]*>(.*?)</td>", table, re.S)]
    return dict(zip(cells[::2], cells[1::2], strict=True))


def test_flower_worker_page_shows_labelled_fresh_figures_and_progress(
        monitored: tuple[WorkerProcess, int], celery_app: Any, flower: int,
        tmp_path: Path) -> None:
    worker, _ = monitored
    page = f"http://ops:s3cret-flower@127.0.0.1:{flower}/worker/{worker.node}"
    first = other_rows(browser_dom(page, tmp_path))
    pids = set(worker.children())
    assert child_pids(first) == pids
    for pid in pids:  # one labelled row per figure and child, in human units
        label = f"repoindex child {pid}"
        assert re.fullmatch(r"\d+ of \d+", first[f"{label} open files"])
        assert re.fullmatch(r"RSS \d+\.\d MiB, USS \d+\.\d MiB", first[f"{label} memory"])
        assert re.fullmatch(r"\d+ open, \d+ idle, max \d+, \d+ waiting",
                            first[f"{label} database pool"])
    assert re.fullmatch(r"\d+\.\d MiB|none", first["repoindex memory limit per child"])
    ops = sum(int(first[f"repoindex child {pid} operations"]) for pid in pids)

    # progress: the task's phase and done/total, shown by Flower while it runs
    job = send(celery_app, worker, "probe.phases", names=["reading tree", "storing"], steps=20,
               seconds=3.0)
    seen: set[str] = set()

    def progress_shown() -> bool:
        status, info = flower_get(flower, f"/api/task/info/{job.id}", "ops:s3cret-flower")
        if status == 200 and info.get("state") == "PROGRESS":
            seen.add(str(info.get("result")).split(":")[0])
        return seen == {"reading tree", "storing"}

    wait_until(progress_shown, 60, "both phases shown in Flower")
    assert job.get(timeout=60) == 2

    # fresh on this very load: the operation just finished is counted
    again = other_rows(browser_dom(page, tmp_path))
    assert sum(int(again[f"repoindex child {pid} operations"]) for pid in pids) == ops + 1

    # the login covers /metrics too; /healthcheck stays open for probes
    assert flower_get_text(flower, "/metrics", None)[0] == 401
    status, text = flower_get_text(flower, "/metrics", "ops:s3cret-flower")
    assert status == 200 and "flower_events_total" in text
    assert flower_get_text(flower, "/healthcheck", None) == (200, "OK")


def flower_get_text(port: int, path: str, auth: str | None) -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if auth is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code, ""
