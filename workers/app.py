"""The Celery application: ``celery -A workers.app worker``.

Configuration comes from ``celeryconfig`` (Celery's own names, read from the environment);
the task modules are listed there too, so this package never imports ``tasks``.
"""

from __future__ import annotations

from celery import Celery

from workers import hooks, monitor, recovery, shutdown


def create_app() -> Celery:
    app = Celery("repoindex")
    app.config_from_object("celeryconfig")
    # A worker's result (or state) that cannot reach Redis is retried with backoff (10 ms
    # to 10 s), 30 times, minutes in all, instead of failing at once: an operation that
    # committed while its replica was cut off from Redis would otherwise have Celery store
    # FAILURE for it once Redis answered again, and its caller would see the job fail
    # although it succeeded. Only here: a producer (`repoindex status`, another service)
    # asks once and says at once that Redis is unreachable. (Progress reports do not
    # wait either: workers/task.py.)
    app.conf.update(result_backend_always_retry=True, result_backend_max_retries=30)
    hooks.connect()
    app.steps["worker"].add(monitor.Monitor)
    app.steps["worker"].add(shutdown.LoopHook)
    app.steps["consumer"].add(recovery.Recovery)
    return app


app = create_app()
