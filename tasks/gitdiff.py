"""What changed between two commits, from git itself: the re-index's delta path.

Everything runs through the same ``Git`` as the full path (our own git dir and config, a
deadline per process, every process owned by the operation's scope); only the arguments
differ. ``changes`` is ``git diff-tree -r -z --raw --no-renames``: every leaf path whose
mode or id differs, a gitlink as a leaf, a file <-> directory swap as the deletion of one
side and the additions of the other.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from tasks.git import MODE_SUBMODULE, Git, TreeEntry, _finish, complete, git_env
from workers.errors import SourceError


@dataclass(frozen=True)
class Changes:
    """The paths to drop (both sides of every change) and the entries of the new side."""

    paths: list[bytes]
    added: list[TreeEntry]


def ancestry(git: Git, old: str, new: str) -> str:
    """``ancestor``, ``not an ancestor``, or ``missing`` (``old`` is not in the repository:
    another source, a shallow clone, a pruned force-push)."""
    code, _, _ = complete(git.rm, git._argv("merge-base", "--is-ancestor", "--end-of-options",
                                            old, new), git.timeout, env=git_env(),
                          what="merge-base")
    return {0: "ancestor", 1: "not an ancestor"}.get(code, "missing")


def changes(git: Git, old: str, new: str) -> Changes:
    """Every path that differs from ``old`` to ``new``, with sizes of the new side's blobs."""
    paths: list[bytes] = []
    added: list[tuple[int, str, bytes]] = []
    for meta, path in _records(git, old, new):
        # ":<old mode> <new mode> <old id> <new id> <status>"
        _old_mode, new_mode, _old_sha, new_sha, _status = meta.lstrip(b":").split()
        paths.append(path)
        mode = int(new_mode, 8)
        if mode:  # 0: the path is gone on the new side
            added.append((mode, new_sha.decode(), path))
    sizes = _sizes(git, {sha for mode, sha, _ in added if mode != MODE_SUBMODULE})
    return Changes(paths, [TreeEntry(mode, sha, None if mode == MODE_SUBMODULE else sizes[sha],
                                     path) for mode, sha, path in added])


def _records(git: Git, old: str, new: str) -> Iterator[tuple[bytes, bytes]]:
    with git._start("diff-tree", "-r", "-z", "--raw", "--no-renames", "--no-abbrev",
                    "--end-of-options", old, new) as proc:
        assert proc.stdout is not None
        meta: bytes | None = None
        rest = b""
        while chunk := proc.stdout.read(1 << 16):
            parts = (rest + chunk).split(b"\0")
            rest = parts.pop()
            for part in parts:  # a record is two fields: its meta, then its path
                if meta is None:
                    meta = part
                else:
                    yield meta, part
                    meta = None
        _finish(proc, "diff-tree", git.expired)
        if meta is not None or rest:
            raise SourceError("git diff-tree: output ended mid-record")


def _sizes(git: Git, shas: Iterable[str], window: int = 256) -> dict[str, int]:
    """Each blob's size from ``git cat-file --batch-check``, ``window`` ids at a time (our
    writes never wait on git's unread output); a missing object is SourceError."""
    sizes: dict[str, int] = {}
    todo = sorted(shas)
    if not todo:
        return sizes
    with git._start("cat-file", "--batch-check", stdin=True) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        for start in range(0, len(todo), window):
            batch = todo[start:start + window]
            proc.stdin.write(("\n".join(batch) + "\n").encode())
            proc.stdin.flush()
            for sha in batch:
                header = proc.stdout.readline().split()
                if len(header) != 3 or header[0].decode() != sha:
                    raise SourceError(git._missing(sha))
                sizes[sha] = int(header[2])
        proc.stdin.close()
        _finish(proc, "cat-file", git.expired)
    return sizes
