"""User-facing errors: each one says what was wrong and what to do about it."""


class ImgsimError(Exception):
    """A failure the user can fix; the message names the problem and the remedy."""


class BadInput(ImgsimError):
    """A request or file that cannot be used as given (maps to HTTP 400 / INVALID_ARGUMENT)."""
