"""The one exception type for mistakes a user can make.

A `UserError` carries a message that names the problem *and* the fix. The CLI prints it as a single
line and exits non-zero; library callers can catch it like any other exception.
"""


class UserError(Exception):
    """A bad input the user can fix: missing file, empty corpus, bad config key, corrupt checkpoint."""

    exit_code = 2


def require(condition: bool, message: str) -> None:
    """Raise `UserError(message)` unless `condition` holds."""
    if not condition:
        raise UserError(message)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a one-line error quotes."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
