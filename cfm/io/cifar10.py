"""CIFAR-10 data, EMA, checkpoint io and run bookkeeping shared by every script.

Data live as one uint8 tensor on the training device (150 MB for the train set): batches are an
index gather plus a flip there, with no DataLoader workers and no per-image Python.
"""

from __future__ import annotations

import codecs
import glob
import json
import math
import os
import pickle
import platform
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from torch import Tensor

from atomic_files import atomic_write, remove_stale_temp_files
from errors import SaveError, UserError, writing
from unet import PAPER_CONFIG, UNetModel, check_config, strip_state_dict_prefixes

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class DataError(UserError):
    """The data set is missing, cannot be fetched, or is malformed."""


def ensure_cifar10(data_dir: str | os.PathLike, download: bool = True) -> Path:
    """Return `{data_dir}/cifar-10-batches-py`, extracting or downloading the archive if needed.

    Order: an extracted folder wins; else a local `cifar-10-python.tar.gz` is checksum-verified and
    extracted; else the archive is downloaded with torchvision's utilities (md5 verified).
    """
    data_dir = Path(data_dir)
    folder = data_dir / CIFAR10_DIR
    if folder.is_dir():
        return folder
    archive = data_dir / CIFAR10_ARCHIVE
    # Imported here: torchvision is only needed when the archive must be fetched or checked.
    from torchvision.datasets.utils import check_integrity, download_and_extract_archive, extract_archive

    if archive.is_file():
        if not check_integrity(str(archive), CIFAR10_MD5):
            raise DataError(
                f"{archive} is corrupt (md5 mismatch): delete it and download it again from {CIFAR10_URL}."
            )
        extract_archive(str(archive), str(data_dir))
        return folder
    if not download:
        raise DataError(_missing_data_message(data_dir, "downloading is off"))
    try:
        download_and_extract_archive(CIFAR10_URL, str(data_dir), filename=CIFAR10_ARCHIVE, md5=CIFAR10_MD5)
    except Exception as err:  # offline machines raise URLError, socket errors, ...
        raise DataError(_missing_data_message(data_dir, f"download failed: {type(err).__name__}")) from err
    return folder


def _missing_data_message(data_dir: Path, why: str) -> str:
    return (
        f"CIFAR-10 is not in {data_dir} and could not be fetched ({why}): download {CIFAR10_ARCHIVE} "
        f"from {CIFAR10_URL} and put it in {data_dir}/ (or pass --data_dir=DIR where it lies)."
    )


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch is made of; any other global is refused before it runs.

    A pickle can call any importable function while it loads (`os.system`, say), so a data file
    from a mirror or a shared folder must not be read with plain `pickle.load`. A batch needs dicts,
    lists, str/bytes and ints (pickle opcodes, no lookup) plus numpy array reconstruction: the real
    files were written by Python 2 with numpy 1 (`numpy.core.multiarray._reconstruct`, renamed
    `numpy._core` in numpy 2), Python 3 writes bytes in protocol 2 as `_codecs.encode(text,
    "latin1")`, and protocol 5 arrays come back through `numeric._frombuffer`.
    """

    def find_class(self, module: str, name: str):
        import numpy as np

        core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to numpy._core
        allowed = {
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): _latin1_encode,
        }
        for old_or_new in ("numpy.core", "numpy._core"):
            allowed[f"{old_or_new}.multiarray", "_reconstruct"] = core.multiarray._reconstruct
            allowed[f"{old_or_new}.numeric", "_frombuffer"] = core.numeric._frombuffer
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR batch never needs")
        return allowed[module, name]


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """`_codecs.encode` as Python 3 uses it to pickle bytes (protocol <= 2): latin1 text only."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"it encodes bytes as {encoding!r}, where a pickle of bytes uses latin1")
    return codecs.encode(text, "latin1")


def read_cifar_batches(folder: str | os.PathLike, names=TRAIN_BATCHES) -> tuple[Tensor, Tensor]:
    """Read CIFAR python-pickle batches into `images` uint8 [N,3,32,32] and `labels` int64 [N].

    Each batch is a pickled dict with `data` (uint8 [n, 3072], channel-major rows) and `labels`
    (list of ints in 0..9). Validated by structure, not checksum, so a small data set written in the
    same format (as the tests do) loads too. Batches are unpickled by `_CifarUnpickler`, which
    refuses anything but the data types above: a malformed, truncated or hostile file is a
    `DataError` naming it.
    """
    images, labels = [], []
    for name in names:
        path = Path(folder) / name
        if not path.is_file():
            raise DataError(f"{path} is missing: re-extract {CIFAR10_ARCHIVE} into {Path(folder).parent}.")
        with open(path, "rb") as f:
            try:
                entry = _CifarUnpickler(f, encoding="latin1").load()
            except Exception as err:  # truncated (EOFError), refused or garbled (UnpicklingError), ...
                raise DataError(
                    f"{path} is not a readable CIFAR-10 batch ({err or type(err).__name__}): "
                    f"delete it and re-extract {CIFAR10_ARCHIVE}."
                ) from err
        if not isinstance(entry, dict):
            raise DataError(
                f"{path} holds a {type(entry).__name__}, not a CIFAR-10 batch dict: re-extract {CIFAR10_ARCHIVE}."
            )
        data = entry.get("data")
        batch_labels = entry.get("labels")
        shape = getattr(data, "shape", None)
        if data is None or batch_labels is None or getattr(data, "dtype", None) != "uint8" or len(shape) != 2 or shape[1] != 3072:
            raise DataError(f"{path} is not a CIFAR-10 batch (expected uint8 'data' [n, 3072] and 'labels').")
        if len(batch_labels) != shape[0]:
            raise DataError(f"{path} has {shape[0]} images but {len(batch_labels)} labels.")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.as_tensor(batch_labels, dtype=torch.int64))
    images_t, labels_t = torch.cat(images), torch.cat(labels)
    if labels_t.numel() and (labels_t.min() < 0 or labels_t.max() > 9):
        raise DataError(f"labels in {folder} fall outside 0..9.")
    return images_t, labels_t


def load_cifar10(data_dir: str | os.PathLike, train: bool = True, download: bool = True) -> tuple[Tensor, Tensor]:
    """CIFAR-10 train (50,000) or test (10,000) set as uint8 [N,3,32,32] and int64 labels [N]."""
    folder = ensure_cifar10(data_dir, download=download)
    return read_cifar_batches(folder, TRAIN_BATCHES if train else TEST_BATCHES)


def to_model_range(images: Tensor) -> Tensor:
    """uint8 [...] in 0..255 -> float32 in [-1, 1]: x / 127.5 - 1 (ToTensor + Normalize(0.5, 0.5))."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(x: Tensor) -> Tensor:
    """Model output in [-1, 1] -> uint8, as the published evaluation: (x * 127.5 + 128).clip(0, 255)."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


def random_hflip(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Flip each image of x [B,C,H,W] left-right with probability 1/2 (coin drawn on the generator's device)."""
    device = generator.device if generator is not None else x.device
    flip = torch.rand(x.shape[0], generator=generator, device=device) < 0.5
    # non_blocking: a CPU coin sent to a GPU must not wait for the queued GPU work (a host sync).
    return torch.where(flip.to(x.device, non_blocking=True)[:, None, None, None], x.flip(-1), x)


class ShuffledBatches:
    """Uniformly shuffled, flipped batches from a device-resident uint8 data set (the FID-3.5 recipe).

    Epoch-wise permutations without replacement; a batch that crosses an epoch boundary continues in
    the next permutation, so every batch has `batch_size` images. All randomness comes from one CPU
    generator seeded with `seed`, stored in `state_dict()`; under torchrun every rank draws the same
    global batch and trains on its own block of it (see `distributed.py`).
    """

    def __init__(self, images: Tensor, batch_size: int, seed: int = 0):
        self.images = images
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(images), generator=self.generator)
        self.position = 0

    def next_batch(self) -> tuple[Tensor, None]:
        """Return x1 [B,3,32,32] float32 in [-1, 1], flipped at random, and no cluster id."""
        parts, needed = [], self.batch_size
        while needed:
            if self.position == len(self.order):
                self.order = torch.randperm(len(self.images), generator=self.generator)
                self.position = 0
            take = self.order[self.position : self.position + needed]
            self.position += len(take)
            needed -= len(take)
            parts.append(take)
        index = torch.cat(parts).to(self.images.device, non_blocking=True)
        # index_select, not images[index]: the advanced-indexing path is much slower on CPU.
        return random_hflip(to_model_range(self.images.index_select(0, index)), self.generator), None

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order.clone(), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order = state["order"].clone()
        self.position = int(state["position"])


# --------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def ema_update(ema_params: list[Tensor], net_params: list[Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * net, over parameter lists, as one fused foreach lerp.

    Pass `list(ema.parameters())` and `list(net.parameters())`: the UNet has no buffers
    (GroupNorm keeps no running statistics), so parameters are its whole state.
    """
    torch._foreach_lerp_(ema_params, net_params, 1.0 - decay)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


class CheckpointError(UserError):
    """A checkpoint a user pointed at that cannot be used; the message names the fix."""


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


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """torch.save, atomically (see `atomic_write`); a failed write is a `SaveError`."""
    with writing(path):
        return atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | os.PathLike, map_location="cpu", source: str | None = None) -> dict:
    """Read a checkpoint (ours or a published TorchCFM one) with `weights_only=True`; errors call the
    file `source` (default: its path)."""
    path = Path(path)
    source = source or str(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {source} does not exist: check --checkpoint_path / --checkpoint.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {source} cannot be read ({type(err).__name__}: {err}).") from err
    if not isinstance(ckpt, dict) or "net_model" not in ckpt and "ema_model" not in ckpt:
        raise CheckpointError(f"checkpoint {source} holds no 'net_model'/'ema_model' weights.")
    return ckpt


def _shape(value) -> tuple | str:
    """A tensor's shape; for anything else (weights_only also loads lists and numbers) its type's name."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def check_weights(net: torch.nn.Module, state_dict: dict, source: str = "checkpoint") -> dict:
    """`state_dict` without `module.`/`_orig_mod.` prefixes, if its keys and shapes are exactly `net`'s
    and its values finite; else a `CheckpointError` saying what differs (or that the run that wrote
    it had diverged). `net` may live on the meta device (no memory)."""
    state_dict = strip_state_dict_prefixes(state_dict)
    own = net.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if _shape(own[k]) != _shape(state_dict[k]))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches (e.g. {k}: {_shape(state_dict[k])} vs {_shape(own[k])})")
        raise CheckpointError(f"{source} does not fit this UNet ({'; '.join(parts)}): build the UNet it was trained "
                              f"with (e.g. its --num_channel).")
    non_finite = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if non_finite:
        raise CheckpointError(
            f"{source} holds NaN or infinite weights ({len(non_finite)} tensors, e.g. {non_finite[0]}): the run "
            f"that wrote it had diverged; use an earlier checkpoint."
        )
    return state_dict


def load_weights(net: torch.nn.Module, state_dict: dict, source: str = "checkpoint") -> None:
    """Load a state dict strictly after stripping `module.`/`_orig_mod.` prefixes; say what differs.
    Non-finite weights (a diverged run) are refused."""
    net.load_state_dict(check_weights(net, state_dict, source), strict=True)


def unet_config_from_checkpoint(ckpt: dict, fallback: dict | None = None) -> dict:
    """The UNet construction arguments stored in `ckpt`, else `fallback`, else the paper config.

    Published TorchCFM checkpoints store none: they were trained with the paper config.
    """
    return dict(ckpt.get("unet_config") or fallback or PAPER_CONFIG)


def build_net_from_checkpoint(
    ckpt: dict, use_ema: bool = True, fallback_config: dict | None = None, device="cpu", source: str = "checkpoint"
) -> UNetModel:
    """Rebuild the UNet a checkpoint was trained with and load its EMA (or raw) weights; eval mode."""
    key = "ema_model" if use_ema and "ema_model" in ckpt else "net_model"
    config = unet_config_from_checkpoint(ckpt, fallback_config)
    try:
        check_config(config)
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from err
    net = UNetModel(**config)
    load_weights(net, ckpt[key], source=f"{source} ({key})")
    return net.to(device).eval().requires_grad_(False)


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


# --------------------------------------------------------------------------------------------
# Run bookkeeping
# --------------------------------------------------------------------------------------------


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


def resolve_device(flag: str | None) -> torch.device:
    """`--device` ("", "auto", "cpu", "cuda", "cuda:1", ...) -> a device; empty/auto = cuda if available."""
    if not flag or flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(flag)
    except RuntimeError:  # torch's message lists every backend it knows, few of which train here
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device={flag} is not a device this code runs on: pass cpu, cuda, cuda:N, mps or auto.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device={flag} but no CUDA device is visible: pass --device=cpu or run on a GPU.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device={flag} but only {torch.cuda.device_count()} CUDA devices are visible: "
                        f"pick cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device={flag} but no Apple GPU is available: pass --device=cpu.")
    return device


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
        run_files = remove_stale_temp_files(self.run_dir, [f"{prefix}_weights_step_*.pt", f"{prefix}_metrics.jsonl"],
                                            held_by_this_run=True)
        return run_files + remove_stale_temp_files(self.run_dir, [f"{prefix}.lock"])
