"""One writer per run: `{run_dir}/{name}.lock`, taken atomically, kept fresh by a heartbeat thread.

Two runs with the same `{output_dir}/{run_dir}` and run name (`file_prefix`) would overwrite each
other's checkpoints and interleave their metrics. Launches race on a cluster (a job array, a retried
`srun`, a requeue), so every step that changes who holds the lock is atomic:

    take      the record (pid, host, token, heartbeat) is written to a temp file, then hard-linked to
              the lock name: `link` fails if the name exists, so the lock appears with its full record
              in one step and of racing runs exactly one links it. On NFS a lost reply can report a
              link that happened as failed, so the temp file's link count (2 if it did) decides.
    stale     a lock whose pid is gone on this host, or whose heartbeat is older than the stale limit
              from another host (where its pid cannot be checked). An empty or unreadable lock (not
              one this module writes) counts as live while younger than a grace period.
    take over the stale lock is renamed aside (atomic: of two takers exactly one moves it) and
              compared with what was judged stale; a taker that moved something else (a lock another
              taker just linked) links it back. Then the taker links its own record as above.
    heartbeat a daemon thread rewrites the record every `heartbeat_every` seconds from `acquire()` to
              `release()`, whatever the training loop is doing, after checking the token is still
              this run's. If not, the run has lost the lock: `lost` is set, `verify()` is False and
              the caller writes nothing more.

What a shared file system must give: atomic `link`, `rename` and `replace` within one folder (POSIX
local file systems, NFS, Lustre and GPFS all do) and clocks in step across hosts to well within the
stale limit. NFS caches directory attributes for up to 60 s, hence a default limit of 5 minutes.

The stale limit comes from ``$CFM_LOCK_STALE_AFTER`` (seconds). Torch-free (see errors.py).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from cfm.io.atomic_files import HOST, atomic_write, pid_alive, temp_file
from cfm.io.errors import SaveError, UserError, writing

STALE_ENV = "CFM_LOCK_STALE_AFTER"
DEFAULT_STALE_AFTER = 300.0  # seconds without a heartbeat before another host's lock counts as abandoned


class RunLocked(UserError):
    """Another live run holds the lock."""


class LockLost(UserError):
    """Another run took this run's lock over (it judged this run dead): this run writes nothing more."""


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


class RunLock:
    """`{run_dir}/{name}.lock`, held by this process from `acquire()` to `release()`.

    The file is JSON: ``{"pid", "host", "token", "started", "heartbeat"}`` (Unix seconds). `token`
    tells this run's record from any other, even one of the same pid on another host.
    """

    def __init__(self, run_dir: str | os.PathLike, name: str, stale_after: float | None = None):
        self.path = Path(run_dir) / f"{name}.lock"
        self.stale_after = stale_after_setting() if stale_after is None else stale_after
        # A few beats per stale limit, so that one slow write never makes a live run look dead.
        self.heartbeat_every = min(15.0, self.stale_after / 6)
        self.grace = min(60.0, self.stale_after)  # for an empty or unreadable lock file
        self.token = uuid.uuid4().hex
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "token": self.token, "started": time.time()}
        self.held = False
        self.lost = False  # set when a heartbeat or `verify()` finds another run's record
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- reading and judging

    def read(self) -> tuple[bytes, float] | None:
        """The lock file's bytes and modification time, or None when there is no lock."""
        try:
            with open(self.path, "rb") as f:
                return f.read(), os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None

    @staticmethod
    def parse(raw: bytes) -> dict | None:
        """The record in a lock file's bytes, or None if they are not one."""
        try:
            record = json.loads(raw)
        except ValueError:
            return None
        keys = {"pid", "host", "heartbeat"}  # and "token", absent from records of older versions
        return record if isinstance(record, dict) and keys <= record.keys() else None

    def owner(self) -> dict | None:
        """The current lock record (None when there is no lock or it is unreadable)."""
        found = self.read()
        return self.parse(found[0]) if found is not None else None

    def is_stale(self, raw: bytes, mtime: float) -> bool:
        """Whether the lock file holding `raw` belongs to no live run (see the module docstring)."""
        record = self.parse(raw)
        if record is None:  # not written by this module's link (an older version, a hand edit)
            return time.time() - mtime > self.grace
        if record["host"] == self.record["host"]:
            return not pid_alive(int(record["pid"]))
        return time.time() - float(record["heartbeat"]) > self.stale_after

    def describe(self, raw: bytes, mtime: float) -> str:
        """Who holds the lock, for a message: "pid 12 on node3, last heartbeat 20 s ago"."""
        record = self.parse(raw)
        if record is None:
            return f"an unreadable record written {time.time() - mtime:.0f} s ago"
        return (f"pid {record['pid']} on {record['host']}, last heartbeat "
                f"{time.time() - float(record['heartbeat']):.0f} s ago")

    # ---------------------------------------------------------------- taking and keeping

    def _link_new(self) -> bool:
        """Create the lock with this run's full record in one step; False if the name exists."""
        with writing(self.path):
            fd, tmp = temp_file(self.path)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(json.dumps({**self.record, "heartbeat": time.time()}).encode())
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, self.path)
                    return True
                except OSError as err:  # on NFS, a link that happened can still report an error
                    if os.stat(tmp).st_nlink == 2:
                        return True
                    if isinstance(err, FileExistsError):
                        return False
                    raise
            finally:
                tmp.unlink(missing_ok=True)

    def _remove_stale(self, judged: bytes) -> None:
        """Remove the lock file if it still holds `judged` (the bytes judged stale); atomic against
        other takers (see the module docstring)."""
        # Named like a temp file, so that one a kill leaves here is removed with the run's temp files.
        aside = self.path.with_name(f".{self.path.name}.{HOST}.{os.getpid()}.aside{self.token}.tmp")
        try:
            os.rename(self.path, aside)  # of two takers, exactly one moves the file
        except FileNotFoundError:
            return  # another taker removed it first
        try:
            if aside.read_bytes() != judged:  # another taker's fresh lock: put it back
                try:
                    os.link(aside, self.path)
                except FileExistsError:  # a third run linked its own meanwhile; the displaced run sees
                    pass  # at its next heartbeat that it no longer holds the lock, and stops writing
        finally:
            aside.unlink(missing_ok=True)

    def acquire(self, wait: bool = False, poll: float | None = None) -> dict | None:
        """Take the lock and start the heartbeat thread; return the stale record replaced (None if
        there was none, {} for an unreadable one).

        A live lock raises RunLocked (one sentence naming the holder). With `wait`, a live lock of
        another host is waited out instead (one line says so) until it is released or stale: a
        requeued job on another node then continues the run. A full disk raises SaveError.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        poll = max(0.1, min(5.0, self.stale_after / 20)) if poll is None else poll
        replaced, announced = None, False
        while not self._link_new():
            found = self.read()
            if found is None:
                continue  # released (or moved aside by a taker) since the link failed: try again
            raw, mtime = found
            if self.is_stale(raw, mtime):
                replaced = self.parse(raw) or {}
                self._remove_stale(raw)
                continue
            record = self.parse(raw)
            foreign = record is not None and record["host"] != self.record["host"]
            if not (wait and foreign):
                raise RunLocked(
                    f"{self.path.parent} is in use by another run of {self.path.stem} ({self.describe(raw, mtime)}): "
                    f"stop it, or pick another --output_dir (its lock {self.path} counts as abandoned once that "
                    f"pid is gone, or after {self.stale_after:.0f} s without a heartbeat from another host; with "
                    f"--resume=auto a run from another host waits for that)."
                )
            if not announced:
                print(f"waiting for {self.path}: held by {self.describe(raw, mtime)}; this run takes over once it is "
                      f"released or has had no heartbeat for {self.stale_after:.0f} s (${STALE_ENV}).",
                      file=sys.stderr, flush=True)
                announced = True
            time.sleep(poll)
        self.held = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat {self.path.name}", daemon=True)
        self._thread.start()
        return replaced

    def verify(self) -> bool:
        """Whether this run still holds the lock (reads the file); a False sets `lost`.

        A missing lock file (moved aside for a moment by a taker checking it, or deleted by hand) is
        taken back if it is still free."""
        if self.held and not self.lost:
            for _ in range(2):
                found = self.read()
                if found is not None:
                    record = self.parse(found[0])
                    self.lost = record is None or record.get("token") != self.token
                    break
                if self._link_new():
                    break
            else:
                self.lost = True
        return self.held and not self.lost

    def heartbeat(self) -> bool:
        """Rewrite the record with the current time if this run still holds the lock; False (and
        `lost` set) if another run has taken it. A failed write raises SaveError."""
        if not self.verify():
            return False
        record = {**self.record, "heartbeat": time.time()}
        with writing(self.path):
            atomic_write(self.path, lambda f: f.write(json.dumps(record).encode()))
        return True

    def _beat(self) -> None:
        """The heartbeat thread: beat until released or lost; a failed write is reported, not fatal
        (the next beat may succeed, and the stale limit allows several missed beats)."""
        while not self._stop.wait(self.heartbeat_every):
            try:
                if not self.heartbeat():
                    print(f"error: {self.lost_message()}", file=sys.stderr, flush=True)
                    return
            except SaveError as err:
                print(f"warning: heartbeat of {self.path} failed: {err}", file=sys.stderr, flush=True)

    def lost_message(self) -> str:
        """The sentence a run that lost its lock stops with."""
        found = self.read()
        holder = self.describe(*found) if found is not None else "nobody now"
        return (f"another run took over {self.path} ({holder}), judging this one dead (no heartbeat for "
                f"{self.stale_after:.0f} s, ${STALE_ENV}): this run stops and writes nothing more; its last "
                f"checkpoint stays for the run that holds the lock.")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if this run still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.held and self.verify():
            self.path.unlink(missing_ok=True)
        self.held = False
