"""One exception type for mistakes a user can fix.

The CLI turns a `UserError` into one line on stderr and exit code 2 (no traceback); library callers can
catch it. Anything else that escapes is a bug in lmforge and is allowed to show its traceback.
"""


class UserError(ValueError):
    """A problem with the user's input (data, flags, paths), described in one actionable line."""
