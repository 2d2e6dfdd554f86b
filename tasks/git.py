"""Reading a repository with plain git subprocesses, each tracked by the operation's scope.

GitPython is not used: it leaks ``git cat-file`` processes and fds when exceptions keep
frames alive. Here every process is started through ``ResourceManager.popen`` (so it is
terminated, killed and reaped whatever happens), has a deadline enforced by a watchdog
thread of the same scope, and runs with prompts, hooks, system/global config, replace
refs and dangerous transports disabled. A local repository is read through a git dir of
our own (``tasks.gitdir``), never with its own config; every object read is checked
against its id, so what is stored under a blob id is that blob, whatever the repository.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tasks import gitdir
from workers.errors import SourceError
from workers.resources import ResourceManager
from workers.scrub import scrub

SAFE_CONFIG = (
    "core.hooksPath=/dev/null",
    "protocol.allow=never", "protocol.https.allow=always", "protocol.ssh.allow=always",
    "protocol.git.allow=always", "protocol.file.allow=always",
    # bound git's own memory: mmap window and delta cache (issue: memory)
    "core.packedGitLimit=128m", "core.packedGitWindowSize=16m", "core.deltaBaseCacheLimit=32m",
    "credential.helper=", "core.fsmonitor=false", "uploadpack.allowFilter=false",
)
MODE_SYMLINK = 0o120000
MODE_SUBMODULE = 0o160000
MISSING = -1  # the size ls-tree -l gives an object it cannot read ("BAD")
SYMLINK_MAX = 4095  # longest symlink target Linux accepts (PATH_MAX 4096 with its NUL)


def git_env() -> dict[str, str]:
    """The environment of every git process: no inherited GIT_*, no prompts, no config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "SSH_ASKPASS"))}
    env.update({
        "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "/bin/false", "SSH_ASKPASS": "/bin/false",
        "GIT_SSH_COMMAND": "ssh -o BatchMode=yes -o ConnectTimeout=30",
        "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_ALLOW_PROTOCOL": "https:ssh:git:file", "GIT_PROTOCOL_FROM_USER": "0",
        # refs/replace/* would let a repository map any object id to other content;
        # GIT_NO_LAZY_FETCH (git >= 2.45) is a second lock on what the shadow git dir
        # already prevents on older git: fetching a partial clone's missing objects
        "GIT_NO_REPLACE_OBJECTS": "1", "GIT_NO_LAZY_FETCH": "1", "GIT_OPTIONAL_LOCKS": "0",
        "LC_ALL": "C",
    })
    return env


@dataclass(frozen=True, slots=True)
class TreeEntry:
    mode: int
    sha: str
    size: int | None  # None for submodules
    path: bytes


class Git:
    """A git repository read through subprocesses owned by one resource scope."""

    def __init__(self, rm: ResourceManager, git_dir: Path, timeout: float, *,
                 object_format: str = "sha1", partial: bool = False) -> None:
        self.rm = rm
        self.git_dir = git_dir
        self.timeout = timeout
        self.object_format = object_format
        self.partial = partial  # a partial clone: objects may be missing, never fetched
        self.expired: set[int] = set()  # pids its watchdogs killed at the deadline

    # -- opening -----------------------------------------------------------------------
    @classmethod
    def open_local(cls, rm: ResourceManager, path: Path, timeout: float,
                   roots: tuple[Path, ...]) -> Git:
        """The repository at ``path`` itself, read through a git dir of our own whose every
        path resolves under ``roots`` (``tasks.gitdir``)."""
        layout = gitdir.locate(path, roots, timeout=timeout)
        shadow = gitdir.shadow(layout, rm.temp_path("gitdir"))
        return cls(rm, shadow, timeout, object_format=layout.object_format,
                   partial=layout.partial_clone)

    @classmethod
    def clone(cls, rm: ResourceManager, url: str, timeout: float) -> Git:
        """A bare clone of ``url`` into the scope's temp area."""
        target = rm.temp_path("clone.git")
        run(rm, ["git", *_config_args(), "clone", "--bare", "--quiet", "--no-tags", "--",
                 url, str(target)], timeout, env=git_env(), what=f"clone {scrub(url)}")
        return cls(rm, target, timeout)

    # -- plumbing ----------------------------------------------------------------------
    def _argv(self, *args: str) -> list[str]:
        return ["git", "--no-replace-objects", f"--git-dir={self.git_dir}", *_config_args(),
                *args]

    def resolve(self, ref: str) -> str:
        """The commit id ``ref`` names, or SourceError."""
        try:
            out = run(self.rm, self._argv("rev-parse", "--verify", "--quiet", "--end-of-options",
                                          f"{ref}^{{commit}}"), self.timeout, env=git_env(),
                      what="rev-parse")
        except SourceError:
            raise SourceError(f"unknown ref {ref!r}") from None
        return out.decode().strip()

    @contextmanager
    def _start(self, *args: str, stdin: bool = False) -> Iterator[subprocess.Popen[bytes]]:
        """A streaming git process with a watchdog; both released when the block ends."""
        proc = self.rm.popen(self._argv(*args), stdin=subprocess.PIPE if stdin else None,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=git_env())
        try:
            watchdog = self.rm.start_thread(lambda stop: _watchdog(stop, proc, self.timeout,
                                                                   self.expired),
                                            name=f"git-watchdog-{proc.pid}")
            try:
                yield proc
            finally:
                self.rm.release(watchdog)
        finally:
            self.rm.release(proc)

    def ls_tree(self, commit: str) -> Iterator[TreeEntry]:
        """Every path git tracks at ``commit``, streamed."""
        with self._start("ls-tree", "-r", "-z", "-l", "--full-tree", commit) as proc:
            assert proc.stdout is not None
            rest = b""
            while chunk := proc.stdout.read(1 << 16):
                records = (rest + chunk).split(b"\0")
                rest = records.pop()
                for record in records:
                    entry = _parse_tree_record(record)
                    if entry.size == MISSING:  # ls-tree -l could not read the object
                        raise SourceError(self._missing(entry.sha))
                    yield entry
            _finish(proc, "ls-tree", self.expired)

    def read_blobs(self, shas: Iterable[str], *, max_bytes: int, window: int = 128
                   ) -> Iterator[tuple[str, bytes]]:
        """Contents of the blobs ``shas``, in order, through one ``git cat-file --batch``.

        At most ``window`` requests are outstanding, so our writes to git's stdin never
        block while git waits for us to read its stdout (no deadlock, no feeder thread).
        Each object must be a blob of at most ``max_bytes`` (checked from its header,
        before it is read) whose content hashes to its id; otherwise SourceError.
        """
        with self._start("cat-file", "--batch", stdin=True) as proc:
            assert proc.stdin is not None and proc.stdout is not None
            out, pending, todo = proc.stdout, deque[str](), iter(shas)
            self._request(proc, pending, todo, window, self.expired)
            while pending:
                header = out.readline().split()
                if len(header) != 3:
                    if not header:
                        _finish(proc, "cat-file", self.expired)
                    raise SourceError(self._missing(pending[0]))
                size = int(header[2])
                if header[1] != b"blob" or size > max_bytes:
                    raise SourceError(f"git object {pending[0]} is a {header[1].decode()} of "
                                      f"{size} bytes where the tree lists a blob of at most "
                                      f"{max_bytes}")
                data = out.read(size)
                if len(data) < size or out.read(1) != b"\n":  # git ended mid-object
                    _finish(proc, "cat-file", self.expired)
                    raise SourceError(f"git cat-file: object {pending[0]} ended early")
                sha = pending.popleft()
                if object_id(self.object_format, b"blob", data) != sha:
                    raise SourceError(f"git object {sha} is corrupt: its content does not "
                                      "hash to its id")
                yield sha, data
                if len(pending) <= window // 2:
                    self._request(proc, pending, todo, window, self.expired)
            proc.stdin.close()
            _finish(proc, "cat-file", self.expired)

    @staticmethod
    def _request(proc: subprocess.Popen[bytes], pending: deque[str], todo: Iterator[str],
                 window: int, expired: set[int]) -> None:
        batch = []
        while len(pending) < window and (sha := next(todo, None)) is not None:
            pending.append(sha)
            batch.append(sha)
        if batch:
            assert proc.stdin is not None
            try:
                proc.stdin.write(("\n".join(batch) + "\n").encode())
                proc.stdin.flush()
            except BrokenPipeError:  # git is gone: say how it ended, not "Broken pipe"
                _finish(proc, "cat-file", expired)
                raise SourceError("git cat-file closed its input early") from None


    def _missing(self, sha: str) -> str:
        if self.partial:
            return (f"git object {sha} is missing: the repository is a partial clone and "
                    "repoindex never fetches; index a full clone")
        return f"git cat-file: object {sha} is missing"


def object_id(object_format: str, kind: bytes, data: bytes) -> str:
    """git's id of an object: the hash of ``<kind> <size>\\0`` and the content."""
    digest = hashlib.new(object_format, usedforsecurity=False)
    digest.update(kind + b" %d\0" % len(data))
    digest.update(data)
    return digest.hexdigest()


def _config_args() -> list[str]:
    return [arg for item in SAFE_CONFIG for arg in ("-c", item)]


def _parse_tree_record(record: bytes) -> TreeEntry:
    meta, _, path = record.partition(b"\t")
    mode, _type, sha, size = meta.split()
    size_of = None if size == b"-" else MISSING if size == b"BAD" else int(size)
    return TreeEntry(int(mode, 8), sha.decode(), size_of, path)


def _watchdog(stop: threading.Event, proc: subprocess.Popen[bytes], timeout: float,
              expired: set[int]) -> None:
    """Kill the whole process group at the deadline: git's own children (a remote helper,
    ssh, an alias) hold its stdout open, so killing git alone would leave the read blocked."""
    if not stop.wait(timeout) and proc.poll() is None:
        expired.add(proc.pid)
        with contextlib.suppress(ProcessLookupError):  # exited just now
            os.killpg(proc.pid, signal.SIGKILL)  # the scope starts it in a group of its own


def _finish(proc: subprocess.Popen[bytes], what: str, expired: set[int]) -> None:
    code = proc.wait()
    if code != 0:
        reason = ("killed after the git timeout" if proc.pid in expired else
                  f"killed by signal {-code}" if code < 0 else f"exit status {code}")
        raise SourceError(f"git {what} failed ({reason})")


def complete(rm: ResourceManager, argv: list[str], timeout: float, *, env: dict[str, str],
             what: str) -> tuple[int, bytes, bytes]:
    """Run a short git command to completion: (exit status, stdout, stderr)."""
    proc = rm.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SourceError(f"git {what} timed out after {timeout:g}s") from None
    finally:
        rm.release(proc)
    return proc.returncode, out, err


def run(rm: ResourceManager, argv: list[str], timeout: float, *, env: dict[str, str],
        what: str) -> bytes:
    """Run a short git command to completion; its stderr's last line becomes the error."""
    code, out, err = complete(rm, argv, timeout, env=env, what=what)
    if code != 0:
        lines = [ln for ln in err.decode(errors="replace").strip().splitlines() if ln.strip()]
        detail = scrub(lines[-1].removeprefix("fatal: ")) if lines else f"exit {code}"
        raise SourceError(f"git {what}: {detail}")
    return out

