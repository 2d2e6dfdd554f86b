"""``repoindex flower``: Flower 2.2, run in this process with two of its handlers changed.

- The worker page waits for a fresh ``inspect`` reply on every load. Flower renders its
  cached reply at once and refreshes it in the background, so each load showed the figures
  of the load before it; a worker page is opened to see the figures now.
- ``/metrics`` asks for the login like every other page (Flower serves it without one).
  ``/healthcheck`` stays open — it answers ``OK`` and nothing else, for liveness probes.

Run as ``python -m cli.flower_server [flower options]`` (what ``repoindex flower`` execs).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger("repoindex.flower")


def patch_flower() -> None:
    from flower.views import monitor, workers
    from tornado import web

    page = workers.WorkerView.get

    async def fresh_worker_page(self: Any, name: str) -> None:
        try:
            await self.application.update_workers(workername=name)
        except Exception:  # as Flower does: the page still renders what it has
            log.exception("inspecting worker %s failed", name)
        await page(self, name)

    workers.WorkerView.get = web.authenticated(fresh_worker_page)
    monitor.Metrics.get = web.authenticated(monitor.Metrics.get)


def main(argv: list[str]) -> None:
    from celery.bin.celery import main as celery_main

    patch_flower()
    sys.argv = ["celery", "-A", "workers.app", "flower", *argv]
    celery_main()


if __name__ == "__main__":
    main(sys.argv[1:])
