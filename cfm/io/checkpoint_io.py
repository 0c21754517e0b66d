"""Checkpoint files: atomic saves, reading with `weights_only=True`, and the RNG states a checkpoint keeps.

A checkpoint is a dict of plain tensors, numbers, strings and dicts (no class of this project is
pickled), so checkpoints written before a code change load after it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cfm.io.atomic_files import atomic_write
from cfm.io.errors import UserError, writing


class CheckpointError(UserError):
    """A checkpoint a user pointed at that cannot be used; the message names the fix."""


def stored_condition(ckpt: dict | None) -> str | None:
    """The labels a checkpoint's net was trained on: "class" or "cluster" (its ckpt["condition"]
    record), None for an unconditional one (ours without --condition, and the published ones)."""
    return ((ckpt or {}).get("condition") or {}).get("condition")


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """torch.save, atomically (see `atomic_write`); a failed write is a `SaveError`."""
    with writing(path):
        return atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | os.PathLike, map_location="cpu", source: str | None = None) -> dict:
    """Read a checkpoint (ours or a published TorchCFM one) with `weights_only=True`; errors call the
    file `source` (default: its path)."""
    path = Path(path)
    source = source or str(path)
    if path.is_dir():  # a run folder where its checkpoint was meant: point at what it holds
        newest = newest_checkpoint(path)
        if newest is None:
            raise CheckpointError(f"checkpoint {source} is a folder that holds no checkpoint (*_weights_step_N.pt): "
                                  f"pass a checkpoint file, or --resume=auto to train on from a run's newest one.")
        raise CheckpointError(f"checkpoint {source} is a folder, not a file: pass its newest checkpoint, {newest}, "
                              f"or --resume=auto to train on from the run's newest checkpoint that loads.")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {source} does not exist: check --checkpoint_path / --checkpoint.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {source} cannot be read ({type(err).__name__}: {err}).") from err
    if not isinstance(ckpt, dict) or "net_model" not in ckpt and "ema_model" not in ckpt:
        raise CheckpointError(f"checkpoint {source} holds no 'net_model'/'ema_model' weights.")
    return ckpt


def newest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The checkpoint in `folder` with the highest step (`{run name}_weights_step_{N}.pt`, of any run
    name; by number, not by name: step_100000 sorts before step_20000 as text), or None."""
    found = []
    for path in Path(folder).glob("*_weights_step_*.pt"):
        step = path.name[:-3].rsplit("_weights_step_", 1)[1]
        if step.isdigit():
            found.append((int(step), path.name, path))
    return max(found)[2] if found else None


def rng_state(device: torch.device) -> dict:
    """Torch RNG states (CPU, and this device's CUDA generator) as tensors, for exact resume."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
