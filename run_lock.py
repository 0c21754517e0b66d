"""One writer per run: a lock file per run name, with the owner's pid, host and a heartbeat.

Two runs with the same `{output_dir}/{run_dir}` and run name (`file_prefix`) would overwrite each
other's checkpoints and interleave their metrics. The first takes `{file_prefix}.lock`; a second
stops with one sentence naming it. A lock is stale, and is taken over, when its pid is gone on this
host, or when its heartbeat (refreshed on log steps) is older than `STALE_AFTER` from another host
(a job requeued after a crash usually lands on another node, where the pid cannot be checked).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import utils_cifar

STALE_AFTER = 600.0  # seconds without a heartbeat before another host's lock counts as abandoned


class RunLocked(utils_cifar.UserError):
    """Another live run holds the lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class RunLock:
    """`{run_dir}/{name}.lock`, held by this process from `acquire()` to `release()`.

    The file is JSON: ``{"pid", "host", "started", "heartbeat"}`` (Unix seconds).
    """

    def __init__(self, run_dir: str | os.PathLike, name: str):
        self.path = Path(run_dir) / f"{name}.lock"
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        self.held = False

    def owner(self) -> dict | None:
        """The lock file's record, or None when there is none (an unreadable one counts as stale)."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def is_stale(self, record: dict) -> bool:
        """Whether `record` belongs to no live run (see the module docstring)."""
        if not isinstance(record, dict) or not {"pid", "host", "heartbeat"} <= record.keys():
            return True
        if record["host"] == self.record["host"]:
            return not _pid_alive(int(record["pid"]))
        return time.time() - float(record["heartbeat"]) > STALE_AFTER

    def acquire(self) -> dict | None:
        """Take the lock; return the stale record it replaced (None if there was none).

        Raises RunLocked (one sentence naming the holder) when a live run holds it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        replaced = None
        try:  # O_EXCL: of two runs starting together, exactly one creates the file
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.close(fd)
        except FileExistsError:
            replaced = self.owner() or {}
            if replaced and not self.is_stale(replaced):
                age = time.time() - float(replaced["heartbeat"])
                raise RunLocked(
                    f"{self.path.parent} is in use by another run of {self.path.stem} (pid {replaced['pid']} on "
                    f"{replaced['host']}, last heartbeat {age:.0f} s ago): stop it, or pick another --output_dir "
                    f"(its lock {self.path} counts as abandoned once that pid is gone, or after "
                    f"{STALE_AFTER / 60:.0f} minutes without a heartbeat from another host)."
                )
        self.held = True
        self.heartbeat()
        return replaced

    def heartbeat(self) -> None:
        """Rewrite the lock with the current time (atomically: a reader never sees half a file)."""
        record = {**self.record, "heartbeat": time.time()}
        utils_cifar.atomic_write(self.path, lambda f: f.write(json.dumps(record).encode()))

    def release(self) -> None:
        """Remove the lock if this process still holds it."""
        if self.held and (self.owner() or {}).get("pid") == self.record["pid"]:
            self.path.unlink(missing_ok=True)
        self.held = False
