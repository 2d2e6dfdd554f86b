"""Validation of job arguments and sources, before git or the database is touched.

Jobs come from other services: every argument is checked for type, size and allowed
values, unknown arguments are refused by name, and a source is accepted only as an
absolute local path under the configured roots or a URL of an allowed transport.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from workers.errors import BadInput

MAX_SOURCE = 4096
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._@+/-]{0,199}$")
# git check-ref-format rules that matter here, plus "no leading dash" (option injection).
REF_RE = re.compile(r"^(?!-)(?!.*\.\.)(?!.*@\{)(?!.*//)[^\x00-\x20~^:?*\[\\\x7f]{1,255}(?<![./])$")
REMOTE_SCHEMES = ("https", "ssh", "git")
SCP_RE = re.compile(r"^(?P<user>[A-Za-z0-9._-]+)@(?P<host>[A-Za-z0-9.-]+):(?P<path>[^:\s].*)$")


@dataclass(frozen=True)
class Source:
    """A validated source: ``path`` for local repositories, ``url`` for remote ones."""

    text: str
    path: Path | None = None
    url: str | None = None


@dataclass(frozen=True)
class IndexArgs:
    source: Source
    name: str
    ref: str


def bind_arguments(args: Sequence[Any], kwargs: Mapping[str, Any],
                   params: Sequence[str], required: int) -> dict[str, Any]:
    """Map positional and keyword arguments onto ``params``; refuse unknown or missing ones."""
    if not isinstance(kwargs, Mapping) or not isinstance(args, Sequence):
        raise BadInput("arguments must be a JSON list and a JSON object")
    if len(args) > len(params):
        raise BadInput(f"too many positional arguments: expected at most {len(params)} "
                       f"({', '.join(params)}), got {len(args)}")
    bound = dict(zip(params, args, strict=False))
    for key, value in kwargs.items():
        if key not in params:
            raise BadInput(f"unknown argument {str(key)[:50]!r}; expected {', '.join(params)}")
        if key in bound:
            raise BadInput(f"argument {key!r} given twice")
        bound[key] = value
    missing = [p for p in params[:required] if p not in bound]
    if missing:
        raise BadInput(f"missing required argument {missing[0]!r}")
    return bound


def _string(value: Any, what: str, limit: int) -> str:
    if not isinstance(value, str):
        raise BadInput(f"{what} must be a string, got {type(value).__name__}")
    if not value or len(value) > limit:
        raise BadInput(f"{what} must be 1 to {limit} characters long")
    if any(ord(c) < 32 or c == "\x7f" for c in value):
        raise BadInput(f"{what} must not contain control characters")
    return value


def check_name(value: Any) -> str:
    name = _string(value, "name", 200)
    if not NAME_RE.match(name) or ".." in name.split("/"):
        raise BadInput(f"invalid repository name {name!r}: use letters, digits and ._@+/- "
                       "(not starting with - or .)")
    return name


def check_ref(value: Any) -> str:
    ref = _string(value, "ref", 255)
    if not REF_RE.match(ref) or ref.endswith(".lock"):
        raise BadInput(f"invalid ref {ref!r}")
    return ref


def under_roots(path: Path, roots: Sequence[Path]) -> Path:
    """``path`` with symlinks and ``..`` resolved, if it lies under one of ``roots``."""
    if not roots:
        raise BadInput("local sources are disabled: set REPOINDEX_ROOTS to allow directories")
    resolved = Path(os.path.realpath(path))
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        raise BadInput(f"source {str(path)!r} is outside the allowed roots (REPOINDEX_ROOTS)")
    if not resolved.exists():
        raise BadInput(f"source path does not exist: {str(path)!r}")
    if not resolved.is_dir():
        raise BadInput(f"source path is not a directory: {str(path)!r}")
    return resolved


def check_source(value: Any, roots: Sequence[Path]) -> Source:
    """Accept an absolute path or a https/ssh/git/file URL; refuse everything else."""
    text = _string(value, "source", MAX_SOURCE)
    if text.startswith("-"):
        raise BadInput("source must not start with '-'")
    if text.startswith("/"):
        return Source(text, path=under_roots(Path(text), roots))
    if "::" in text.split("/", 1)[0]:
        raise BadInput(f"git transport {text.split('::', 1)[0]!r}:: is not allowed")
    if SCP_RE.match(text):
        return Source(text, url=text)
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise BadInput("file:// URLs must name a local path")
        return Source(text, path=under_roots(Path(unquote(parts.path) or "/"), roots))
    if scheme in REMOTE_SCHEMES:
        if not parts.hostname or parts.hostname.startswith("-"):
            raise BadInput(f"URL has no valid host: {scheme}://…")
        return Source(text, url=text)
    if scheme:
        raise BadInput(f"URL scheme {scheme!r} is not allowed; use https, ssh, git or file")
    raise BadInput("source must be an absolute path or a https, ssh, git or file URL")


def default_name(source: Source) -> str:
    """The repository name when none is given: the last path component without ``.git``."""
    raw = str(source.path) if source.path else urlsplit(source.text).path or source.text
    tail = raw.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    tail = tail[:-4] if tail.endswith(".git") else tail
    return check_name(re.sub(r"[^A-Za-z0-9._@+-]", "_", tail).lstrip(".-") or "repository")


def index_args(args: Sequence[Any], kwargs: Mapping[str, Any], roots: Sequence[Path]) -> IndexArgs:
    bound = bind_arguments(args, kwargs, ("source", "name", "ref"), required=1)
    source = check_source(bound["source"], roots)
    name = bound.get("name")
    return IndexArgs(
        source=source,
        name=default_name(source) if name is None else check_name(name),
        ref=check_ref(bound.get("ref", "HEAD")),
    )


def delete_args(args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    return check_name(bind_arguments(args, kwargs, ("name",), required=1)["name"])
