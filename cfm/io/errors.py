"""The errors a user can cause and fix, each one sentence that the scripts print without a traceback.

Torch-free, like `atomic_files.py` and `run_lock.py`, so that tests can start many cheap processes
that take run locks.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


class UserError(RuntimeError):
    """A problem the user can fix (bad flag, missing file, offline download): its message is one
    sentence naming the fix, printed without a traceback by the scripts."""


class SaveError(UserError):
    """A file could not be written (disk full, read-only folder, permissions): `path`, and the
    operating system's `reason` (e.g. "No space left on device")."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"cannot write {path} ({reason}): free disk space or make its folder writable, and run again.")
        self.path, self.reason = Path(path), reason


def os_error_in(err: BaseException) -> OSError | None:
    """The OSError that caused `err`, if any: `err` itself or one it was raised from or while
    handling (torch.save, say, reports a failed write as a RuntimeError raised from it)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def writing(path: str | os.PathLike):
    """Turn a failed write of `path` into a `SaveError`: one sentence naming the file and the cause
    (a full disk otherwise surfaces as tens of lines of chained tracebacks). Other errors pass."""
    try:
        yield
    except Exception as err:
        cause = os_error_in(err)
        if cause is None:
            raise
        raise SaveError(path, cause.strerror or str(cause) or type(cause).__name__) from err
