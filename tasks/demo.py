"""``repoindex demo``: the whole product on one machine, from nothing, in one command."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workers import devservices
from workers.launcher import WorkerProcess

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


def run_demo(echo: Callable[[str], None]) -> dict[str, Any]:
    from tasks import cli

    with tempfile.TemporaryDirectory(prefix="repoindex-demo-") as raw, \
            devservices.services("repoindex_demo") as ep:
        tmp = Path(raw)
        echo(f"redis: {ep.redis_url}  postgres: {ep.database_url}  "
             f"(started here: {', '.join(ep.started) or 'nothing'})")
        source = sample_source(tmp)
        env = {**os.environ, "REDIS_URL": ep.redis_url, "DATABASE_URL": ep.database_url,
               "REPOINDEX_ROOTS": str(source.parent), "REPOINDEX_TEMP_DIR": str(tmp / "work")}
        os.environ.update({k: env[k] for k in ("REDIS_URL", "DATABASE_URL")})
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
            doc = cli.wait_for(job, show=True, timeout=600)
            echo(f"state: {doc['state']} in {time.monotonic() - started:.1f}s")
            result = doc.get("result") or {}
            echo("summary: " + ", ".join(f"{k}={v}" for k, v in result.items()))
            conn = cli._connection()
            with conn:
                from tasks.search import search

                matches = search(conn, "ResourceManager", repo="demo", limit=5)
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
