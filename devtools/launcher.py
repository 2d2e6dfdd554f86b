"""Starting and stopping real ``celery worker`` processes (the demo, tests, benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

from workers.errors import ConfigError


class WorkerProcess:
    """One worker replica: ``celery -A workers.app worker`` in its own process group."""

    def __init__(self, env: Mapping[str, str], *, name: str, log_path: Path,
                 concurrency: int = 2, args: Sequence[str] = (), app: str = "workers.app",
                 queue: str | None = None, wrap: Sequence[str] = (),
                 host: str | None = None) -> None:
        self.env = dict(env)
        # Read by billiard at import: SIGTERM starts the cold shutdown (README "Shutting down").
        self.env.setdefault("REMAP_SIGTERM", "SIGQUIT")
        self.name = name
        self.log_path = log_path
        self.queue = queue  # consume only this queue (None: Celery's default queue)
        # ``wrap``: a command that execs the worker (e.g. in a network namespace of its own,
        # under the host name ``host``), so ``pid`` is still the worker's main process
        self.host = host
        self.argv = [*wrap, sys.executable, "-m", "celery", "-A", app, "worker",
                     "--pool", "prefork", "-c", str(concurrency), "-n", f"{name}@%h",
                     "--without-mingle", "--without-gossip", *(("-Q", queue) if queue else ()),
                     *args]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, ready_timeout: float = 60.0, wait: bool = True) -> WorkerProcess:
        """Start; with ``wait`` (default) return once the worker logged that it is ready."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        if wait:
            self.wait_for_log(" ready.", ready_timeout)
        return self

    @property
    def node(self) -> str:
        """The worker's node name (``-n name@%h``): the destination of control commands."""
        return f"{self.name}@{self.host or socket.gethostname()}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise ConfigError(f"worker {self.name} exited ({self.proc.returncode}):\n"
                                  + self.log()[-3000:])
            time.sleep(0.05)
        raise ConfigError(f"worker {self.name}: {text!r} not logged within {timeout:g}s")

    def children(self) -> list[int]:
        try:
            return [c.pid for c in psutil.Process(self.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait; SIGKILL the whole group if it does not exit in ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        os.kill(self.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
            if code != 0:  # the caller's assertion fails on it; the log says why
                print(f"worker {self.name} exited {code} after SIGTERM; its log ends:\n"
                      + self.log()[-4000:], file=sys.stderr)
            return code
        except subprocess.TimeoutExpired:
            # the caller's assertion fails on the exit code; the log says why it hung
            print(f"worker {self.name} did not exit {timeout:g}s after SIGTERM; its log ends:\n"
                  + self.log()[-4000:], file=sys.stderr)
            os.killpg(self.pid, signal.SIGKILL)
            return self.proc.wait()
