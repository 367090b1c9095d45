"""User-facing errors: each one says what was wrong and what to do about it."""

import re


class ImgsimError(Exception):
    """A failure the user can fix; the message names the problem and the remedy."""


class BadInput(ImgsimError):
    """A request or file that cannot be used as given (maps to HTTP 400 / INVALID_ARGUMENT)."""


# scheme://user:password@host -> scheme://host: MLflow accepts credentials inside a tracking URI, and an error
# message or log line must never carry them.
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s'\"]*@")  # to the last @: a password may hold one


def redact(text: str) -> str:
    """``text`` with the ``user:password@`` part of every URI in it removed."""
    return _USERINFO.sub(r"\g<scheme>", text)
