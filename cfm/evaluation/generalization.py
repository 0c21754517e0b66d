"""Generalization of a trained flow: do its samples copy training images, and does it fit its
training images better than unseen ones?

**Nearest-neighbour memorization** (Yoon et al. 2023; Gu et al. 2023, "On memorization in diffusion
models"). Training flips every image left-right with probability 1/2, so the set the net learns is
the training images y_i and their mirrors; the distance of an image x to training image i is

    d_i(x) = min(|x - y_i|, |x - flip(y_i)|)                     (L2 over the 3 x 32 x 32 pixels)

and x counts as memorized when its nearest training image is much nearer than the second nearest:

    d_(1)(x) < d_(2)(x) / 3,   i.e. ratio = d_(1) / d_(2) < 1/3   (order statistics over i)

Taking the minimum per i before ranking keeps a mirrored copy from counting as novel, and keeps an
image's own mirror from becoming its second neighbour. Images are compared as uint8 pixels, the
form samples are scored and saved in (compute_fid.py's samples); reported distances are the
root-mean-square pixel difference on the 0..255 scale, ``|x - y| / sqrt(3072)`` (the scale of
Gu et al.'s ``mem_ratio.py``); the ratio does not depend on the scale.

The search is exact: on integer pixels the squared distance ``|x|^2 + |y|^2 - 2 x.y`` is a sum of
integers below 2^53, which float64 (matrix products included, on any device; TF32 does not apply to
float64) represents exactly. So the result does not depend on the chunking, the device or the
number of processes, and ties are true ties.

**The train/test gap of the flow-matching loss.** ``loss_fm = mean (v(t, x_t) - u_t)^2`` on a fixed
set of training images and on as many test images, at the times ``t_k = (k + 1/2) / K`` (the
midpoints of K equal bins of [0, 1], so their mean is the midpoint rule for the loss under
t ~ U(0, 1)), with the same noise: batch b of the train set and batch b of the test set get the
same x0 (keyed by image position), the same t_k and the same path draws (OT pairing, eps), so
their difference is a paired one. Per-batch losses give means and standard errors over batches.

**Label-conditioned nets.** Each sample was drawn with a label, so memorization is also counted per
CIFAR-10 class (a cluster label ``class * S + sub`` counts for its class): the fraction memorized
with its 95% Wilson interval, and how often the nearest training image is of the requested class
(`per_class_memorization`). The loss gap evaluates ``v(t, x | y)`` with each image's own class where
the net's labels are classes (training fit that field on 90% of its rows, and test images have
classes too, so the comparison stays paired); the labels of a cluster-conditioned net are clusters
of the training split only, which a test image does not have, so there both splits get the null label.

Usage::

    search = FlipNeighbours(train_images, device)              # uint8 [N, 3, 32, 32]
    neighbours = search.search(samples)                        # uint8 [Q, 3, 32, 32]
    memorization_summary(neighbours)                           # fraction memorized, ratio quantiles, ...
    train, test = loss_gap_images(train_images, test_images, num_images=10000, seed=0)
    gap = loss_gap(net, matcher, train, test, loss_times(10), batch_size=128, seed=0)
    gap.summary()                                              # per time and overall, with standard errors
    per_class_memorization(neighbours, guidance.label_classes(sample_labels, 10), train_labels)   # a conditional net's
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from cfm.evaluation.constants import MEMORIZATION_RATIO  # d_(1) < d_(2) / 3: memorized
from cfm.evaluation.locality import mean_and_error
from cfm.evaluation.sampling import batch_ranges, gather_batches, noise
from cfm.io.cifar10 import to_model_range
from cfm.io.distributed import World, process_rank
from cfm.method.flow_matching import FlowMatcher

# Quantiles of the ratio d_(1) / d_(2) reported; the low ones say how close the tail is to copying.
RATIO_QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5)
# The ratio lies in [0, 1]: its histogram is stored with this many equal bins, for plot_results.py.
RATIO_BINS = 50
# The loss gap's noise and path draws are keyed apart from the samples' noise of the same seed.
LOSS_SEED_OFFSET = 2_000_003


# The normal quantile of a two-sided 95% interval.
Z_95 = 1.959963984540054


def wilson_interval(fraction: float, num: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (`fraction` of `num` trials):

        centre = (p + z^2 / 2n) / (1 + z^2 / n),   half = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n)

    Unlike p ± z sqrt(p (1 - p) / n), it does not collapse to a point at p = 0 or 1 (0 of 64 is
    0-5.7%, not "0 ± 0%"), and it stays inside [0, 1]."""
    scale = 1 + z * z / num
    centre = (fraction + z * z / (2 * num)) / scale
    half = z * math.sqrt(fraction * (1 - fraction) / num + z * z / (4 * num * num)) / scale
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Neighbours:
    """The nearest and second-nearest training images of each of N queries (flips included).

    Attributes:
        distance: float64 ``[N, 2]`` d_(1), d_(2): RMS pixel difference on the 0..255 scale.
        index: int64 ``[N, 2]`` the training images' indices.
        flipped: bool ``[N, 2]`` whether the mirror of that training image was the nearer orientation.
    """

    distance: Tensor
    index: Tensor
    flipped: Tensor

    @property
    def ratio(self) -> Tensor:
        """float64 ``[N]`` d_(1) / d_(2) in [0, 1]; 0 where d_(2) = 0 (then d_(1) = 0 too: the query
        is a copy of a training image that the training set holds twice)."""
        nearest, second = self.distance.unbind(1)
        return torch.where(second > 0, nearest / second.clamp_min(1e-300), torch.zeros_like(nearest))

    @property
    def memorized(self) -> Tensor:
        """bool ``[N]``: d_(1) < d_(2) / 3."""
        return self.ratio < MEMORIZATION_RATIO

    @classmethod
    def cat(cls, parts: Sequence[Neighbours]) -> Neighbours:
        return cls(*(torch.cat([getattr(p, name) for p in parts]) for name in ("distance", "index", "flipped")))

    def cpu(self) -> Neighbours:
        return Neighbours(self.distance.cpu(), self.index.cpu(), self.flipped.cpu())


class FlipNeighbours:
    """Exact search of the two nearest training images, flips included (see the module docstring).

    Args:
        references: uint8 ``[R, C, H, W]`` the training images (R >= 2); kept as uint8 on `device`.
        device: where the distances are computed.
        chunk_size: references per distance block: a block costs ``3 x Q x chunk_size`` float64
            for Q queries (1024 x 10000: 250 MB).
    """

    def __init__(self, references: Tensor, device: torch.device | str = "cpu", chunk_size: int = 10000):
        if references.dtype != torch.uint8 or references.ndim != 4 or len(references) < 2:
            raise ValueError(f"references must be uint8 [R >= 2, C, H, W], got {references.dtype} "
                             f"{tuple(references.shape)}.")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
        self.device = torch.device(device)
        self.image_shape = tuple(references.shape[1:])
        self.references = references.to(self.device).flatten(1)  # [R, D]
        self.chunk_size = chunk_size
        self.num_pixels = self.references.shape[1]
        self.norms = torch.cat([chunk.double().square().sum(1) for chunk in self.references.split(chunk_size)])

    @torch.no_grad()
    def search(self, queries: Tensor) -> Neighbours:
        """The two nearest training images of each query: uint8 ``[Q, C, H, W]`` on any device ->
        `Neighbours` on the CPU.

        ``|x - flip(y)| = |flip(x) - y|``, so the mirrors are searched by flipping the queries; per
        block, each training image keeps the nearer orientation before the two nearest are merged
        with those of the blocks before.
        """
        if queries.dtype != torch.uint8 or tuple(queries.shape[1:]) != self.image_shape:
            raise ValueError(f"queries must be uint8 [Q, {', '.join(map(str, self.image_shape))}], got {queries.dtype} "
                             f"{tuple(queries.shape)}.")
        x = queries.to(self.device).double()
        oriented = torch.stack([x.flatten(1), x.flip(-1).flatten(1)])  # [2, Q, D]: x, then flip(x)
        query_norms = oriented[0].square().sum(1)  # [Q]: a flip keeps the norm
        best = torch.full((len(x), 0), math.inf, dtype=torch.float64, device=self.device)
        best_index = torch.zeros((len(x), 0), dtype=torch.int64, device=self.device)
        best_flipped = torch.zeros((len(x), 0), dtype=torch.bool, device=self.device)
        for start in range(0, len(self.references), self.chunk_size):
            y = self.references[start:start + self.chunk_size].double()  # [c, D]
            norms = self.norms[start:start + len(y)]
            squared = query_norms[:, None] + norms[None, :] - 2 * (oriented @ y.T)  # [2, Q, c], exact integers
            squared, flipped = squared.min(0)  # [Q, c]: the nearer orientation of each training image
            value, where = squared.topk(min(2, len(y)), dim=1, largest=False)
            value = torch.cat([best, value], 1)
            index = torch.cat([best_index, where + start], 1)
            flip = torch.cat([best_flipped, flipped.gather(1, where).bool()], 1)
            best, keep = value.topk(min(2, value.shape[1]), dim=1, largest=False)
            best_index, best_flipped = index.gather(1, keep), flip.gather(1, keep)
        distance = (best.clamp_min(0) / self.num_pixels).sqrt()
        return Neighbours(distance, best_index, best_flipped).cpu()

    def search_across_ranks(self, queries: Tensor, batch_size: int, world: World | None = None,
                            progress: bool = False) -> Neighbours | None:
        """`search` of uint8 queries ``[Q, C, H, W]`` (CPU) in batches of `batch_size`, batch k on
        rank k mod W (``sampling.batch_ranges``); all Q, in order, on rank 0 (None on the others)."""
        rank, size = (world.rank, world.size) if world is not None else (0, 1)
        ranges = batch_ranges(len(queries), batch_size, rank, size)
        found = [self.search(queries[r.start:r.stop])
                 for r in tqdm(ranges, desc="nearest neighbours", disable=not progress or process_rank() != 0,
                               dynamic_ncols=True)]
        found = gather_batches(found, world)
        return None if found is None else Neighbours.cat(found)


def memorization_summary(neighbours: Neighbours) -> dict:
    """The numbers of N searched images, for a results record:

    ``num``; ``memorized_fraction`` (ratio < 1/3) and its binomial standard error
    ``sqrt(p (1 - p) / N)``; ``ratio_quantiles`` {q: quantile of d_(1) / d_(2)} for
    RATIO_QUANTILES; ``nearest_distance`` (mean d_(1)) and its standard error; ``ratio_histogram``:
    counts in RATIO_BINS equal bins of [0, 1].
    """
    ratio = neighbours.ratio.numpy()
    n = len(ratio)
    fraction = float(np.mean(ratio < MEMORIZATION_RATIO))
    nearest, nearest_se = mean_and_error(neighbours.distance[:, 0])
    return {
        "num": n,
        "memorized_fraction": fraction,
        "memorized_fraction_se": math.sqrt(fraction * (1 - fraction) / n),
        "ratio_quantiles": {f"{q:g}": float(np.quantile(ratio, q)) for q in RATIO_QUANTILES},
        "nearest_distance": nearest,
        "nearest_distance_se": nearest_se,
        "ratio_histogram": np.histogram(ratio, bins=RATIO_BINS, range=(0.0, 1.0))[0].tolist(),
    }


def _rate(name: str, hits: Tensor) -> dict:
    """``{name}_fraction`` of the bool ``[n]`` `hits` and its 95% Wilson interval ``{name}_ci95``."""
    fraction = hits.double().mean().item()
    return {f"{name}_fraction": fraction, f"{name}_ci95": list(wilson_interval(fraction, len(hits)))}


def per_class_memorization(neighbours: Neighbours, classes: Tensor, train_labels: Tensor) -> dict:
    """Memorization per class of N searched images of known (or requested) class.

    Args:
        neighbours: the search of the N images.
        classes: int64 ``[N]`` each image's class: for a conditional net's samples the class of the
            label it was sampled with (`label_classes`), for test images their own.
        train_labels: int64 ``[R]`` the classes of the searched training images.

    Returns ``nearest_class_fraction`` (how often the nearest training image, ``train_labels[index_1]``,
    is of the image's class) with its 95% Wilson interval ``nearest_class_ci95``, and ``per_class``
    {class: {num, memorized_fraction, memorized_ci95, nearest_class_fraction, nearest_class_ci95}}
    for each class present. For samples of a conditional net the first says whether the samples look
    (in pixels) like their class; the test images' own fraction, a nearest-neighbour classifier's
    accuracy, is the baseline it compares with.
    """
    memorized = neighbours.memorized
    same = train_labels.cpu()[neighbours.index[:, 0]] == classes.cpu()
    per_class = {}
    for c in classes.unique().tolist():
        rows = classes.cpu() == c
        per_class[str(c)] = {"num": int(rows.sum()), **_rate("memorized", memorized[rows]),
                             **_rate("nearest_class", same[rows])}
    return {**_rate("nearest_class", same), "per_class": per_class}


def most_memorized_grid(queries: Tensor, neighbours: Neighbours, references: Tensor, num: int) -> Tensor:
    """uint8 ``[3 num, C, H, W]``: the `num` queries of lowest ratio (most memorized first), then
    their nearest training images, then their second nearest, each in the orientation that matched;
    drawn with ``nrow=num`` it is three rows: samples over their neighbours."""
    order = neighbours.ratio.argsort()[:num]
    rows = [queries[order]]
    for k in range(2):
        images = references[neighbours.index[order, k]]
        rows.append(torch.where(neighbours.flipped[order, k, None, None, None], images.flip(-1), images))
    return torch.cat(rows)


def loss_times(num_times: int) -> Tensor:
    """float32 ``[K]`` ``t_k = (k + 1/2) / K``: 0.05, 0.15, ..., 0.95 for K = 10."""
    return (torch.arange(num_times, dtype=torch.float64) + 0.5).div(num_times).float()


def loss_gap_indices(num_train: int, num_test: int, num_images: int, seed: int) -> tuple[Tensor, Tensor]:
    """int64 ``[num_images]`` twice: which training images and which test images the loss gap uses, each
    set in a seeded random order (one CPU generator seeded with `seed`: the training subset first, then
    the test order). Index the images with them, and the labels where a conditional net needs them."""
    if not 0 < num_images <= min(num_train, num_test):
        raise ValueError(f"num_images={num_images} must be positive and at most the {num_test} test and "
                         f"{num_train} training images.")
    g = torch.Generator().manual_seed(seed)
    train = torch.randperm(num_train, generator=g)[:num_images]
    test = torch.randperm(num_test, generator=g)[:num_images]
    return train, test


def loss_gap_images(train_images: Tensor, test_images: Tensor, num_images: int, seed: int) -> tuple[Tensor, Tensor]:
    """The images of `loss_gap_indices`: `num_images` training images and as many test images."""
    train, test = loss_gap_indices(len(train_images), len(test_images), num_images, seed)
    return train_images[train], test_images[test]


def _path_generator(seed: int, batch: int, time: int) -> torch.Generator:
    """The CPU generator of batch `batch` at time index `time`: the same for both splits."""
    key = np.random.SeedSequence([seed % 2**64, LOSS_SEED_OFFSET, batch, time]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(key))


def _row_labels(labels: Tensor, sample) -> Tensor:
    """The label of each row of `sample` (``FlowSample``): its image's, through OT's re-pairing."""
    return labels if sample.index is None else labels[sample.index.cpu()]


@dataclass
class LossGap:
    """Per-batch ``loss_fm`` on the train and the test images at each time.

    Attributes:
        times: float32 ``[K]``.
        train, test: float64 ``[num_batches, K]`` the mean loss of batch b at time t_k.
    """

    times: Tensor
    train: Tensor
    test: Tensor

    def summary(self) -> dict:
        """For a results record: ``times``; per time ``train``, ``test``, ``gap`` = test - train (lists
        of K) and their ``_se`` (standard errors over batches; the gap's is that of the paired
        differences); overall ``loss_train``, ``loss_test``, ``loss_gap`` (the mean over times) and
        their ``_se``; ``num_batches``."""
        values = {"train": self.train, "test": self.test, "gap": self.test - self.train}
        out = {"times": [round(float(t), 6) for t in self.times], "num_batches": len(self.train)}
        for name, per_batch in values.items():
            per_time = [mean_and_error(per_batch[:, k]) for k in range(per_batch.shape[1])]
            out[name] = [mean for mean, _ in per_time]
            out[f"{name}_se"] = [error for _, error in per_time]
        for name, per_batch in values.items():
            out[f"loss_{name}"], out[f"loss_{name}_se"] = mean_and_error(per_batch.mean(1))
        return out


@torch.no_grad()
def loss_gap(net: torch.nn.Module, matcher: FlowMatcher, train_images: Tensor, test_images: Tensor, times: Tensor,
             batch_size: int, seed: int, world: World | None = None, device: torch.device | str = "cpu",
             progress: bool = False, labels: tuple[Tensor, Tensor] | None = None) -> LossGap | None:
    """``loss_fm`` of `net` (called as ``net(t, x)``, or ``net(t, x, y)`` with `labels`) on the train
    and test images (uint8 ``[M, C, H, W]`` each, CPU) at each of `times`, on the path of `matcher`,
    in ``M // batch_size`` whole batches (the OT pairing of otcfm is that of a training batch).

    `labels`: int64 ``[M]`` for each split, the label a conditional net gets for each image; a row
    re-paired by OT keeps its image's label (``FlowSample.index``), as in training.

    Batch b of either split: x0 = ``sampling.noise`` of positions ``b B .. (b + 1) B - 1`` (seed
    offset by LOSS_SEED_OFFSET); at time t_k the path's draws come from a generator keyed by
    (seed, b, k). Both are drawn on the CPU, so the numbers do not depend on the device; each split
    is its own net call (identical inputs give identical outputs). Under torchrun batch b runs on
    rank b mod W (``sampling.batch_ranges``): the result is the one process's. Returns the
    `LossGap` on rank 0, None on the others.
    """
    if len(train_images) != len(test_images) or len(train_images) < batch_size:
        raise ValueError(f"the train ({len(train_images)}) and test ({len(test_images)}) images must be as many, "
                         f"and at least one batch of {batch_size}.")
    rank, size = (world.rank, world.size) if world is not None else (0, 1)
    num = len(train_images) // batch_size * batch_size
    ranges = batch_ranges(num, batch_size, rank, size)
    per_batch = []  # [2, K] on the device per batch: no host sync until the end
    for indices in tqdm(ranges, desc="loss gap", disable=not progress or process_rank() != 0, dynamic_ncols=True):
        batch = indices.start // batch_size
        x0 = noise(indices, tuple(train_images.shape[1:]), seed + LOSS_SEED_OFFSET)
        losses = []
        for images, split_labels in zip((train_images, test_images), labels or (None, None)):
            x1 = to_model_range(images[indices.start:indices.stop])
            for k, t in enumerate(times.tolist()):
                sample = matcher.sample(x0, x1, t=t, generator=_path_generator(seed, batch, k))
                y = () if split_labels is None else (_row_labels(split_labels[indices.start:indices.stop], sample)
                                                     .to(device),)
                v = net(sample.t.to(device), sample.xt.to(device), *y)
                losses.append(F.mse_loss(v.float(), sample.ut.to(device)))
        per_batch.append(torch.stack(losses).view(2, len(times)))
    per_batch = list(torch.stack(per_batch).double().cpu()) if per_batch else []
    per_batch = gather_batches(per_batch, world)
    if per_batch is None:
        return None
    stacked = torch.stack(per_batch)  # [num_batches, 2, K]
    return LossGap(times, stacked[:, 0], stacked[:, 1])
