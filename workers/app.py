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
    hooks.connect()
    app.steps["worker"].add(monitor.Monitor)
    app.steps["worker"].add(shutdown.LoopHook)
    app.steps["consumer"].add(recovery.Recovery)
    return app


app = create_app()
