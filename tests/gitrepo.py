"""Generated git repositories for the tests and benchmarks."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com",
       "-c", "init.defaultBranch=main", "-c", "core.autocrlf=false"]
MARKER = "zebra-quokka-7731"


def git(repo: Path, *args: str) -> str:
    return subprocess.run([*GIT, "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout


def init(repo: Path) -> Path:
    repo.mkdir(parents=True, exist_ok=True)
    subprocess.run([*GIT, "init", "-q", str(repo)], check=True)
    return repo


def commit(repo: Path, message: str = "change") -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD").strip()


def tracked(repo: Path) -> set[str]:
    out = subprocess.run([*GIT, "-C", str(repo), "ls-files", "-z"], check=True,
                         capture_output=True).stdout
    return {p.decode("utf-8", errors="backslashreplace") for p in out.split(b"\0") if p}


def write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def generated(repo: Path, files: int = 2000, *, large_bytes: int = 200_000,
              seed: str = "") -> dict[str, str]:
    """A repository of ``files`` text files plus one of every special case.

    File contents differ by ``seed`` (default: the directory name), so that blobs are not
    shared with other generated repositories. Returns the expected kind of each special
    path (everything else is ``text``).
    """
    init(repo)
    for i in range(files):
        write(repo / f"pkg{i % 10}" / f"sub{i % 7}" / f"module_{i}.py",
              f"# module {i} {seed or repo.name}\n"
              + "".join(f"def f{j}():\n    return {i * j}\n" for j in range(8)))
    special = {
        "bin/blob.bin": "binary", "bin/image.png": "binary", "empty.txt": "text",
        "docs/empty.md": "text", "big/large.txt": "too_large", "links/passwd": "symlink",
        "links/parent": "symlink", "links/loop": "symlink", "latin1.txt": "text",
        "dir with space/naïve café.txt": "text", "日本語/ファイル.md": "text",
        "marker/found.txt": "text", ".gitignore": "text",
    }
    write(repo / "bin/blob.bin", b"\x00\x01\x02binary" * 100)
    write(repo / "bin/image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    write(repo / "empty.txt", b"")
    write(repo / "docs/empty.md", b"")
    write(repo / "big/large.txt", b"x" * large_bytes)
    (repo / "links").mkdir()
    os.symlink("/etc/passwd", repo / "links/passwd")
    os.symlink("..", repo / "links/parent")
    os.symlink("loop", repo / "links/loop")
    write(repo / "latin1.txt", "caf\u00e9 na\u00efve\n".encode("latin-1"))
    write(repo / "dir with space/naïve café.txt", "unicode name\n")
    write(repo / "日本語/ファイル.md", "日本語のテキスト\n")
    write(repo / "marker/found.txt", f"line one\nthe {MARKER} is here\nline three\n")
    write(repo / ".gitignore", "build/\n*.o\n")
    write(repo / "build/output.js", "ignored\n")
    write(repo / "pkg0/obj.o", b"ignored object")
    commit(repo, "generated")
    return special


def generated_many(roots: Path, prefix: str, count: int, files: int) -> list[Path]:
    """``count`` generated repositories ``roots/prefix-N`` of ``files`` files each."""
    repos = [roots / f"{prefix}-{i}" for i in range(count)]
    for repo in repos:
        generated(repo, files=files)
    return repos
