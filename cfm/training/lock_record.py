"""What a run lock's files hold and how a reader judges them (see run_lock.py for the protocol).

A record is JSON, ``{"pid", "host", "token", "started"}``, written once; its file's mtime is the
heartbeat. A record unlike any a run writes (a hand edit, a wrong type) is one sentence, never a
traceback. The stale limit is a setting of the environment, ``$CFM_LOCK_STALE_AFTER``. `flocked`
tells whether a holder on this kernel lives whatever its pid namespace. Torch-free (see errors.py).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cfm.io.errors import UserError

STALE_ENV = "CFM_LOCK_STALE_AFTER"
DEFAULT_STALE_AFTER = 300.0  # seconds without a heartbeat before another host's lock counts as abandoned


def stale_after_setting() -> float:
    """The stale limit in seconds: ``$CFM_LOCK_STALE_AFTER``, else `DEFAULT_STALE_AFTER`."""
    value = os.environ.get(STALE_ENV, "")
    if not value:
        return DEFAULT_STALE_AFTER
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UserError(f"${STALE_ENV}={value!r} is not a positive number of seconds: set it to, say, 300.")
    return seconds


def lock_names(path: Path) -> dict[int, Path]:
    """The generations of lock `path` present in its folder: generation -> path (`{name}.lock` is
    generation 0, `{name}.lock.N` generation N)."""
    pattern = re.compile(re.escape(path.name) + r"(?:\.([1-9][0-9]*))?")
    try:
        names = [entry.name for entry in os.scandir(path.parent)]
    except FileNotFoundError:
        return {}
    matches = (pattern.fullmatch(name) for name in names)
    return {int(m.group(1) or 0): path.parent / m.group(0) for m in matches if m}


def flocked(path: Path) -> bool:
    """Whether some process holds a flock on `path` (a live holder, in any pid namespace of this
    kernel); False when that cannot be told (no such file, no flock support)."""
    try:
        with open(path, "rb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
    except OSError:
        return False
    return False  # taken, and released as the file closed: nobody holds it


def record_problem(record: dict) -> str | None:
    """What makes a JSON object unlike any record a run writes (a hand edit), or None."""
    pid, host = record.get("pid"), record.get("host")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return f"its pid {pid!r} is not a whole number" if "pid" in record else "it names no pid"
    if not isinstance(host, str) or not host:
        return f"its host {host!r} is not a name" if "host" in record else "it names no host"
    if not isinstance(record.get("token", ""), str):
        return f"its token {record['token']!r} is not a string"
    for key in ("started", "heartbeat"):  # "heartbeat": written by older versions
        if key in record and (not isinstance(record[key], (int, float)) or isinstance(record[key], bool)):
            return f"its {key} {record[key]!r} is not a number"
    return None


def parse_record(raw: bytes, path: Path, name: str) -> dict | None:
    """The record in the bytes of lock file `path` of run `name`, or None if they are not JSON (an
    older version's empty lock, a torn write). A JSON value unlike any record a run writes (a hand
    edit) is a UserError: one sentence, before the run writes anything."""
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    problem = record_problem(record) if isinstance(record, dict) else "it is not a JSON object"
    if problem is not None:
        raise UserError(f"{path} holds a lock record that no run of this program wrote ({problem}): "
                        f"if no run of {name} is alive, delete it and run again.")
    return record


@dataclass(frozen=True)
class Found:
    """One lock name as read: its path and generation, bytes, record (None: not JSON) and stat."""

    path: Path
    generation: int
    raw: bytes
    record: dict | None
    stat: os.stat_result

    def is_file(self, stat: os.stat_result) -> bool:
        return (stat.st_dev, stat.st_ino) == (self.stat.st_dev, self.stat.st_ino)
