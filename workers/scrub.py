"""Remove credentials from text that may reach logs, results, Flower or Sentry."""

from __future__ import annotations

import re
from typing import Any

# scheme://userinfo@host: the userinfo runs to the *last* '@' before the path, since a
# password may hold a raw '@' (clients split there too)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<info>[^/?#\s]*)@")
# libpq keyword form: password=secret
_KW_PASSWORD = re.compile(r"(?i)(password\s*=\s*)('[^']*'|\S+)")
# A user name this long is a token (GitHub, GitLab and Bitbucket accept tokens as the user
# of an https URL, alone or with a placeholder password such as x-oauth-basic)
_TOKEN_LENGTH = 16
_WEB_SCHEMES = ("http://", "https://")


def _userinfo(match: re.Match[str]) -> str:
    scheme, info = match["scheme"], match["info"]
    user, colon, _password = info.partition(":")
    web = scheme.lower() in _WEB_SCHEMES
    if web and (not colon or len(user) >= _TOKEN_LENGTH):
        return f"{scheme}***@" if user or colon else match[0]
    return f"{scheme}{user}:***@" if colon else match[0]


def scrub(text: str) -> str:
    """``text`` with URL passwords, https user-name tokens and ``password=`` values
    replaced by ``***``."""
    text = _URL_USERINFO.sub(_userinfo, text)
    return _KW_PASSWORD.sub(r"\1***", text)


def scrub_value(value: Any) -> Any:
    """``value`` (JSON-shaped: strings, lists, dicts) with every string scrubbed."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, list | tuple):
        return type(value)(scrub_value(v) for v in value)
    if isinstance(value, dict):
        return {k: scrub_value(v) for k, v in value.items()}
    return value
