"""CIFAR-10: the files (download, checksum, a restricted unpickler), the images as one uint8 tensor,
the [-1, 1] <-> uint8 maps, and the shuffled batch source of plain training.

Data live as one uint8 tensor on the training device (150 MB for the train set): batches are an
index gather plus a flip there, with no DataLoader workers and no per-image Python.
"""

from __future__ import annotations

import codecs
import os
import pickle
from pathlib import Path

import torch
from torch import Tensor

from cfm.io.errors import UserError

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

    `ids` (int64 [N] on the images' device, e.g. each image's class): yielded with the batch, one per
    image, and kept in the state (a conditional run's labels: training/conditioning.py); None: none.
    """

    single_cluster = False  # `ids` are per image (trainer.BatchSource)

    def __init__(self, images: Tensor, batch_size: int, seed: int = 0, ids: Tensor | None = None):
        self.images = images
        self.batch_size = batch_size
        self.ids = ids
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(images), generator=self.generator)
        self.position = 0

    def next_batch(self) -> tuple[Tensor, Tensor | None]:
        """Return x1 [B,3,32,32] float32 in [-1, 1], flipped at random, and its ids [B] (or None)."""
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
        x1 = random_hflip(to_model_range(self.images.index_select(0, index)), self.generator)
        return x1, None if self.ids is None else self.ids.index_select(0, index)

    def state_dict(self) -> dict:
        state = {"generator": self.generator.get_state(), "order": self.order.clone(), "position": self.position}
        return state if self.ids is None else {**state, "ids": self.ids.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order = state["order"].clone()
        self.position = int(state["position"])


# --------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Run bookkeeping
# --------------------------------------------------------------------------------------------


