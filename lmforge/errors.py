"""One exception type for mistakes a user can fix.

The CLI turns a `UserError` into one line on stderr and exit code 2 (no traceback); library callers can
catch it. Anything else that escapes is a bug in lmforge and is allowed to show its traceback.
"""


class UserError(ValueError):
    """A problem with the user's input (data, flags, paths), described in one actionable line."""


def one_line(text: object, limit: int = 300) -> str:
    """`text` (an exception, a message from a library) folded onto one line of at most `limit` characters,
    fit to quote inside a UserError."""
    return " ".join(str(text).split())[:limit]
