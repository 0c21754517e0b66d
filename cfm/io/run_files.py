"""A run's files: where it writes (`RunPaths`), JSON-lines records, writability checks, provenance."""

from __future__ import annotations

import glob
import json
import math
import os
import platform
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from cfm.io.atomic_files import atomic_write, remove_stale_temp_files
from cfm.io.errors import UserError, writing


def unwritable_reason(folder: str | os.PathLike) -> str | None:
    """Why files cannot be created in `folder` (created on demand), or None if they can.

    Judged on the folder or, while it does not exist, its nearest existing ancestor, without
    writing anything. `os.access` also sees a read-only file system, even for root.
    """
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def provenance(device: torch.device | str | None = None) -> dict:
    """Where a result came from: git commit (+dirty), package versions, host and device."""
    repo = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(
                ["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    packages = {}
    for name in ("torchvision", "pot", "numpy", "scikit-learn", "clean-fid", "torchdiffeq"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    packages["torch"] = str(torch.__version__)  # includes the CUDA build tag, e.g. 2.14.1+cu130
    device = torch.device(device) if device is not None else torch.device("cpu")
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "packages": packages,
        "python": platform.python_version(),
        "host": platform.node(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    }


def json_safe(value):
    """`value` with every non-finite float replaced by None, so that `json.dumps` writes valid JSON
    (`null`) where it would write the bare `NaN` / `Infinity` that strict readers reject."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file ([] when it does not exist).

    Tolerant: a line that does not parse as a JSON object (the torn last line of a run killed or out
    of disk mid-append) is skipped with a warning naming the file and line, so one bad write never
    makes a run folder unreadable.
    """
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            warnings.warn(f"{path}:{number} is not a JSON record (a torn write?): skipped.", stacklevel=2)
            continue
        records.append(record)
    return records


def truncate_jsonl(path: str | os.PathLike, keep) -> None:
    """Rewrite a JSON-lines file with only the records for which `keep(record)` is true (atomically);
    unreadable lines are dropped (see `read_jsonl`)."""
    path = Path(path)
    if not path.is_file():
        return
    lines = [json.dumps(record) for record in read_jsonl(path) if keep(record)]
    atomic_write(path, lambda f: f.write("".join(line + "\n" for line in lines).encode()))


def ensure_writable(path: str | os.PathLike, flag: str) -> None:
    """Raise UserError unless a file can be written at `path` (given by `flag`), creating its folder.

    Meant for output paths checked before long work: a probe file is created (and removed) in the
    folder, which catches what permission bits alone do not (read-only mounts, full quotas).
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag}={path} is a folder: name a file.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as err:
        raise UserError(f"cannot write {flag}={path} ({type(err).__name__}: {err.strerror or err}): "
                        "choose a writable folder.") from err


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line (flushed at once: a crash keeps every finished line). Non-finite numbers
    are written as null (see `json_safe`)."""
    line = json.dumps(json_safe(record), allow_nan=False) + "\n"
    with writing(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(line)
            f.flush()


@dataclass
class RunPaths:
    """Where one run writes: `{output_dir}/{run_dir}/{file_prefix}_weights_step_{step}.pt` and friends."""

    run_dir: Path
    file_prefix: str  # e.g. "otcfm_cifar10" or "otcfm_cifar10_local_1e0"

    def checkpoint(self, step: int) -> Path:
        return self.run_dir / f"{self.file_prefix}_weights_step_{step}.pt"

    def checkpoints_by_step(self) -> list[Path]:
        """This run's checkpoints, oldest first by step number (not by file name: step_100000 sorts
        before step_20000 as text)."""
        prefix = f"{self.file_prefix}_weights_step_"
        found = [(int(p.name[len(prefix):-3]), p) for p in self.run_dir.glob(f"{prefix}*.pt")
                 if p.name[len(prefix):-3].isdigit()]
        return [p for _, p in sorted(found)]

    def grid(self, kind: str, step: int) -> Path:
        return self.run_dir / f"{kind}_generated_FM_images_step_{step}.png"

    @property
    def metrics(self) -> Path:
        """`{file_prefix}_metrics.jsonl`: one history per run name, so runs that share a folder (anchor
        runs with different --lambda_name) never touch each other's."""
        return self.run_dir / f"{self.file_prefix}_metrics.jsonl"

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete the temp files killed runs left behind for this run's checkpoints and metrics file
        (call it holding the run's lock: no other process writes them) and for its lock (only those
        of dead pids: a run launched beside this one writes its lock temp file while this one holds
        the lock). See `atomic_files.remove_stale_temp_files`."""
        prefix = glob.escape(self.file_prefix)
        run_temps = remove_stale_temp_files(self.run_dir, [f"{prefix}_weights_step_*.pt", f"{prefix}_metrics.jsonl"],
                                            held_by_this_run=True)
        return run_temps + remove_stale_temp_files(self.run_dir, [f"{prefix}.lock"])
