"""The published TorchCFM 1.0.4 CIFAR-10 checkpoints by name: fetched once, verified, cached.

    path, ckpt = published_checkpoint("otcfm", data_dir="./data")
    net = nets.build_net_from_checkpoint(ckpt)             # the paper UNet, EMA weights

A file is downloaded to a temp file in ``{data_dir}/weights/`` (``atomic_files.download``: a broken
transfer never leaves a partial file), checked to fit the paper UNet strictly (every key and shape),
and only then renamed to its release name; a file that does not fit is deleted. So the release name
in the cache only ever holds a file that passed the check, and a cached file is checked again on
every use (a cheap comparison against a UNet built on the meta device) in case it was put there by
hand. The release publishes no
checksums: `verify` judges a file by what it holds (both weight sets; every key, shape and dtype).

Offline, put the release file in ``{data_dir}/weights/`` yourself; the error says which URL to fetch.
``$CFM_WEIGHTS_URL`` replaces the release's base URL (a mirror, or a local server in the tests).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cfm.io.atomic_files import DownloadFailed, download
from cfm.io.checkpoint_io import CheckpointError, load_checkpoint
from cfm.io.errors import UserError
from cfm.method.nets import check_weights
from cfm.method.unet import PAPER_CONFIG, UNetModel

RELEASE_URL = "https://github.com/atong01/conditional-flow-matching/releases/download/1.0.4"
URL_ENV = "CFM_WEIGHTS_URL"
# --pretrained name -> release file (the I-CFM release file is called cfm_...).
PUBLISHED = {
    "otcfm": "otcfm_cifar10_weights_step_400000.pt",
    "icfm": "cfm_cifar10_weights_step_400000.pt",
    "fm": "fm_cifar10_weights_step_400000.pt",
}
# The weight sets every release file holds (besides `optim`, `sched` and `step`).
RELEASE_WEIGHTS = ("net_model", "ema_model")


class WeightsUnavailable(UserError):
    """A published checkpoint cannot be fetched, or the file is not one; one sentence."""


def base_url() -> str:
    """$CFM_WEIGHTS_URL if set, else the TorchCFM 1.0.4 release; no trailing slash."""
    return (os.environ.get(URL_ENV) or RELEASE_URL).rstrip("/")


def verify(path: Path, config: dict, source: str) -> dict:
    """Load the checkpoint at `path` and check that it holds what a release file holds for UNetModel(**config).

    Both weight sets (`net_model`, `ema_model`: without the EMA one, the raw weights would be
    scored in its place) are compared with a UNet built on the meta device (no memory, no time):
    every key, shape and dtype (float32, so also the size in bytes), and finite values. Returns the
    checkpoint with `unet_config` set to `config`, so that it rebuilds as that UNet. Raises
    CheckpointError, whose message calls the file `source`.

    The release publishes no checksums, so the file is judged by its contents alone.
    """
    ckpt = load_checkpoint(path, source=source)
    with torch.device("meta"):
        net = UNetModel(**config)
    dtypes = {key: value.dtype for key, value in net.state_dict().items()}
    for key in RELEASE_WEIGHTS:
        if not isinstance(ckpt.get(key), dict):
            raise CheckpointError(f"{source} holds no {key!r} weights, which every published checkpoint holds.")
        weights = check_weights(net, ckpt[key], f"{source} ({key})")
        other = sorted(k for k, value in weights.items() if value.dtype != dtypes[k])
        if other:
            raise CheckpointError(
                f"{source} ({key}) holds {weights[other[0]].dtype} weights where the release holds "
                f"{dtypes[other[0]]} ({len(other)} tensors, e.g. {other[0]})."
            )
    return {**ckpt, "unet_config": dict(config)}


def _clause(err: Exception) -> str:
    """An error's one-sentence message without its full stop, to end another sentence."""
    return str(err).rstrip(".")


def published_checkpoint(name: str, data_dir: str | os.PathLike = "./data", config: dict | None = None,
                         progress: bool = True) -> tuple[Path, dict]:
    """The published checkpoint `name` (otcfm, icfm, fm): its cached path and its verified contents.

    Downloaded into ``{data_dir}/weights/`` on first use (see the module docstring). `config` is the
    UNet the file must fit, the paper UNet by default (a test passes a tiny one). Raises
    WeightsUnavailable: offline (naming the URL and where to put the file), or a file that is not
    that UNet's checkpoint (a downloaded one is deleted first).
    """
    if name not in PUBLISHED:
        raise WeightsUnavailable(f"no published weights are called {name!r}: choose one of {', '.join(PUBLISHED)}.")
    config = PAPER_CONFIG if config is None else config
    path = Path(data_dir) / "weights" / PUBLISHED[name]
    url = f"{base_url()}/{PUBLISHED[name]}"
    if path.is_file():
        try:
            return path, verify(path, config, str(path))
        except CheckpointError as err:
            raise WeightsUnavailable(f"{_clause(err)}; delete it to download {url} again.") from err
    ckpt = None

    def check(staging: Path) -> None:  # the file only gets its release name once it fits
        nonlocal ckpt
        try:
            ckpt = verify(staging, config, url)
        except CheckpointError as err:
            raise WeightsUnavailable(f"the download was not kept, since {_clause(err)}; check ${URL_ENV}.") from err

    try:
        download(url, path, check=check, progress=progress)
    except DownloadFailed as err:  # offline, HTTP errors, a transfer cut short, a malformed $CFM_WEIGHTS_URL, a full disk
        raise WeightsUnavailable(
            f"cannot download {url} ({err.reason}): fetch it by hand and put it at {path}, or check ${URL_ENV}."
        ) from err
    return path, ckpt
