"""The one place that hides credentials in text: every message, log line and URL tyr shows goes through ``redact``."""

from __future__ import annotations

import re

# Everything between '://' and the last '@' of the URL, whatever it holds: secret keys carry '/', '+', ':' and '@'.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^\s'\"<>]*@")


def redact(text: str) -> str:
    """``text`` with the user info of every URL in it (``s3://key:secret@bucket``) replaced by ``***``."""
    return _USERINFO.sub(r"\g<scheme>***@", str(text))


def has_userinfo(url: str | None) -> bool:
    """Whether ``url`` carries credentials (``scheme://user:password@host``)."""
    return bool(url) and redact(url) != url


def without_userinfo(url: str | None) -> str | None:
    """A URL safe to print: without its user info (``http://user:secret@host`` -> ``http://host``)."""
    if not url:
        return url
    return _USERINFO.sub(r"\g<scheme>", url)
