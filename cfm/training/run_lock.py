"""One writer per run: `{run_dir}/{name}.lock` and its numbered successors, kept fresh by a heartbeat.

Two runs with the same `{output_dir}/{run_dir}` and run name (`file_prefix`) would overwrite each
other's checkpoints and interleave their metrics. Launches race on a cluster (a job array, a retried
`srun`, a requeue), and a holder can stall (an NFS hiccup, a suspended VM) and wake after another
run took its place, so the lock is built from steps that are atomic on their own:

    record     this run's pid, host and token, written once to a file of its own beside the lock
               (`.{name}.lock.{host}.{pid}.XXXXXXXX.tmp`), kept open (and flock'ed) until release.
               Nothing ever writes to a lock name after the link below.
    names      generation 0 is `{name}.lock`, generation N is `{name}.lock.N`; the highest present
               is the lock. This run *owns* the run while the name it linked is its record (same
               st_dev and st_ino) and no higher generation exists.
    take       with no lock present, link the record to `{name}.lock`: `link` fails if the name
               exists, so the lock appears with its full record in one step and of racing launches
               exactly one links it. On NFS a lost reply can report a link that happened as failed,
               so the name is then checked for being this run's file.
    heartbeat  a daemon thread touches the record's mtime (`os.utime` on the open descriptor) every
               `heartbeat_every` seconds. A holder that was taken over touches only its own file,
               never the new holder's. Each beat also checks ownership.
    stale      judged on the highest generation: on this host, its pid is gone and no process holds
               a flock on it; from another host, its mtime is older than the stale limit. A record
               that is not JSON (an older version's empty lock) counts as live for a grace period.
    take over  link the record to generation N+1 of a stale generation N: exclusive, so of racing
               takers exactly one succeeds, and the live lock name is never moved or missing. The
               taker then checks that generation N still is the file it judged stale (a launch may
               have taken a released lock meanwhile; then it withdraws) and removes the generations
               below its own.
    settle     a new holder writes nothing until a `verify()` after `settle` seconds, longer than
               one takeover step, so a taker that raced it has withdrawn or won by then.
    fence      every write of a run calls `verify()` just before it: False once the name is not this
               run's file, a higher generation exists, the heartbeat thread died, or the last
               successful beat is older than the stale limit (from then on another host may rightly
               take over). A beat failing for half the stale limit loses the lock too, with a sentence.

Why numbered names rather than a takeover claim: takers contend on one exclusive `link`, which needs
no lock of its own; a claim file left by a killed taker would need a takeover of its own, and
removing it (rename aside, compare) reopens the gap in which a third launch slips in. Why the
holder's own file: its late heartbeat cannot land on another run's lock, and ownership is two stats.

What is left: a check and the write after it are two steps. A holder stalled between its
`verify()` and its write for longer than the stale limit plus the settle delay (or killed mid-write
and frozen) can still land one write; and a taker stalled between judging generation N and linking
N+1 for longer than a whole run lifetime can displace a run started meanwhile at generation N, which
then stops (never two writers, possibly none).

Same host: a live pid is refused at once and a dead one taken over at once. Containers that share a
host name but not a pid namespace number pids differently; there the holder's flock on its record
decides (the kernel releases it when the holder dies), so a live holder in another container is
never taken over. Across hosts only the mtime counts.

What a shared file system must give: atomic `link` within one folder and `utime` that moves mtime
(local file systems, NFS, Lustre and GPFS), and clocks in step with the file server to well within
the stale limit (on NFS the server sets the mtime). NFS caches directory attributes for up to 60 s,
hence a default limit of 5 minutes. The stale limit comes from ``$CFM_LOCK_STALE_AFTER`` (seconds).
Torch-free (see errors.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from cfm.io.atomic_files import pid_alive, temp_file
from cfm.io.errors import UserError, writing
from cfm.training.lock_record import (
    STALE_ENV,
    Found,
    flocked,
    lock_names,
    parse_record,
    stale_after_setting,
)

SETTLE_AFTER = 1.0  # seconds a new holder waits before its first verify(): far longer than one takeover
TAKEN = "taken over"  # the reason a run lost its lock when a higher generation or another file holds it


class RunLocked(UserError):
    """Another live run holds the lock."""


class LockLost(UserError):
    """This run no longer holds its lock (taken over, or its heartbeat failed): it writes nothing more."""


class RunLock:
    """`{run_dir}/{name}.lock` (and its generations), held by this process from `acquire()` to `release()`.

    A record is JSON: ``{"pid", "host", "token", "started"}``; its mtime is the heartbeat. `token`
    tells this run's record from any other, even one of the same pid on another host.
    """

    def __init__(self, run_dir: str | os.PathLike, name: str, stale_after: float | None = None):
        self.name = name
        self.path = Path(run_dir) / f"{name}.lock"  # generation 0; the name messages use
        self.stale_after = stale_after_setting() if stale_after is None else stale_after
        # A few beats per stale limit, so that one slow beat never makes a live run look dead.
        self.heartbeat_every = min(15.0, self.stale_after / 6)
        self.grace = min(60.0, self.stale_after)  # for a lock file that holds no JSON
        self.settle = min(SETTLE_AFTER, self.stale_after / 30)
        self.token = uuid.uuid4().hex
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "token": self.token, "started": time.time()}
        self.held = False
        self.linked: tuple[Path, int] | None = None  # the name (and generation) this run linked its record to
        self._fd: int | None = None  # this run's record file, open (and flock'ed) from acquire to release
        self._own: Path | None = None
        self._last_beat = 0.0  # time.monotonic() of the last successful heartbeat
        self._lost: str | None = None  # why this run no longer holds the lock (TAKEN, or a sentence)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- names and reading

    def generations(self) -> dict[int, Path]:
        """The lock names present: generation -> path."""
        return lock_names(self.path)

    def parse(self, raw: bytes, path: Path | None = None) -> dict | None:
        """The record in a lock file's bytes (see `lock_record.parse_record`)."""
        return parse_record(raw, path or self.path, self.name)

    def _read(self, path: Path, generation: int) -> Found | None:
        """`path` as read (None once it is gone)."""
        try:
            with open(path, "rb") as f:
                raw, stat = f.read(), os.fstat(f.fileno())
        except FileNotFoundError:
            return None
        except PermissionError as err:
            raise UserError(f"cannot read {path} ({err.strerror}): another user's run of {self.name} holds or left "
                            f"this lock; ask them to stop it or delete it, or pick another --output_dir.") from err
        return Found(path, generation, raw, self.parse(raw, path), stat)

    def _top(self) -> Found | None:
        """The highest generation as read, or None when there is no lock."""
        while True:
            names = self.generations()
            if not names:
                return None
            top = max(names)
            found = self._read(names[top], top)
            if found is not None:
                return found  # else removed since the listing: list again

    def read(self) -> tuple[bytes, float] | None:
        """The lock's bytes and modification time (its last heartbeat), or None when there is no lock."""
        top = self._top()
        return None if top is None else (top.raw, top.stat.st_mtime)

    def owner(self) -> dict | None:
        """The current lock record (None when there is no lock or it is not JSON)."""
        top = self._top()
        return None if top is None else top.record

    def is_stale(self, raw: bytes, mtime: float, path: Path | None = None) -> bool:
        """Whether the lock file `path` holding `raw` belongs to no live run (see the module docstring)."""
        record = self.parse(raw, path)
        if record is None:
            return time.time() - mtime > self.grace
        if record["host"] == self.record["host"]:
            return not pid_alive(record["pid"]) and not (path is not None and flocked(path))
        return time.time() - mtime > self.stale_after

    def describe(self, raw: bytes, mtime: float) -> str:
        """Who holds the lock, for a message: "pid 12 on node3, last heartbeat 20 s ago"."""
        record = self.parse(raw)
        if record is None:
            return f"an unreadable record written {time.time() - mtime:.0f} s ago"
        return f"pid {record['pid']} on {record['host']}, last heartbeat {time.time() - mtime:.0f} s ago"

    # ---------------------------------------------------------------- taking

    def _write_record(self) -> None:
        with writing(self.path):
            fd, self._own = temp_file(self.path)
            self._fd = fd
            os.write(fd, json.dumps(self.record).encode())
            os.fsync(fd)
        with contextlib.suppress(OSError):  # no flock support: only the pid then tells a holder's life
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _drop_record(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None
        if self._own is not None:
            self._own.unlink(missing_ok=True)
            self._own = None

    def _is_mine(self, path: Path) -> bool:
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            return False
        mine = os.fstat(self._fd)
        return (stat.st_dev, stat.st_ino) == (mine.st_dev, mine.st_ino)

    def _link(self, path: Path) -> bool:
        """Link this run's record to `path`, freshly touched; False if the name exists."""
        with writing(path):
            os.utime(self._fd)  # a record that waited in acquire() must not look stale once linked
            self._last_beat = time.monotonic()
            try:
                os.link(self._own, path)
                return True
            except OSError as err:  # on NFS, a link that happened can still report an error
                if self._is_mine(path):
                    return True
                if isinstance(err, FileExistsError):
                    return False
                raise

    def _withdraw(self, path: Path) -> None:
        """Remove `path` if it is this run's record."""
        with contextlib.suppress(OSError):
            if self._is_mine(path):
                path.unlink()

    def _take(self, wait: bool, poll: float) -> dict | None:
        """Link this run's record as the lock (see `acquire`); the stale record replaced, or None."""
        announced = False
        while True:
            top = self._top()
            if top is None:
                if self._link(self.path):
                    if max(self.generations()) == 0:
                        self.linked = (self.path, 0)
                        return None
                    self._withdraw(self.path)  # a taker linked a higher generation meanwhile
                continue
            if self.is_stale(top.raw, top.stat.st_mtime, top.path):
                successor = self.path.with_name(f"{self.path.name}.{top.generation + 1}")
                if not self._link(successor):
                    continue  # another taker won: judge its lock
                now = self._read(top.path, top.generation)
                if now is not None and not (now.is_file(top.stat) and now.raw == top.raw):
                    self._withdraw(successor)  # a launch took the lock meanwhile: its generation is not stale
                    continue
                self.linked = (successor, top.generation + 1)
                for generation, path in self.generations().items():  # the stale one, and any a killed taker left
                    if generation <= top.generation:
                        with contextlib.suppress(OSError):
                            path.unlink()
                return top.record if top.record is not None else {}
            foreign = top.record is not None and top.record["host"] != self.record["host"]
            if not (wait and foreign):
                raise RunLocked(
                    f"{self.path.parent} is in use by another run of {self.name} "
                    f"({self.describe(top.raw, top.stat.st_mtime)}): stop it, or pick another --output_dir (its lock "
                    f"{top.path} counts as abandoned once that pid is gone, or after {self.stale_after:.0f} s without "
                    f"a heartbeat from another host; with --resume=auto a run from another host waits for that)."
                )
            if not announced:
                print(f"waiting for {self.path}: held by {self.describe(top.raw, top.stat.st_mtime)}; this run takes "
                      f"over once it is released or has had no heartbeat for {self.stale_after:.0f} s "
                      f"(${STALE_ENV}).", file=sys.stderr, flush=True)
                announced = True
            time.sleep(poll)

    def acquire(self, wait: bool = False, poll: float | None = None) -> dict | None:
        """Take the lock, settle, and start the heartbeat thread; return the stale record replaced
        (None if there was none, {} for one that held no JSON).

        A live lock raises RunLocked (one sentence naming the holder). With `wait`, a live lock of
        another host is waited out instead (one line says so) until it is released or stale: a
        requeued job on another node then continues the run. A full disk raises SaveError, an
        unreadable or hand-edited lock a UserError; either way this run leaves nothing behind.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        poll = max(0.1, min(5.0, self.stale_after / 20)) if poll is None else poll
        self._lost = None
        self._write_record()
        try:
            while True:
                replaced = self._take(wait, poll)
                time.sleep(self.settle)  # a taker that raced this link has withdrawn or won by now
                self.held = True
                if self._owns():
                    break
                self.held = False
                self._withdraw(self.linked[0])
        except BaseException:
            self.held = False
            self._drop_record()
            raise
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat {self.path.name}", daemon=True)
        self._thread.start()
        return replaced

    # ---------------------------------------------------------------- keeping

    def _owns(self) -> bool:
        """Whether the name this run linked is its record and no higher generation exists."""
        path, generation = self.linked
        return self._is_mine(path) and max(self.generations(), default=-1) == generation

    def _lose(self, reason: str) -> None:
        if self._lost is None:
            self._lost = reason

    def _check_heartbeat(self) -> None:
        """Lose the lock if the heartbeat thread died or its last success is older than the stale limit."""
        silent = time.monotonic() - self._last_beat
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            self._lose(f"the heartbeat thread of {self.path} stopped, so another run could take this run's lock "
                       f"over unseen: this run stops and writes nothing more; resume it with --resume=auto.")
        elif silent > self.stale_after:
            self._lose(f"no heartbeat of {self.path} succeeded for {silent:.0f} s (a stalled file system or a "
                       f"frozen process?), past the {self.stale_after:.0f} s after which another run may take "
                       f"it over (${STALE_ENV}): this run stops and writes nothing more; resume it with --resume=auto.")

    @property
    def lost(self) -> bool:
        """Whether this held lock is lost; cheap (no file access): the heartbeat thread's findings,
        its life and the age of its last success."""
        if self.held and self._lost is None:
            self._check_heartbeat()
        return self._lost is not None

    def verify(self) -> bool:
        """Whether this run holds the lock now; call it just before each write. A False is final
        (`lost` set): a run that loses its lock never takes it back."""
        if not self.held:
            return False
        for attempt in range(3):
            if self._lost is not None:
                break
            try:
                if not self._owns():
                    self._lose(TAKEN)
                break
            except OSError as err:  # a passing ESTALE, say: try again, then give up writing
                if attempt == 2:
                    self._lose(f"cannot check {self.path} ({type(err).__name__}: {err}): this run stops and "
                               f"writes nothing more; resume it with --resume=auto.")
                time.sleep(0.1)
        return not self.lost

    def _beat(self) -> None:
        """The heartbeat thread: touch the record and check ownership until released or lost. Any
        failure is retried (the stale limit allows several missed beats); failures for half the
        stale limit lose the lock, before another host could judge it stale."""
        while not self._stop.wait(self.heartbeat_every):
            try:
                os.utime(self._fd)
                owns = self._owns()
            except Exception as err:  # noqa: BLE001 -- whatever fails, the thread must survive it
                failing = time.monotonic() - self._last_beat
                if failing >= self.stale_after / 2:
                    self._lose(f"the heartbeat of {self.path} has failed for {failing:.0f} s ({type(err).__name__}: "
                               f"{err}), so another run may soon take it over: this run stops and writes nothing "
                               f"more; resume it with --resume=auto once the file system answers.")
                    print(f"error: {self._lost}", file=sys.stderr, flush=True)
                    return
                print(f"warning: heartbeat of {self.path} failed ({type(err).__name__}: {err}); retrying in "
                      f"{self.heartbeat_every:.0f} s.", file=sys.stderr, flush=True)
                continue
            if not owns:
                self._lose(TAKEN)
                print(f"error: {self.lost_message()}", file=sys.stderr, flush=True)
                return
            self._last_beat = time.monotonic()

    def lost_message(self) -> str:
        """The sentence a run that lost its lock stops with."""
        if self._lost not in (None, TAKEN):
            return self._lost
        try:
            top = self._top()
        except (OSError, UserError):
            top = None
        holder = f"{top.path} ({self.describe(top.raw, top.stat.st_mtime)})" if top is not None else "nobody now"
        return (f"this run's lock {self.path} was taken over by another run, holder of {holder}, as a run does once "
                f"a lock has had no heartbeat for {self.stale_after:.0f} s (${STALE_ENV}) or its pid is gone on the "
                f"same host: this run stops and writes nothing more; its last checkpoint stays for the run that "
                f"holds the lock.")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if this run still holds it; drop the record."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.stale_after)  # a beat stalled in the file system is left behind
            self._thread = None
        if self.held and self.verify():
            self.linked[0].unlink(missing_ok=True)
        self.held = False
        self._drop_record()
