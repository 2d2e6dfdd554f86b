"""Remove credentials from text that may reach logs, results, Flower or Sentry."""

from __future__ import annotations

import re

# scheme://user:password@host  ->  scheme://user:***@host
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@\s]*(?=@)")
# libpq keyword form: password=secret
_KW_PASSWORD = re.compile(r"(?i)(password\s*=\s*)('[^']*'|\S+)")


def scrub(text: str) -> str:
    """``text`` with URL passwords and ``password=`` values replaced by ``***``."""
    text = _URL_PASSWORD.sub(r"\g<head>***", text)
    return _KW_PASSWORD.sub(r"\1***", text)
