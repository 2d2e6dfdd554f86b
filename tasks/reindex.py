"""Which way a re-index goes: nothing to do, the commits' diff, or the whole tree.

The stored index records its commit, its source and what decided its rows (the size
limit, the file-count limit, the classifier's version). The same commit under the same
decisions has nothing to read (``unchanged``). A commit whose stored predecessor is its
ancestor in the same source is applied as ``git diff-tree old new`` (``delta``): work in
proportion to the change. Everything else reads the whole tree (``full``): the first
index, changed decisions, another source, a stored commit that is missing (a shallow
clone, a pruned force-push) or not an ancestor (a force-push). Both ways write the same
rows and report the same counts (tests/test_reindex.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.classify import version
from tasks.git import Git
from tasks.gitdiff import ancestry
from workers.settings import Settings

UNCHANGED, DELTA, FULL = "unchanged", "delta", "full"
_NAMES = {"max_file_bytes": "REPOINDEX_MAX_FILE_BYTES", "max_files": "REPOINDEX_MAX_FILES",
          "classifier": "the classifier"}


@dataclass(frozen=True)
class Plan:
    strategy: str  # UNCHANGED, DELTA or FULL
    reason: str


def decided(settings: Settings) -> dict[str, Any]:
    """What decides the rows of an index besides the commit, as the index records it."""
    return {"max_file_bytes": settings.max_file_bytes, "max_files": settings.max_files,
            "classifier": version()}


def plan(git: Git, before: dict[str, Any] | None, commit: str, source: str,
         now: dict[str, Any]) -> Plan:
    if before is None or before["commit"] is None:
        return Plan(FULL, "first index")
    if before["classifier"] is None:
        return Plan(FULL, "the stored index does not record what decided it")
    changed = [_NAMES[k] for k, v in now.items() if before[k] != v]
    if changed:
        return Plan(FULL, f"{' and '.join(changed)} changed since the stored index")
    old = before["commit"]
    if old == commit:
        return Plan(UNCHANGED, "the stored index is of this commit")
    if before["source"] != source:
        return Plan(FULL, "the stored index is of another source")
    how = ancestry(git, old, commit)
    if how == "ancestor":
        return Plan(DELTA, f"the changes since {old[:12]}")
    if how == "missing":
        return Plan(FULL, f"the stored commit {old[:12]} is missing from the repository")
    return Plan(FULL, f"the stored commit {old[:12]} is not an ancestor of {commit[:12]}")
