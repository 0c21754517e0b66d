"""KID and per-class FID beside the global FID, on the same Inception features, against the images of
the reference split (CIFAR-10 train, as published, or test) one by one.

    KID            Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs"): the
                   unbiased MMD^2 between real and generated features [n, D] under the polynomial
                   kernel k(x, y) = (x.y / D + 1)^3, averaged over `subsets` random subsets of
                   `subset_size` features of each side (mean and standard deviation over subsets).
                   Computed by torchmetrics' ``KernelInceptionDistance`` on features we extract
                   ourselves (its feature network is an identity): 100 subsets of 1000, the
                   defaults of torchmetrics and clean-fid, or of all samples when fewer.
    per-class FID  the Frechet distance of the generated samples of class c against the statistics
                   of the reference images of class c (5000 per class in train, 1000 in test).
                   With 5000 samples a class FID is biased upward against a 50,000-sample FID:
                   compare class FIDs with each other, not with the global number.

Both need the reference images' features, not only their mean and covariance (the published
statistics file), so they are extracted once from the local CIFAR-10 with the FID's extractor and
cached with their labels as ``{data_dir}/fid/cifar10_legacy_tensorflow_{split}_32_features.npz``
(written atomically, reused by the next run). They are stored as float32, the precision Inception
returns: 50,000 x 2048 x 4 bytes = 410 MB for train (82 MB for test). The class statistics are
computed from them on use (10 covariances, seconds) rather than cached beside them: ten float64
2048 x 2048 covariances would take another 335 MB, and the features serve KID as well.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cfm.evaluation.fid import (FeatureExtractor, FIDUnavailable, extract_features, feature_statistics,
                                frechet_distance, stats_filename)
from cfm.io.atomic_files import atomic_write
from cfm.io.cifar10 import DataError, ensure_cifar10, load_cifar10
from cfm.io.errors import UserError, writing
from cfm.method.guidance import label_classes

# torchmetrics' and clean-fid's KID defaults.
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


def features_path(data_dir: str | Path, split: str = "train") -> Path:
    """Where the reference features of CIFAR-10 `split` are cached: {data_dir}/fid/..._features.npz."""
    return Path(data_dir) / "fid" / stats_filename(split).replace(".npz", "_features.npz")


def check_reference_features(data_dir: str | Path, split: str = "train", download: bool = True) -> Path:
    """The cache path of `split`'s reference features, checked before any sampling: present, or the
    local CIFAR-10 to compute it from is (downloaded if `download`); else FIDUnavailable, one
    sentence naming what to put where."""
    path = features_path(data_dir, split)
    if not path.is_file():
        try:
            ensure_cifar10(data_dir, download=download)
        except DataError as err:
            raise FIDUnavailable(f"KID and per-label FID need the features of the CIFAR-10 {split} images, computed "
                                 f"once into {path}: {err}") from err
    return path


@dataclass(frozen=True)
class ReferenceFeatures:
    """The reference images' features float32 ``[N, D]`` and CIFAR-10 classes int64 ``[N]``."""

    features: np.ndarray
    labels: np.ndarray
    path: Path

    @cached_property
    def class_statistics(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """class c -> (mu [D], sigma [D, D]) of the features of the reference images of class c (float64)."""
        return {int(c): feature_statistics(self.features[self.labels == c]) for c in np.unique(self.labels)}


def load_reference_features(extractor: FeatureExtractor, data_dir: str | Path, split: str = "train",
                            batch_size: int = 500, download: bool = True) -> ReferenceFeatures:
    """`split`'s reference features from the cache, else extracted from the local CIFAR-10 by
    `extractor` (50,000 train images: about a minute on a GPU) and cached atomically (a failed write
    is one sentence, `errors.SaveError`)."""
    path = check_reference_features(data_dir, split, download)
    if not path.is_file():
        images, labels = load_cifar10(data_dir, train=split == "train", download=download)
        features = extract_features(extractor, images, batch_size).astype(np.float32)
        with writing(path):
            atomic_write(path, lambda f: np.savez(f, features=features, labels=labels.numpy()))
    with np.load(path) as npz:
        return ReferenceFeatures(npz["features"], npz["labels"], path)


@dataclass(frozen=True)
class KID:
    """KID (mean over subsets of the unbiased MMD^2) and its standard deviation over the subsets."""

    kid: float
    kid_std: float
    subsets: int
    subset_size: int

    def describe(self) -> dict:
        """The fields of a results record (fid.jsonl)."""
        return {"kid": self.kid, "kid_std": self.kid_std, "kid_subsets": self.subsets,
                "kid_subset_size": self.subset_size}


def kernel_inception_distance(real: np.ndarray, fake: np.ndarray, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> KID:
    """KID of features `fake` [n, D] against `real` [m, D], in float64, by torchmetrics.

    Subsets of min(subset_size, n, m) rows (torchmetrics refuses larger ones). torchmetrics draws
    them with torch's global RNG; here from `seed`, inside ``fork_rng``, so the value is
    reproducible and the caller's RNG untouched. Its states are not synchronised across processes
    (``sync_on_compute=False``): under torchrun rank 0 alone calls this, on gathered features.
    """
    from torchmetrics.image.kid import KernelInceptionDistance  # imported here: only --kid needs it

    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():
        # "will save all extracted features in buffer": it is handed them, which is the point.
        warnings.filterwarnings("ignore", message=".*save all extracted features", category=UserWarning)
        metric = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=subsets, subset_size=size,
                                         sync_on_compute=False)
    metric.update(torch.from_numpy(np.asarray(real, dtype=np.float64)), real=True)
    metric.update(torch.from_numpy(np.asarray(fake, dtype=np.float64)), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return KID(float(mean), float(std), subsets, size)


def sample_classes(labels: Tensor, num_labels: int) -> np.ndarray:
    """The CIFAR-10 class int64 [num] of each sample from its label (class, or cluster
    ``class * S + sub``), checked before sampling: a UserError (one sentence) when the net's labels are
    not classes or clusters of them, or a class sampled gets fewer than 2 samples (no covariance)."""
    try:
        classes = label_classes(labels, num_labels).numpy()
    except ValueError as err:
        raise UserError(f"--per_label_fid needs class or cluster labels: {err}") from err
    counts = np.bincount(classes)
    if counts[counts > 0].min() < 2:
        raise UserError(f"--per_label_fid needs at least 2 samples of each class it scores, and {len(classes)} "
                        f"samples give one class {counts[counts > 0].min()}: raise --num_gen.")
    return classes


def per_class_fid(features: np.ndarray, classes: np.ndarray, reference: ReferenceFeatures) -> dict[str, float]:
    """{"c": FID of the samples of class c against the reference images of class c} for each class
    c among `classes` (samples' classes [n], features [n, D] in the same order), keys in class order."""
    out = {}
    for c in np.unique(classes):
        mu, sigma = feature_statistics(features[classes == c])
        out[str(int(c))] = frechet_distance(mu, sigma, *reference.class_statistics[int(c)])
    return out
