"""``UserError``: a mistake the user can fix (a wrong argument, a missing file, a broken install).

Command-line entry points print its message as one line and exit non-zero instead of showing a traceback; library
callers get an ordinary exception. Its message says what is wrong and what to do.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake or a broken environment that the user can fix; the message says how."""
