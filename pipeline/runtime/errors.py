"""The one base class of errors the user can act on, and the exit status each carries.

A `UserError` means bad input, a bad setting or an unusable environment: the CLI prints its
message as one line (it names the file, row or setting and what to do) and exits with
`exit_code`. Every other exception is a bug (or out of memory) and keeps its traceback, exit 1.

A user error is raised as `UserError("what is wrong with which file or setting; what to do")`.
A subclass exists only where code catches that kind by type: `ArtifactError` (an artifact folder
or file that is missing, damaged or of another run: runtime/files.py), `SchemaError` (a table
that breaks its schema: runtime/schemas.py), `TemplateError` (a chat template that cannot render
a conversation: data/chat.py).

Operating-system refusals the user can fix (disk full, read-only output, permission denied, a
missing path) are user errors too: `refusal_from_os_error` turns them into one line naming the
path and what to do.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

# Exit status of a user error (a missing path, a bad setting, a refused output folder, ...).
EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error the user can fix; the message names the input and what to do."""

    exit_code: int = EXIT_USER_ERROR


# errno -> (what happened, what to do); the path goes between them.
_OS_ADVICE: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on device writing", "free space and rerun; finished shards are kept"),
    errno.EDQUOT: ("disk quota exceeded writing", "free space or raise the quota and rerun; finished shards are kept"),
    errno.EROFS: ("read-only file system: cannot write", "choose an output folder on writable storage"),
    errno.EACCES: ("permission denied on", "give this user access to it, or choose another path"),
    errno.EPERM: ("operation not permitted on", "give this user access to it, or choose another path"),
    errno.ENOENT: ("no such file or directory:", "check the path"),
    # An output under a regular file (`--output somefile/out`), or a folder to create where a file is.
    errno.ENOTDIR: ("a file stands where a folder must be:", "choose another path, or move that file away"),
    errno.EEXIST: ("a file stands where a folder must be:", "choose another path, or move that file away"),
}


def refusal_from_os_error(error: OSError, where: str | os.PathLike[str] | None = None) -> UserError | None:
    """A one-line user error for an OS refusal the user can fix (None for any other OSError: a bug).

    The path is the one the error names; an error that names none (pyarrow's writers) is placed
    under `where`, the stage's output folder, when known.
    """
    advice = _OS_ADVICE.get(error.errno) if error.errno is not None else None
    if advice is None:
        return None
    happened, todo = advice
    if error.filename is not None:
        # A rename names its temporary source first: the destination is the path the user knows.
        path = str(error.filename2 if error.filename2 is not None else error.filename)
        if error.errno in (errno.ENOTDIR, errno.EEXIST):
            blocker = _file_in_the_way(Path(path))
            if blocker is None and error.errno == errno.EEXIST:
                return None  # a folder that exists already: our code's to handle, not the user's
            if blocker is not None and str(blocker) != path:
                path = f"{blocker} (in {path})"
    elif where is not None:
        path = f"a file under {where}"
    else:
        path = "a file"
    return UserError(f"{happened} {path}: {todo}")


def _file_in_the_way(path: Path) -> Path | None:
    """The path itself or the nearest folder above it that exists and is not a folder (None: there is none)."""
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return None if candidate.is_dir() else candidate
    return None
