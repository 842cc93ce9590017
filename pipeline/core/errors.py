"""The one base class of errors the user can act on, and the exit status each carries.

A `UserError` means bad input, a bad setting or an unusable environment: the CLI prints its
message as one line (it names the file, row or setting and what to do) and exits with
`exit_code`. Every other exception is a bug (or out of memory) and keeps its traceback, exit 1.
"""

from __future__ import annotations

# Exit status of a user error (a missing path, a bad setting, a refused output folder, ...).
EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error the user can fix; the message names the input and what to do."""

    exit_code: int = EXIT_USER_ERROR
