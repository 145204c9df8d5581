"""The one exception type for mistakes a user can make.

A `UserError` carries a message that names the problem *and* the fix. The CLI prints it as a single
line and exits non-zero; library callers can catch it like any other exception.
"""


class UserError(Exception):
    """A bad input the user can fix: missing file, empty corpus, bad config key, corrupt checkpoint."""

    exit_code = 2
    # True where every process of a torchrun job raises the same error (an interrupt reaches them all):
    # rank 0 says it for the run.
    every_process = False


def require(condition: bool, message: str) -> None:
    """Raise `UserError(message)` unless `condition` holds."""
    if not condition:
        raise UserError(message)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a one-line error quotes."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def require_text(text: str, what: str) -> str:
    """`text` when it is valid Unicode; else a UserError naming `what` and the first bad byte.

    Python reads arguments (and, in a C locale, stdin) that are not valid UTF-8 with their bad bytes
    as lone surrogates ("caf\\udce9" for b"caf\\xe9"), which a tokenizer cannot take.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start].encode("utf-8", "surrogateescape") if 0xDC80 <= ord(text[e.start]) <= 0xDCFF else None
        byte = f"byte 0x{bad.hex()}" if bad else f"character U+{ord(text[e.start]):04X}"
        raise UserError(f"{what} is not valid UTF-8 text ({byte} at character {e.start + 1}); "
                        "pass it as UTF-8 (check the terminal's or the file's encoding)") from None
    return text
