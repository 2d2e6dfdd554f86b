"""Argument and source validation, including property-based tests of the validator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks import validate
from workers.errors import BadInput

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=50), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(args=st.lists(JSON, max_size=5), kwargs=st.dictionaries(st.text(max_size=12), JSON,
                                                               max_size=5))
def test_validator_accepts_or_refuses_clearly(args: list[Any], kwargs: dict[str, Any]) -> None:
    """Any JSON argument shape either validates or raises BadInput with a one-line message."""
    try:
        parsed = validate.index_args(args, kwargs, [Path("/nonexistent-root")])
    except BadInput as exc:
        assert str(exc) and "\n" not in str(exc)
    else:  # only well-formed remote URLs can pass with a root that does not exist
        assert parsed.source.url is not None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_string_source_is_classified_or_refused(text: str) -> None:
    try:
        source = validate.check_source(text, [Path("/nonexistent-root")])
    except BadInput as exc:
        assert "\n" not in str(exc)
    else:
        assert source.url is not None and not text.startswith("-")
        assert "::" not in text.split("/", 1)[0]


@pytest.mark.parametrize("url", [
    "https://github.com/org/repo.git", "ssh://git@host/repo.git", "git://host/repo",
    "git@github.com:org/repo.git",
])
def test_allowed_urls(url: str) -> None:
    assert validate.check_source(url, []).url == url


@pytest.mark.parametrize(("url", "message"), [
    ("ext::sh -c id", "transport 'ext'"), ("fd::17", "transport 'fd'"),
    ("-uhttps://x", "must not start with '-'"), ("http://host/repo", "scheme 'http'"),
    ("https://-oProxyCommand=x/repo", "no valid host"), ("file://otherhost/x", "local path"),
    ("https://host/a\nb", "control characters"), ("", "1 to 4096"),
])
def test_refused_urls(url: str, message: str) -> None:
    with pytest.raises(BadInput, match=message):
        validate.check_source(url, [])


def test_local_paths_need_roots_and_resolve_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "repo").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "escape").symlink_to(tmp_path / "outside")
    (root / "file").write_text("x")
    assert validate.check_source(str(root / "repo"), [root]).path == root / "repo"
    assert validate.check_source(f"file://{root}/repo", [root]).path == root / "repo"
    with pytest.raises(BadInput, match="local sources are disabled"):
        validate.check_source(str(root / "repo"), [])
    with pytest.raises(BadInput, match="outside the allowed roots"):
        validate.check_source(str(root / "escape"), [root])
    with pytest.raises(BadInput, match="outside the allowed roots"):
        validate.check_source(str(root / "repo/../../outside"), [root])
    with pytest.raises(BadInput, match="not a directory"):
        validate.check_source(str(root / "file"), [root])


@pytest.mark.parametrize("ref", ["HEAD", "main", "v1.2.3", "feature/x", "a" * 40, "HEAD~2"])
def test_good_refs(ref: str) -> None:
    if "~" in ref:
        with pytest.raises(BadInput):
            validate.check_ref(ref)
    else:
        assert validate.check_ref(ref) == ref


@pytest.mark.parametrize("ref", ["-x", "--upload-pack=y", "a..b", "x.lock", "a b", "a:b",
                                 "@{1}", "x/", "x.", 7])
def test_bad_refs(ref: Any) -> None:
    with pytest.raises(BadInput):
        validate.check_ref(ref)


@pytest.mark.parametrize(("source", "name"), [
    ("https://host/org/My.Repo.git", "My.Repo"), ("git@host:org/r.git", "r"),
    ("https://host/", "repository"), ("https://host/org/-x", "x"),
])
def test_default_names(source: str, name: str) -> None:
    assert validate.default_name(validate.check_source(source, [])) == name


def test_bind_arguments_errors() -> None:
    with pytest.raises(BadInput, match="too many positional"):
        validate.bind_arguments([1, 2, 3, 4], {}, ("a", "b", "c"), 1)
    with pytest.raises(BadInput, match="given twice"):
        validate.bind_arguments([1], {"a": 1}, ("a",), 1)
    with pytest.raises(BadInput, match="JSON list and a JSON object"):
        validate.bind_arguments([], [], ("a",), 0)  # type: ignore[arg-type]
    assert validate.delete_args(["demo"], {}) == "demo"
    with pytest.raises(BadInput, match="invalid repository name"):
        validate.delete_args([], {"name": "a/../b"})
