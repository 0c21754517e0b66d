"""FID as published: clean-fid ``legacy_tensorflow`` Inception features vs CIFAR-10 train (or test) statistics.

The number matches clean-fid 0.1.35's ``fid.compute_fid(gen=..., dataset_name="cifar10",
dataset_res=32, dataset_split="train", mode="legacy_tensorflow")`` used for the published results:

    features  Inception-v3 (TF 2015-12-05 weights, the torchscript file ``inception-2015-12-05.pt``)
              2048-d pool features; in legacy_tensorflow mode the 32x32 images go in unresized,
              values in [0, 255], and the network resizes to 299x299 itself.
    reference mu, sigma of those features on the 50,000 CIFAR-10 train images, the statistics file
              ``cifar10_legacy_tensorflow_train_32.npz`` clean-fid downloads (split "train", the
              published reference); split "test": the 10,000 test images,
              ``cifar10_legacy_tensorflow_test_32.npz`` (``dataset_split="test"`` in clean-fid).
    FID       ||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)) with S = np.cov(features).

Offline use: both files are looked up, in order, at an explicit path (flag), an environment variable
(``FID_INCEPTION_PATH``, ``FID_STATS_PATH``), ``{data_dir}/fid/`` and clean-fid's own cache
(``/tmp`` for the weights, ``cleanfid/stats/`` for the statistics), then downloaded into
``{data_dir}/fid/``. If the published statistics cannot be fetched, they are computed once from the
local CIFAR-10 images of the same split with the same extractor and cached as
``{data_dir}/fid/cifar10_legacy_tensorflow_{split}_32_computed.npz`` (the result records which).
When neither works, ``FIDUnavailable`` says in one sentence which files to put where.

Our own ``frechet_distance`` is clean-fid's formula (same sqrtm, same singular-product fallback)
without its ``sqrtm(disp=False)`` call, which scipy deprecates.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from torch import Tensor

from cfm.evaluation.sampling import gather_batches, generate_samples
from cfm.io.atomic_files import DownloadFailed, atomic_write, download
from cfm.io.cifar10 import DataError, ensure_cifar10, load_cifar10
from cfm.io.distributed import World
from cfm.io.errors import UserError
from cfm.method.guidance import Guidance

INCEPTION_FILENAME = "inception-2015-12-05.pt"
# The URLs clean-fid 0.1.35 downloads from (cleanfid/downloads_helper.py, cleanfid/features.py).
INCEPTION_URL = f"https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/{INCEPTION_FILENAME}"
STATS_BASE_URL = "https://www.cs.cmu.edu/~clean-fid/stats"
SPLITS = ("train", "test")
INCEPTION_ENV = "FID_INCEPTION_PATH"
STATS_ENV = "FID_STATS_PATH"

#: images uint8 (or float in [0, 255]) [B, 3, H, W] -> features [B, D] (any device, any float dtype).
FeatureExtractor = Callable[[Tensor], Tensor]


class FIDUnavailable(UserError):
    """FID cannot be computed (missing Inception weights or reference statistics); one sentence."""


def stats_filename(split: str = "train", computed: bool = False) -> str:
    """clean-fid's name for the CIFAR-10 statistics of `split`, or ours for those computed locally."""
    if split not in SPLITS:
        raise ValueError(f"unknown CIFAR-10 split {split!r}: choose one of {', '.join(SPLITS)}.")
    return f"cifar10_legacy_tensorflow_{split}_32{'_computed' if computed else ''}.npz"


# --------------------------------------------------------------------------------------------
# Maths
# --------------------------------------------------------------------------------------------


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2): mu [D], sigma [D, D].

    d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2)).
    A singular product (non-finite sqrtm) is retried with eps * I added to both covariances, and
    the tiny imaginary part rounding leaves in sqrtm is dropped, as clean-fid does.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}."
        )
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(mu1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(sigma1 sigma2) has an imaginary part of {np.abs(covmean.imag).max():.3g}.")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """features [N, D] -> (mu [D], sigma [D, D]) in float64; sigma is np.cov (divides by N - 1)."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def extract_features(extractor: FeatureExtractor, images: Tensor, batch_size: int = 500) -> np.ndarray:
    """Features [N, D] float64 of uint8 images [N, 3, H, W], `batch_size` at a time, without grad."""
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            out.append(extractor(images[start : start + batch_size]).double().cpu().numpy())
    return np.concatenate(out)


# --------------------------------------------------------------------------------------------
# Files: lookup, download, readiness
# --------------------------------------------------------------------------------------------


def cleanfid_cache_path(filename: str) -> Path:
    """Where clean-fid itself caches `filename` (reused when present; never written here)."""
    if filename == INCEPTION_FILENAME:
        return Path("/tmp") / INCEPTION_FILENAME
    import cleanfid  # imported here: only the lookup needs clean-fid's install location

    return Path(cleanfid.__file__).parent / "stats" / filename


def _download(url: str, dest: Path) -> str | None:
    """Fetch url to dest atomically (a partial file never stays); None on success, else the reason."""
    try:
        download(url, dest)
        return None
    except DownloadFailed as err:
        return err.reason


def _explicit(path: str | os.PathLike | None, env: str) -> Path | None:
    """A path given by flag (wins) or environment variable, or None."""
    value = path if path else os.environ.get(env)
    return Path(value).expanduser() if value else None


@dataclass(frozen=True)
class FIDFiles:
    """Resolved FID inputs. `stats` is None when the statistics must be computed from CIFAR-10."""

    inception: Path
    stats: Path | None
    stats_source: str  # "given" (flag/env), "published" (clean-fid's file), "computed" (local CIFAR-10)
    data_dir: Path
    split: str = "train"

    @property
    def computed_stats(self) -> Path:
        return self.data_dir / "fid" / stats_filename(self.split, computed=True)


def resolve_fid_files(
    inception_path: str | os.PathLike | None = None,
    stats_path: str | os.PathLike | None = None,
    data_dir: str | os.PathLike = "./data",
    download: bool = True,
    split: str = "train",
) -> FIDFiles:
    """Find (or download) the Inception weights and the reference statistics of CIFAR-10 `split`
    (train or test); cheap when cached.

    Raises FIDUnavailable naming the missing files and where to put them. When the published
    statistics are missing, the local CIFAR-10 must be reachable instead (it is checked, and
    downloaded if `download`); `stats` is then None and ``FIDScorer.prepare`` computes them.
    """
    data_dir, folder = Path(data_dir), Path(data_dir) / "fid"
    published, computed = stats_filename(split), stats_filename(split, computed=True)
    stats_url = f"{STATS_BASE_URL}/{published}"
    for given, env, what in ((inception_path, INCEPTION_ENV, "--fid_inception_path"), (stats_path, STATS_ENV, "--fid_stats_path")):
        path = _explicit(given, env)
        if path is not None and not path.is_file():
            raise FIDUnavailable(f"{what} (or ${env}) points at {path}, which does not exist.")
    problems = []

    inception = _explicit(inception_path, INCEPTION_ENV)
    if inception is not None and inception.name != INCEPTION_FILENAME:
        # clean-fid's loader takes a folder and a fixed file name.
        raise FIDUnavailable(f"the Inception weights must be named {INCEPTION_FILENAME}, not {inception.name}.")
    if inception is None:
        inception = next((p for p in (folder / INCEPTION_FILENAME, cleanfid_cache_path(INCEPTION_FILENAME)) if p.is_file()), None)
    if inception is None:
        why = _download(INCEPTION_URL, folder / INCEPTION_FILENAME) if download else "downloading is off"
        if why is None:
            inception = folder / INCEPTION_FILENAME
        else:
            problems.append((f"{INCEPTION_FILENAME} (from {INCEPTION_URL})", why))

    stats, source = _explicit(stats_path, STATS_ENV), "given"
    if stats is None:
        source = "published"
        stats = next((p for p in (folder / published, cleanfid_cache_path(published)) if p.is_file()), None)
    if stats is None and (folder / computed).is_file():
        stats, source = folder / computed, "computed"
    if stats is None:
        why = _download(stats_url, folder / published) if download else "downloading is off"
        if why is None:
            stats = folder / published
        else:
            # Computable from the split's images with the same extractor, if CIFAR-10 is at hand.
            try:
                ensure_cifar10(data_dir, download=download)
                source = "computed"
            except DataError:
                problems.append((f"{published} (from {stats_url}, or CIFAR-10 in {data_dir} to compute it)", why))

    if problems:
        names = " and ".join(name for name, _ in problems)
        reasons = "; ".join(dict.fromkeys(why for _, why in problems))  # unique, in order
        raise FIDUnavailable(
            f"FID is unavailable: put {names} in {folder}/ (or pass --fid_inception_path / "
            f"--fid_stats_path, env {INCEPTION_ENV} / {STATS_ENV}); fetching failed ({reasons})."
        )
    return FIDFiles(inception=inception, stats=stats, stats_source=source, data_dir=data_dir, split=split)


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def load_inception(path: str | os.PathLike, device: torch.device | str = "cpu") -> FeatureExtractor:
    """clean-fid's legacy_tensorflow extractor: images [B, 3, H, W] in [0, 255] -> features [B, 2048].

    The images go to the network as float32 [0, 255] unresized (it resizes to 299 inside), as clean-fid
    feeds them; no DataParallel (clean-fid's default breaks on multi-GPU hosts).
    """
    from cleanfid.inception_torchscript import InceptionV3W

    path = Path(path)
    try:
        with warnings.catch_warnings():
            # The published weights exist only as TorchScript; recent torch versions warn on every load.
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated", category=FutureWarning)
            model = InceptionV3W(str(path.parent), download=False, resize_inside=True).to(device).eval()
    except Exception as err:  # a truncated or foreign file: torch.jit raises RuntimeError / ValueError
        raise FIDUnavailable(f"{path} is not the Inception torchscript file ({type(err).__name__}): download it again from {INCEPTION_URL}.") from err

    def extract(images: Tensor) -> Tensor:
        return model(images.to(device, torch.float32))

    return extract


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) from a statistics .npz with keys `mu` and `sigma`."""
    try:
        with np.load(path) as stats:
            mu, sigma = stats["mu"], stats["sigma"]
    except (OSError, KeyError, ValueError) as err:
        raise FIDUnavailable(f"{path} is not an FID statistics file with 'mu' and 'sigma' ({type(err).__name__}).") from err
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise FIDUnavailable(f"{path} holds mu {mu.shape} and sigma {sigma.shape}: not [D] and [D, D].")
    return mu, sigma


def save_statistics(path: Path, mu: np.ndarray, sigma: np.ndarray) -> None:
    """np.savez_compressed(mu=, sigma=), atomically (no half-written cache; the temp file of a writer
    killed on this host is removed first)."""
    atomic_write(path, lambda f: np.savez_compressed(f, mu=mu, sigma=sigma))


@dataclass
class FIDResult:
    fid: float
    mean_nfe: float
    num_gen: int
    seconds: float
    samples: Tensor | None  # uint8 [num_gen, 3, H, W] when kept
    features: np.ndarray  # float64 [num_gen, D], in sample order (for KID and per-class FID)


class FIDScorer:
    """A feature extractor and the reference statistics: FID of any set of images against them."""

    def __init__(self, extractor: FeatureExtractor, ref_mu: np.ndarray, ref_sigma: np.ndarray,
                 stats_path: Path | None = None, stats_source: str = "given", batch_size: int = 500):
        self.extractor, self.ref_mu, self.ref_sigma = extractor, ref_mu, ref_sigma
        self.stats_path, self.stats_source, self.batch_size = stats_path, stats_source, batch_size

    @classmethod
    def prepare(
        cls,
        inception_path: str | os.PathLike | None = None,
        stats_path: str | os.PathLike | None = None,
        data_dir: str | os.PathLike = "./data",
        download: bool = True,
        device: torch.device | str = "cpu",
        batch_size: int = 500,
        extractor: FeatureExtractor | None = None,
        split: str = "train",
    ) -> FIDScorer:
        """Resolve the files, load Inception (or use `extractor`) and the statistics of `split`.

        If the published statistics are unavailable they are computed here from the CIFAR-10 images
        of `split` (50,000 train images through Inception: about a minute on a GPU) and cached under
        data_dir.
        """
        files = resolve_fid_files(inception_path, stats_path, data_dir, download, split)
        extractor = extractor or load_inception(files.inception, device)
        if files.stats is not None:
            mu, sigma = load_statistics(files.stats)
            return cls(extractor, mu, sigma, files.stats, files.stats_source, batch_size)
        images, _ = load_cifar10(data_dir, train=split == "train", download=download)
        mu, sigma = feature_statistics(extract_features(extractor, images, batch_size))
        save_statistics(files.computed_stats, mu, sigma)
        return cls(extractor, mu, sigma, files.computed_stats, "computed", batch_size)

    def features(self, images: Tensor) -> np.ndarray:
        """uint8 images [N, 3, H, W] -> float64 features [N, D]."""
        return extract_features(self.extractor, images, self.batch_size)

    def fid_of_features(self, features: np.ndarray) -> float:
        mu, sigma = feature_statistics(features)
        return frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma)

    def fid_of_batches(self, batches: Iterable[Tensor]) -> float:
        """FID of all images in `batches` (uint8 [b, 3, H, W] each), featurised batch by batch."""
        return self.fid_of_features(np.concatenate([self.features(b) for b in batches]))

    def evaluate_net(
        self,
        net: torch.nn.Module,
        num_gen: int = 50_000,
        batch_size: int = 1024,
        method: str = "dopri5",
        steps: int = 100,
        tol: float = 1e-5,
        seed: int = 0,
        keep_samples: bool = False,
        world: World | None = None,
        progress: bool = True,
        stop: Callable[[], bool] | None = None,
        guidance: Guidance | None = None,
    ) -> FIDResult | None:
        """Sample `num_gen` images from `net` (see sampling.py) and score them as they come.

        `progress` draws a bar over the samples on rank 0. Under torchrun (`world` of size > 1) each
        rank samples and featurises its own batches; rank 0 gathers the features in sample order
        and returns the FID one process would get (and the features, for other metrics of the same
        samples, see feature_metrics.py), the other ranks None. `stop` cuts it short
        (sampling.SamplingStopped, on every rank); a rank whose share fails makes every rank raise
        sampling.ShareFailed. `guidance`: a conditional net's labels and scale (see sampling.py).
        """
        start = time.perf_counter()
        features = []
        samples, mean_nfe = generate_samples(net, num_gen, batch_size, method, steps, tol, seed,
                                             on_batch=lambda images: features.append(self.features(images)),
                                             keep=keep_samples, world=world, progress=progress, stop=stop,
                                             guidance=guidance)
        features = gather_batches(features, world)  # every share ended well (generate_samples): no wait here
        if features is None:
            return None
        features = np.concatenate(features)
        return FIDResult(fid=self.fid_of_features(features), mean_nfe=mean_nfe, num_gen=num_gen,
                         seconds=time.perf_counter() - start, samples=samples, features=features)
