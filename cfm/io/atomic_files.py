"""Files that appear whole or not at all, the temp files behind them, and downloads made that way.

`atomic_write` writes `.{name}.{host}.{pid}.XXXXXXXX.tmp` beside the file and renames it onto the
file's name, so a reader (another rank, another run, a crash) sees the old file or the new one, never
half of one. Only a killed process (kill -9, a node failure) leaves its temp file behind; the host
and pid in the name say whose it was, so `remove_stale_temp_files` can tell a dead writer's file
from a live writer's one:

    any file                            removed by the next `atomic_write` of the same file once its
                                        pid is gone on this host (shared caches in --data_dir, say:
                                        K-means clusters, FID statistics, Inception and published
                                        weights, which a run on another host may be writing)
    run files (checkpoints, metrics)    also removed by the run that holds the run's lock (no other
                                        run writes them), whoever wrote them

Torch-free (see errors.py).
"""

from __future__ import annotations

import contextlib
import glob
import http.client
import os
import re
import shutil
import socket
import tempfile
import urllib.request
from pathlib import Path
from typing import Callable

from cfm.io.errors import UserError

DOWNLOAD_TIMEOUT_S = 60
# The host as it may appear in a file name: no dots (they separate the name's fields), no slashes.
HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host."""
    try:
        os.kill(pid, 0)  # signal 0: an existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _umask() -> int:
    """The process umask. Linux reports it in /proc; elsewhere it can only be read by setting it
    (and setting it straight back), which briefly applies to files other threads create."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_file(path: str | os.PathLike) -> tuple[int, Path]:
    """(fd, temp path) of a new empty file `.{name}.{host}.{pid}.XXXXXXXX.tmp` beside `path`, with
    the permissions of any new file (0666 less the umask), not mkstemp's owner-only 0600, so that a
    shared folder can read what is renamed from it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{HOST}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, Path(tmp)


def temp_owner(tmp: Path) -> tuple[str, int] | None:
    """(host, pid) from a temp file's name (see `temp_file`); None for a name of another form."""
    fields = tmp.name.removesuffix(".tmp").rsplit(".", 3)  # [.name, host, pid, random]
    if not tmp.name.endswith(".tmp") or len(fields) != 4 or not fields[2].isdigit():
        return None
    return fields[1], int(fields[2])


def atomic_write(path: str | os.PathLike, write: Callable, check: Callable[[Path], object] | None = None) -> Path:
    """Call `write(f)` on a temp file beside `path` (see `temp_file`), then `check(temp path)` if
    given (it raises to refuse the file), then rename the temp file onto `path`.

    A crash, error or refusal midway leaves the previous file (if any) intact and no temp file behind
    (only a killed process leaves one). The temp files of `path` that writers killed on this host
    left are removed first (see `remove_stale_temp_files`; a live writer's, or another host's, stay).
    """
    path = Path(path)
    remove_stale_temp_files(path.parent, [glob.escape(path.name)])
    fd, tmp = temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a temp file that cannot be removed goes at the next start
            os.unlink(tmp)
        raise
    return path


def remove_stale_temp_files(folder: str | os.PathLike, names, held_by_this_run: bool = False) -> list[Path]:
    """Delete the temp files that killed writers left for `names` in `folder`; return them.

    `names` are file names or globs (`ckpt_step_*.pt`). A temp file goes when its pid is gone on this
    host, or, with `held_by_this_run` (the caller holds the lock of the run these files belong to, so
    no other process writes them), whatever its host or pid. Shared caches pass False.
    """
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            owner = temp_owner(tmp)
            dead = owner is not None and owner[0] == HOST and owner[1] != os.getpid() and not pid_alive(owner[1])
            if held_by_this_run or dead:
                with contextlib.suppress(OSError):  # gone already, or not ours to remove: it stays
                    tmp.unlink()
                    removed.append(tmp)
    return removed


class DownloadFailed(UserError):
    """A download did not complete; `reason` is short ("IncompleteRead: ...") for the caller's sentence."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"cannot download {url} ({reason}).")
        self.url, self.reason = url, reason


def download(url: str, dest: str | os.PathLike, check: Callable[[Path], object] | None = None,
             progress: bool = False, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Fetch `url` into `dest` atomically (see `atomic_write`; `check` may refuse the file).

    Every way a transfer can fail is a `DownloadFailed`: no network, an HTTP error or timeout, a
    connection cut short (``http.client.IncompleteRead``), a malformed URL (``ValueError``), a full
    disk. Errors that `check` raises pass unchanged.
    """

    def fetch(f):
        with urllib.request.urlopen(url, timeout=timeout) as response:
            if not progress:
                shutil.copyfileobj(response, f, 1 << 20)
                return
            from tqdm import tqdm

            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=Path(dest).name) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))

    try:
        return atomic_write(dest, fetch, check)
    except (OSError, http.client.HTTPException, ValueError) as err:
        # URLError, HTTPError, socket timeouts and disk errors are OSErrors; IncompleteRead is not.
        reason = getattr(err, "reason", None) or getattr(err, "strerror", None) or err
        raise DownloadFailed(url, f"{type(err).__name__}: {reason}") from err
