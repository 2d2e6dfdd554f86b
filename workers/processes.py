"""Stopping a child process and whatever it spawned: TERM, then KILL, to its group."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

import psutil


def has_open_pipes(proc: subprocess.Popen[bytes]) -> bool:
    return any(p is not None and not p.closed for p in (proc.stdin, proc.stdout, proc.stderr))


def reap(proc: subprocess.Popen[bytes], grace: float) -> None:
    """Close our pipe ends, stop the process (TERM, then KILL) and wait for it."""
    try:
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):  # EPIPE flushing stdin of a dead child
                    pipe.close()
    finally:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
        proc.wait()
        _signal_group(proc, signal.SIGKILL)  # stragglers of its group, if any


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal the process's group when it leads one, else the process alone."""
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        elif proc.returncode is None:
            proc.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass


def running_child(pid: int) -> bool:
    """Whether ``pid`` is a running (not zombie) child of this process: one the pool may
    not list yet, since billiard forks and then adds the process to its list, and a child
    under load can write its first stats file in between (a scrape folding that file then
    counted a newborn child as ``died``)."""
    try:
        proc = psutil.Process(pid)
        return proc.ppid() == os.getpid() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
