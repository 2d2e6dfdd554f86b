"""Search answers exactly what ``git grep -n`` answers (issue 13), through the trigram index
of the stored lines.

A generated repository full of traps is indexed by the session's real worker; for every
pattern of the table the (path, line) set equals what ``git grep`` says on the same
commit, which the test runs itself.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devtools.launcher import WorkerProcess
from tasks import search as searching
from tests import gitrepo
from tests.conftest import run

REPO = "grep-traps"
LONG_LINE = "x" * 19_950 + " needle-at-the-end()"


def traps(repo: Path) -> None:
    gitrepo.init(repo)
    files = {
        "lib/mod.py": "import os\nimport sys\nx = 1  # import os here\n\ndef f(a):\n"
                      "    return (a)\n#comment\n    # indented comment\ndef g():\n"
                      "    pass\n",
        "lib/a/test_one.py": "def test_a():\n    assert True\n\n\nimport os\n",
        "lib/b/c/test_two.py": "def test_b(): pass\nclass T:\n    def m(self): return 1\n",
        "lib/test_top.py": "import os\n",
        "src/main.c": "int main(void) {\n    return 0;\n}\n/* import os */\n",
        "src/no_newline.txt": "last line without newline)",
        "docs/readme.md": "# Title\n\nHello world\nHELLO WORLD\nhello World\nhElLo\n",
        "docs/crlf.txt": "first line)\r\nsecond (line)\r\n\r\nimport os\r\n",
        "docs/long.txt": "short\n" + LONG_LINE + "\nafter\n",
        "docs/unicode.md": "naïve café\n日本語のテキスト\nČeština ěšč\nemoji 🙂 here\n",
        "data/tabs.tsv": "a\tb\tc\n1\t2\t3\n",
        "data/digits.txt": "abc123\nno digits\n42\n007 bond\n",
        "empty.txt": "",
        "only_newlines.txt": "\n\n\n",
        "Makefile": "all:\n\tcc -o x x.c\n",
    }
    for path, text in files.items():
        gitrepo.write(repo / path, text)
    gitrepo.write(repo / "docs/latin1.txt", "caf\xe9 cr\xe8me\nplain ascii\n".encode("latin-1"))
    gitrepo.commit(repo, "traps")


@pytest.fixture(scope="module")
def indexed(worker: WorkerProcess, celery_app: Any, roots: Path) -> Path:
    repo = roots / REPO
    traps(repo)
    job = run(celery_app, "repoindex.index_repository", source=str(repo), name=REPO)
    assert job.state == "SUCCESS", job.result
    return repo


def git_grep(repo: Path, pattern: str, *, regex: bool, ignore_case: bool,
             pathspecs: list[str]) -> set[tuple[str, int]]:
    argv = ["git", "-C", str(repo), "grep", "-n", "-z", "-I", "--no-color",
            "-E" if regex else "-F"]
    if ignore_case:
        argv.append("-i")
    done = subprocess.run([*argv, "-e", pattern, "HEAD", "--", *pathspecs], capture_output=True,
                          env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"}, check=False)
    assert done.returncode in (0, 1), done.stderr
    found = set()
    for record in done.stdout.split(b"\n"):
        if record:
            name, number, _ = record.split(b"\0", 2)
            path = name.decode().removeprefix("HEAD:")
            # git 2.39 reports a pattern that matches the empty string (``^$``) once more
            # on a phantom line after a file's final newline; ``git grep -c`` and every
            # other pattern agree that line does not exist, and so does repoindex
            if int(number) <= line_count(repo, path):
                found.add((path, int(number)))
    return found


def line_count(repo: Path, path: str) -> int:
    data = subprocess.run(["git", "-C", str(repo), "show", f"HEAD:{path}"], capture_output=True,
                          check=True).stdout
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def pathspec(glob: str) -> str:
    return f":(glob){glob}" if "/" in glob else f":(glob)**/{glob}"


# (pattern, regex, ignore case, path globs)
PATTERNS: list[tuple[str, bool, bool, tuple[str, ...]]] = [
    ("import os", False, False, ()), ("import", False, False, ()), ("os", False, False, ()),
    ("(a)", False, False, ()), ("a)", False, False, ()), ("%", False, False, ()),
    ("_", False, False, ()), ("\\", False, False, ()), ("def", False, False, ()),
    ("needle-at-the-end()", False, False, ()), ("café", False, False, ()),
    ("caf", False, False, ()), ("日本語", False, False, ()), ("🙂", False, False, ()),
    ("\t", False, False, ()), ("hello", False, True, ()), ("HELLO WORLD", False, True, ()),
    ("Hello", False, False, ()), ("IMPORT OS", False, True, ()), ("line)", False, False, ()),
    ("^import os$", True, False, ()), ("^def ", True, False, ()), ("\\)$", True, False, ()),
    ("^#", True, False, ()), ("^$", True, False, ()), ("^.*$", True, False, ()),
    ("[^x]", True, False, ()), ("^[0-9]+$", True, False, ()), ("[0-9]{3}", True, False, ()),
    ("(test_a|test_b)", True, False, ()), ("return (0|1)", True, False, ()),
    ("^\\s+#", True, False, ()), ("o.s", True, False, ()), ("^hello", True, True, ()),
    ("world$", True, True, ()), ("^(import|def) ", True, False, ()), ("x{100}", True, False, ()),
    ("end\\(\\)$", True, False, ()), ("^first", True, False, ()), (")\r$", False, False, ()),
    ("import os", False, False, ("*.py",)), ("def", False, False, ("lib/**/test_*",)),
    ("import", False, False, ("*.py", "*.c")), ("^import os", True, False, ("docs/*",)),
    ("o", False, False, ("lib/*",)), ("a", False, True, ("[dm]*/*.md",)),
]


@pytest.mark.parametrize(("pattern", "regex", "ignore_case", "globs"), PATTERNS,
                         ids=[repr(p[0]) + ("-E" if p[1] else "-F") + ("i" if p[2] else "")
                              + ("".join(p[3])) for p in PATTERNS])
def test_search_equals_git_grep(indexed: Path, db: psycopg.Connection[Any], pattern: str,
                                regex: bool, ignore_case: bool, globs: tuple[str, ...]) -> None:
    found = searching.search(db, pattern, repo=REPO, regex=regex, ignore_case=ignore_case,
                             paths=globs, limit=searching.MAX_LIMIT)
    expected = git_grep(indexed, pattern, regex=regex, ignore_case=ignore_case,
                        pathspecs=[pathspec(g) for g in globs])
    assert {(m.path, m.line) for m in found} == expected
    assert not found.truncated


def test_columns_equal_git_grep_and_long_lines_come_back_as_a_window(
        indexed: Path, db: psycopg.Connection[Any]) -> None:
    done = subprocess.run(["git", "-C", str(indexed), "grep", "-n", "-z", "--column", "-F",
                           "-e", "os", "HEAD"], capture_output=True, text=True, check=True)
    columns = {}
    for record in done.stdout.splitlines():
        name, line, column, text = record.split("\0", 3)
        if text.isascii():
            columns[(name.removeprefix("HEAD:"), int(line))] = int(column)
    found = {(m.path, m.line): m for m in searching.search(db, "os", repo=REPO, limit=1000)}
    assert columns and {k: found[k].column for k in columns} == columns
    (long,) = searching.search(db, "needle-at-the-end", repo=REPO)
    assert long.cut and len(long.text) == searching.WIDTH
    assert long.column == 19_952 and "needle-at-the-end()" in long.text
    assert long.text == LONG_LINE[long.offset - 1:long.offset - 1 + searching.WIDTH]


def test_context_lines_and_filters_by_language(indexed: Path,
                                               db: psycopg.Connection[Any]) -> None:
    (hit,) = searching.search(db, "return (a)", repo=REPO, context=2)
    assert (hit.path, hit.line, hit.before, hit.after) == \
        ("lib/mod.py", 6, ["", "def f(a):"], ["#comment", "    # indented comment"])
    (first,) = searching.search(db, "^import sys", repo=REPO, regex=True, context=3)
    assert first.before == ["import os"] and len(first.after) == 3
    python = {m.path for m in searching.search(db, "import", repo=REPO, langs=["python"])}
    assert python == {"lib/mod.py", "lib/a/test_one.py", "lib/test_top.py"}


def test_limit_and_truncation(indexed: Path, db: psycopg.Connection[Any]) -> None:
    every = searching.search(db, "o", repo=REPO, limit=searching.MAX_LIMIT)
    cut = searching.search(db, "o", repo=REPO, limit=3)
    assert not every.truncated and cut.truncated and list(cut) == list(every)[:3]
    exact = searching.search(db, "o", repo=REPO, limit=len(every))
    assert not exact.truncated and len(exact) == len(every)
    with pytest.raises(searching.BadInput, match="limit must be 1 to 1000000"):
        searching.search(db, "o", limit=searching.MAX_LIMIT + 1)


def test_the_trigram_index_answers_with_statistics_the_product_kept(
        worker: WorkerProcess, celery_app: Any, roots: Path, db: psycopg.Connection[Any]) -> None:
    """With autovacuum off for the tables, the product's own ANALYZE (after operations that
    change many rows) gives the planner what it needs to use ``lines_trgm``."""
    for table in ("blobs", "lines", "files", "repositories"):
        db.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false,"
                   " toast.autovacuum_enabled = false)")
    repo = roots / "trgm-plan"
    gitrepo.generated(repo, files=3000)
    job = run(celery_app, "repoindex.index_repository", source=str(repo), name="trgm-plan")
    assert job.state == "SUCCESS", job.result
    stats = db.execute("SELECT relname, last_analyze IS NOT NULL, last_autoanalyze IS NULL"
                       " FROM pg_stat_user_tables WHERE relname IN ('blobs', 'files', 'lines')"
                       " ORDER BY 1").fetchall()
    assert stats == [("blobs", True, True), ("files", True, True), ("lines", True, True)]
    for pattern, regex, ignore_case in [("zebra-quokka", False, False),
                                        ("ZEBRA-quokka", False, True),
                                        ("^the zebra.*here$", True, False),
                                        ("quokka-[0-9]+", True, True)]:
        plan = searching.explain(db, pattern, regex=regex, ignore_case=ignore_case)
        assert "lines_trgm" in plan, plan
    assert [m.path for m in searching.search(db, "zebra-quokka", repo="trgm-plan")] == \
        ["marker/found.txt"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    import os
    import sys

    return subprocess.run([sys.executable, "-m", "cli", "search", *args], capture_output=True,
                          text=True, env=dict(os.environ), timeout=60, check=False)


def test_cli_exit_statuses_and_truncation_notice(indexed: Path) -> None:
    """grep's statuses: 0 matches, 1 none (nothing on stdout), 2 bad input; and 4 when the
    result was cut at --limit, said on stderr."""
    found = _cli("import os", "--repo", REPO, "--path", "*.py")
    assert found.returncode == 0 and found.stderr == ""
    assert found.stdout.splitlines()[0] == f"{REPO}:lib/a/test_one.py:5: import os"
    none = _cli("zzyzx_no_such_string", "--repo", REPO)
    assert (none.returncode, none.stdout) == (1, "")
    assert _cli("zzyzx_no_such_string", "--repo", REPO, "--json").stdout.strip() == "[]"
    bad = _cli("(unclosed", "--regex")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "Error: invalid regular expression: parentheses () not balanced"
    cut = _cli("o", "--repo", REPO, "--limit", "2", "--json")
    assert cut.returncode == 4 and len(json.loads(cut.stdout)) == 2
    assert "showing the first 2 matches; more exist" in cut.stderr
    context = _cli("return (a)", "--repo", REPO, "-C", "1")
    assert context.stdout.splitlines() == [f"{REPO}:lib/mod.py-5- def f(a):",
                                           f"{REPO}:lib/mod.py:6:     return (a)",
                                           f"{REPO}:lib/mod.py-7- #comment"]
