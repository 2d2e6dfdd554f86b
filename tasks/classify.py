"""File classification: language from the name, text/binary/encoding from the content."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata

from identify.identify import tags_from_filename

BINARY_PROBE = 8000  # git's heuristic: a NUL in the first 8000 bytes means binary
# identify's tags that describe a file's nature rather than its language
_GENERIC = frozenset({"text", "binary", "plain-text", "header", "image", "executable",
                      "non-executable", "file", "directory", "symlink", "socket", "archive",
                      "audio", "video", "font"})


# Bump when a file's row is decided differently (its language, its kind, the path and
# symlink limits of tasks.indexer.tree_rows): a repository indexed under another version
# is re-read in full, never kept or patched by the delta path (tasks.reindex).
RULES = 1


@lru_cache(maxsize=1)
def version() -> str:
    """What decides a file's row besides the settings: our rules and identify's version
    (its table maps names to languages)."""
    return f"{RULES}/identify-{metadata.version('identify')}"


@dataclass(frozen=True)
class Content:
    """What a blob's bytes are: binary, or text with a line count (and whether lossy)."""

    binary: bool
    lines: int = 0
    lossy: bool = False  # not UTF-8: stored decoded with U+FFFD replacement characters
    text: str | None = None


@lru_cache(maxsize=4096)
def language(filename: str) -> str | None:
    """A language name from the file name (extension or well-known name), or None."""
    tags = tags_from_filename(filename)
    specific = sorted(tags - _GENERIC)
    if specific:
        return specific[0]
    return "text" if "plain-text" in tags else None


def classify(data: bytes) -> Content:
    """Classify a blob. A NUL anywhere makes it binary: PostgreSQL text cannot hold NUL,
    so this is git's rule (first 8000 bytes) extended to the whole blob."""
    if b"\x00" in data:
        return Content(binary=True)
    lines = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    try:
        return Content(binary=False, lines=lines, text=data.decode("utf-8"))
    except UnicodeDecodeError:
        return Content(binary=False, lines=lines, lossy=True,
                       text=data.decode("utf-8", errors="replace"))


def decode_path(raw: bytes) -> str:
    """A path as text; bytes that are not UTF-8 are kept visible as ``\\xNN`` escapes."""
    return raw.decode("utf-8", errors="backslashreplace")
