"""The only module that connects Celery signals, and only those of a process's life
(logging, after fork, shutdown, ready). Receivers are strong, connected once
(``dispatch_uid``) and trivial. What happens around each operation is not here: it is the
steps of ``workers.task.STEPS``."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import signals

from workers import logs, monitor, recovery, revoke, runtime, shutdown
from workers.settings import process_settings

log = logging.getLogger("repoindex.hooks")


def on_setup_logging(**_: Any) -> None:
    settings = process_settings()
    logs.configure(settings.log_level, settings.log_format)


def on_process_init(**_: Any) -> None:
    # Runs in each prefork child after fork; must return within worker_proc_alive_timeout,
    # hence the pool opens with wait=False.
    monitor.close_inherited()
    shutdown.forget_in_child()
    rt = runtime.start(child_of=os.getppid())
    revoke.install(rt.settings.temp_dir)


def on_process_shutdown(**_: Any) -> None:
    runtime.shutdown()


def on_worker_shutdown(**_: Any) -> None:
    # The main process of a prefork worker holds no pool; a solo worker does.
    runtime.shutdown()


def on_worker_ready(sender: Any = None, **_: Any) -> None:
    # sender is the consumer; its controller is the worker whose handlers we adjust
    if sender is not None and getattr(sender, "controller", None) is not None:
        shutdown.install_handlers(sender.controller)


_RECEIVERS = (
    (signals.setup_logging, on_setup_logging),
    (signals.worker_process_init, on_process_init),
    (signals.worker_process_shutdown, on_process_shutdown),
    (signals.worker_shutdown, on_worker_shutdown),
    (signals.worker_ready, on_worker_ready),
    (signals.task_revoked, revoke.on_task_revoked),
    (signals.task_received, recovery.on_task_received),
)


def connect() -> None:
    """Connect every receiver (idempotent)."""
    for signal, receiver in _RECEIVERS:
        signal.connect(receiver, weak=False, dispatch_uid=f"repoindex.{receiver.__name__}")
