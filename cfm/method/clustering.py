"""K-means sub-clusters of each CIFAR-10 class (MiniBatchKMeans as published, or Lloyd), cached by data digest.

Each of the 10 classes is split into `num_subclasses` K-means clusters on raw pixels (mapped to
[-1, 1] and flattened to 3072 dims); cluster `class * num_subclasses + sub` is the flattened id.
The published defaults (25 sub-clusters, MiniBatchKMeans, random_state 42) are defined here once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from cfm.config.choices import CLUSTER_ALGORITHMS
from cfm.io.checkpoint_io import atomic_save
from cfm.io.cifar10 import to_model_range
from cfm.io.errors import SaveError
from cfm.io.run_files import unwritable_reason

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


NUM_CLASSES = len(CIFAR10_CLASSES)


# Iterations are capped as published: for MiniBatchKMeans these are passes over the class; for Lloyd
# one iteration on 5000 x 3072 float32 points costs ~20-35 ms on one core, so ~3.5 s at most.
KMEANS_MAX_ITER = 100


MINIBATCH_SIZE = 1024


# Part of the cache file name: bump it when the clustering recipe changes, so old caches are ignored.
CACHE_VERSION = 1


log = logging.getLogger(__name__)


def data_digest(images: Tensor, labels: Tensor) -> str:
    """A 16-hex-digit SHA-256 digest of the data set (shape, uint8 pixels and labels).

    Hashes every byte (~0.1 s for CIFAR-10's 150 MB on one core), so any changed pixel or label
    gives another cache file.
    """
    digest = hashlib.sha256(repr(tuple(images.shape)).encode())
    digest.update(images.detach().cpu().contiguous().numpy().data)
    digest.update(labels.detach().cpu().to(torch.int64).contiguous().numpy().data)
    return digest.hexdigest()[:16]


def cache_path(cache_dir: str | os.PathLike, digest: str, num_subclasses: int, seed: int,
               algorithm: str = "minibatch") -> Path:
    """Where the assignment of data `digest` for (num_subclasses, seed, algorithm) is cached."""
    return Path(cache_dir) / f"kmeans_{digest}_k{num_subclasses}_seed{seed}_{algorithm}_v{CACHE_VERSION}.pt"


def kmeans_cache_dir(data_dir: str | os.PathLike) -> Path | None:
    """Where the training scripts cache K-means assignments: `data_dir` (next to the data), else
    `$XDG_CACHE_HOME/cifar10-flow-matching` (default `~/.cache/...`), else None (no cache, with a
    warning). A shared data folder is often read-only; the cache must never cost the run.
    """
    fallback = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cifar10-flow-matching"
    reasons = []
    for folder in (Path(data_dir), fallback):
        reason = unwritable_reason(folder)
        if reason is None:
            if reasons:
                log.warning("K-means cache in %s (%s).", folder, reasons[0])
            return folder
        reasons.append(reason)
    warnings.warn(f"the K-means assignment is not cached ({'; '.join(reasons)}): it is recomputed at every start.")
    return None


def cluster_assignments(
    images: Tensor,
    labels: Tensor,
    num_subclasses: int,
    seed: int,
    cache_dir: str | os.PathLike | None = None,
    algorithm: str = "minibatch",
) -> Tensor:
    """Flattened K-means cluster id of every image: `class * num_subclasses + sub`.

    Args:
        images: uint8 [N,3,32,32] (any device).
        labels: int [N], classes 0..9.
        num_subclasses: K-means clusters per class (1: the cluster is the class, no K-means).
        seed: K-means `random_state`; the same data and seed give the same clusters.
        cache_dir: if given, the assignment is read from / written to
            `{cache_dir}/kmeans_{data digest}_k{K}_seed{seed}_{algorithm}_v{version}.pt` (atomic write; a
            write that fails, say on a full disk, is a warning).
        algorithm: "minibatch" (the published MiniBatchKMeans) or "lloyd" (exact K-means); see
            :data:`CLUSTER_ALGORITHMS`. Both run on the un-flipped pixels.

    Returns:
        int64 [N] on the CPU, values in [0, 10 * num_subclasses). A class with fewer than
        `num_subclasses` images gets one cluster per image (with a warning), so some ids are empty.
    """
    _check_data(images, labels, num_subclasses)
    if algorithm not in CLUSTER_ALGORITHMS:
        raise ValueError(f"unknown clustering algorithm {algorithm!r}: choose one of {', '.join(CLUSTER_ALGORITHMS)}.")
    images, labels = images.detach().cpu(), labels.detach().cpu().to(torch.int64)
    if num_subclasses == 1 or cache_dir is None:
        return _kmeans_assignments(images, labels, num_subclasses, seed, algorithm)
    path = cache_path(cache_dir, data_digest(images, labels), num_subclasses, seed, algorithm)
    if path.is_file():
        try:
            assignment = check_assignment(torch.load(path, weights_only=True), labels, num_subclasses)
        except Exception as err:  # a truncated or foreign file: recompute and overwrite it
            warnings.warn(f"ignoring unusable cluster cache {path} ({type(err).__name__}: {err}); recomputing it.")
        else:
            log.info("cluster assignment read from %s", path)
            return assignment
    assignment = _kmeans_assignments(images, labels, num_subclasses, seed, algorithm)
    try:
        atomic_save(assignment, path)
    except SaveError as err:  # a cache is an optimisation: a full or read-only disk must not stop the run
        warnings.warn(f"the K-means assignment is not cached: cannot write {err.path} ({err.reason}).")
    else:
        log.info("cluster assignment written to %s", path)
    return assignment


def _kmeans_assignments(images: Tensor, labels: Tensor, num_subclasses: int, seed: int, algorithm: str) -> Tensor:
    """K-means per class on CPU data; see `cluster_assignments`.

    "minibatch" is the published call, ``MiniBatchKMeans(n_clusters=K, max_iter=100,
    random_state=seed, batch_size=min(1024, n), n_init="auto")`` on the class's n images in [-1, 1]
    flattened to 3072 dims (the published sampler ran it on randomly flipped images; here they are
    un-flipped, so the clusters are a function of the data and the seed alone).

    Classes are fitted concurrently, one per CPU core, each fit single-threaded. Why: scikit-learn's
    multi-threaded Lloyd loop (OpenMP, with BLAS inside) collapses when its cores are shared: on a
    busy 2-core machine one class took 20-50 s with 2 threads against 1.5-2.5 s with one. One thread
    per fit also makes the result independent of the machine's thread count.
    """
    # Imported here: scikit-learn takes ~1 s to import and only this function needs it.
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from threadpoolctl import threadpool_limits

    assignment = torch.empty(len(labels), dtype=torch.int64)
    members, clusters = [], []
    for cls in range(NUM_CLASSES):
        index = torch.nonzero(labels == cls).squeeze(1)
        k = min(num_subclasses, len(index))
        if k < num_subclasses:
            warnings.warn(
                f"class {cls} ({CIFAR10_CLASSES[cls]}) has {len(index)} images, fewer than "
                f"num_subclasses={num_subclasses}: it gets {k} clusters and ids "
                f"{cls * num_subclasses + k}..{(cls + 1) * num_subclasses - 1} stay empty."
            )
        assignment[index] = cls * num_subclasses
        if k > 1:  # one cluster (or an absent class) needs no fit
            members.append(index)
            clusters.append(k)

    def fit(index: Tensor, k: int) -> Tensor:
        # Per thread: the OpenMP thread count is a per-thread setting.
        with threadpool_limits(limits=1):
            # float32 halves the memory traffic of float64; the data are 8-bit anyway.
            points = to_model_range(images[index]).reshape(len(index), -1).numpy()
            if algorithm == "minibatch":
                kmeans = MiniBatchKMeans(n_clusters=k, max_iter=KMEANS_MAX_ITER, random_state=seed,
                                         batch_size=min(MINIBATCH_SIZE, len(index)), n_init="auto")
            else:
                kmeans = KMeans(n_clusters=k, n_init=1, max_iter=KMEANS_MAX_ITER, random_state=seed)
            return torch.from_numpy(kmeans.fit_predict(points)).to(torch.int64)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(1, min(len(members), cores))
    # The fits release the GIL, so threads run them in parallel with no copy of the data.
    with threadpool_limits(limits=1), ThreadPoolExecutor(workers) as pool:
        for index, sub in zip(members, pool.map(fit, members, clusters)):
            assignment[index] += sub
    return assignment


def _check_data(images: Tensor, labels: Tensor, num_subclasses: int) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be uint8 [N,C,H,W], got {images.dtype} {tuple(images.shape)}.")
    if labels.shape != (len(images),):
        raise ValueError(f"labels must have shape [{len(images)}] to match images, got {tuple(labels.shape)}.")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= NUM_CLASSES):
        raise ValueError(f"labels must lie in 0..{NUM_CLASSES - 1} (CIFAR-10 classes).")
    if num_subclasses < 1:
        raise ValueError(f"num_subclasses must be >= 1, got {num_subclasses}.")


def check_assignment(assignment, labels: Tensor, num_subclasses: int) -> Tensor:
    """Validate a stored assignment against the data; return it as a CPU int64 tensor.

    It must be an integer tensor [N] with ids in [0, 10 * num_subclasses) whose class part
    (`id // num_subclasses`) equals the label of every image: this catches another data set, a
    different `num_subclasses`, or a shuffled order.
    """
    labels = labels.detach().cpu().to(torch.int64)
    if not isinstance(assignment, Tensor) or assignment.dtype.is_floating_point or assignment.dtype == torch.bool:
        raise ValueError("assignment must be an integer tensor of cluster ids (e.g. a checkpoint's sampler assignment).")
    assignment = assignment.detach().cpu().to(torch.int64)
    if assignment.shape != labels.shape:
        raise ValueError(
            f"assignment has shape {tuple(assignment.shape)} but the data set has {len(labels)} images: "
            "pass the assignment saved with this data set, or none to recompute it."
        )
    num_clusters = NUM_CLASSES * num_subclasses
    if assignment.numel() and (int(assignment.min()) < 0 or int(assignment.max()) >= num_clusters):
        raise ValueError(
            f"assignment ids must lie in [0, {num_clusters}) for num_subclasses={num_subclasses}: "
            "pass the num_subclasses it was computed with."
        )
    if not torch.equal(torch.div(assignment, num_subclasses, rounding_mode="floor"), labels):
        raise ValueError(
            f"assignment does not match the labels for num_subclasses={num_subclasses}: it was computed "
            "for other data or another num_subclasses; pass the matching one, or none to recompute it."
        )
    return assignment
