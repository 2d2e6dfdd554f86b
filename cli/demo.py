"""``repoindex demo``: the whole product on one machine, from nothing, in one command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from cli.common import connect, long_running
from cli.jobs import wait_for
from workers.settings import Settings

CHECKOUT = Path(__file__).resolve().parent.parent


def sample_source(tmp: Path) -> Path:
    """This checkout when it is a git repository, otherwise a small generated one."""
    probe = subprocess.run(["git", "-C", str(CHECKOUT), "rev-parse", "--show-toplevel"],
                           capture_output=True, text=True, check=False)
    if probe.returncode == 0 and Path(probe.stdout.strip()) == CHECKOUT:
        return CHECKOUT
    repo = tmp / "sample"
    (repo / "src").mkdir(parents=True)
    for i in range(50):
        (repo / "src" / f"module_{i}.py").write_text(f"class ResourceManager{i}:\n    pass\n")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=demo", "-c", "user.email=demo@x",
                    "commit", "-qm", "sample"], check=True)
    return repo


class Unreachable(click.ClickException):
    exit_code = 3  # a service unreachable (README "Exit statuses")

    def __init__(self, service: str, url: str) -> None:
        from workers.scrub import scrub

        variable = "REDIS_URL" if service == "Redis" else "DATABASE_URL"
        super().__init__(f"cannot reach {service} at {scrub(url)}; is it running and is "
                         f"{variable} right (unset, the demo starts its own)?")


def run_demo(echo: Callable[[str], None]) -> dict[str, Any]:
    # imported here: psycopg and redis would slow the start of every other command
    from devtools import devservices
    from devtools.launcher import WorkerProcess

    with tempfile.TemporaryDirectory(prefix="repoindex-demo-") as raw, \
            devservices.services("repoindex_demo") as ep:
        tmp = Path(raw)
        echo(f"redis: {ep.redis_url}  postgres: {ep.database_url}  "
             f"(started here: {', '.join(ep.started) or 'nothing'})")
        for service, url, answers in (("Redis", ep.redis_url, devservices.redis_answers),
                                      ("PostgreSQL", ep.database_url,
                                       devservices.postgres_answers)):
            if not answers(url):  # a configured URL that is wrong: say so before any worker
                raise Unreachable(service, url)
        source = sample_source(tmp)
        env = {**os.environ, "REDIS_URL": ep.redis_url, "DATABASE_URL": ep.database_url,
               "REPOINDEX_ROOTS": str(source.parent), "REPOINDEX_TEMP_DIR": str(tmp / "work")}
        os.environ.update({k: env[k] for k in ("REDIS_URL", "DATABASE_URL")})
        settings = Settings.from_env(env)
        workers = [WorkerProcess(env, name=f"demo{i}-{os.getpid()}", log_path=tmp / f"w{i}.log",
                                 concurrency=1) for i in range(2)]
        try:
            for w in workers:
                w.start()
            echo(f"workers: {', '.join(f'{w.name} (pid {w.pid})' for w in workers)}")
            from workers.app import app

            started = time.monotonic()
            job = app.send_task("repoindex.index_repository",
                                kwargs={"source": str(source), "name": "demo"}).id
            echo(f"indexing {source} as job {job}")
            doc = wait_for(job, settings, show=sys.stderr.isatty(), timeout=600)
            echo(f"state: {doc['state']} in {time.monotonic() - started:.1f}s")
            result = doc.get("result") or {}
            echo("summary: " + ", ".join(f"{k}={v}" for k, v in result.items()))
            conn = connect(settings)
            with conn:
                from tasks.search import search

                # where code uses it (an import or the class), not a file quoting a search
                # for it: README's sample output, or this very line
                matches = search(conn, r"^(from \S+ import|class) ResourceManager",
                                 regex=True, repo="demo", langs=["python"], limit=5)
            for m in matches:
                echo(f"  {m.repo}:{m.path}:{m.line}: {m.text.strip()[:100]}")
        finally:
            codes = [w.stop() for w in workers]
        echo(f"workers stopped with exit codes {codes}")
        cleanup = [ln for w in workers for ln in w.log().splitlines() if "cleanup op=" in ln]
        if cleanup:
            echo("cleanup: " + cleanup[-1].split("cleanup ", 1)[1])
        return {"ok": doc["state"] == "SUCCESS" and bool(matches), "job": doc,
                "matches": [m.as_dict() for m in matches], "exit_codes": codes}


@click.command()
@click.option("--json", "as_json", is_flag=True)
def demo(as_json: bool) -> None:
    """Start services and two workers, index this checkout, search, report, shut down."""
    long_running()
    report = run_demo(echo=(lambda s: None) if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(report, default=str))
    sys.exit(0 if report["ok"] else 1)
