"""User-facing errors.

Every error a user can cause (a wrong path, a corrupt file, an out-of-range value) is raised
as a `LmforgeError` whose message is one line saying what was wrong and how to fix it. The
command catches these and prints the message without a traceback; anything else is a bug.
"""


class LmforgeError(Exception):
    """A problem with the user's input, explained in one line."""
