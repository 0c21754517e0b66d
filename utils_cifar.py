"""CIFAR-10 data, EMA, checkpoint io and run bookkeeping shared by every script.

Data live as one uint8 tensor on the training device (150 MB for the train set): batches are an
index gather plus a flip there, with no DataLoader workers and no per-image Python.
"""

from __future__ import annotations

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

from unet import PAPER_CONFIG, UNetModel, strip_state_dict_prefixes

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class UserError(RuntimeError):
    """A problem the user can fix (bad flag, missing file, offline download): its message is one
    sentence naming the fix, printed without a traceback by the scripts."""


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


def read_cifar_batches(folder: str | os.PathLike, names=TRAIN_BATCHES) -> tuple[Tensor, Tensor]:
    """Read CIFAR python-pickle batches into `images` uint8 [N,3,32,32] and `labels` int64 [N].

    Each batch is a pickled dict with `data` (uint8 [n, 3072], channel-major rows) and `labels`
    (list of ints in 0..9). Validated by structure, not checksum, so a small data set written in the
    same format (as the tests do) loads too.
    """
    images, labels = [], []
    for name in names:
        path = Path(folder) / name
        if not path.is_file():
            raise DataError(f"{path} is missing: re-extract {CIFAR10_ARCHIVE} into {Path(folder).parent}.")
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
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
    generator seeded with `seed + rank` (each DDP rank its own stream), stored in `state_dict()`.
    """

    def __init__(self, images: Tensor, batch_size: int, seed: int = 0, rank: int = 0):
        self.images = images
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed + rank)
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


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call `write(f)` on a temp file in the same folder, then os.replace it onto `path`.

    A crash or error midway leaves the previous file (if any) intact and no temp file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """torch.save, atomically (see `atomic_write`)."""
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


def load_weights(net: torch.nn.Module, state_dict: dict, source: str = "checkpoint") -> None:
    """Load a state dict strictly after stripping `module.`/`_orig_mod.` prefixes; say what differs."""
    state_dict = strip_state_dict_prefixes(state_dict)
    check_fit(net.state_dict(), state_dict, source)
    net.load_state_dict(state_dict, strict=True)


def check_fit(own: dict, state_dict: dict, source: str = "checkpoint") -> None:
    """Raise CheckpointError unless `state_dict` has exactly the keys and shapes of `own` (a net's
    state dict; a net built on the meta device will do), naming the first difference of each kind."""
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches (e.g. {k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)})")
        raise CheckpointError(f"{source} does not fit this UNet: {'; '.join(parts)}.")


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
    net = UNetModel(**unet_config_from_checkpoint(ckpt, fallback_config))
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
    device = torch.device(flag)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device={flag} but no CUDA device is visible: pass --device=cpu or run on a GPU.")
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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        f.flush()


@dataclass
class RunPaths:
    """Where one run writes: `{output_dir}/{run_dir}/{file_prefix}_weights_step_{step}.pt` and friends."""

    run_dir: Path
    file_prefix: str  # e.g. "otcfm_cifar10" or "otcfm_cifar10_local_1e0"

    def checkpoint(self, step: int) -> Path:
        return self.run_dir / f"{self.file_prefix}_weights_step_{step}.pt"

    def existing_checkpoints(self) -> list[Path]:
        return sorted(self.run_dir.glob(f"{self.file_prefix}_weights_step_*.pt"))

    def grid(self, kind: str, step: int) -> Path:
        return self.run_dir / f"{kind}_generated_FM_images_step_{step}.png"

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.jsonl"
