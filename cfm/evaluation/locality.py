"""Held-out locality: the local and anchor losses of a trained net on fixed single-cluster batches.

Training logs the local (or anchor) loss on the batches it trains on, each run on its own draws.
To compare plain, locality and anchor runs, every checkpoint is scored here on the same batches of
data none of them trained on (the CIFAR-10 test split, clustered per class as training clusters the
train split) with the same noise and times:

    x1, cluster = sampler.next_batch()        one K-means cluster of the split, flipped at random
    x0 ~ N(0, I), t ~ U(0, 1)                 the noise and time of loss_fm and of the anchor term
    local:   a fresh t', permutation s of x1 and eps     (LocalRegularizer.extra_inputs)
    anchor:  a fresh eps, e = the centroid of x1's cluster over all its members in the split
             (AnchorRegularizer.extra_inputs, published pairing)
    loss_fm: the checkpoint's path at (x0, x1, t); its OT draw and eps from a second stream, so that
             the draws above do not depend on the path

Every draw comes from CPU generators seeded with `seed`, so a seed fixes the numbers on any device
and for any checkpoint. The net sees all rows of a batch in one call (``B + 2B + 2B`` rows: main,
local, anchor; GroupNorm is per sample, so the result is that of separate calls), and the losses
are the regularizers' own (the published formulas, see regularizers.py)::

    local_loss         = mean (v(u_t, t') - v(s_t, t') + s - u)^2
    anchor_loss_full   = mean (v(x_t, t) - v(e_t, t) + e - x1)^2
    anchor_loss_simple = mean (v(x_t, t) - v(e_t, t))^2
    loss_fm            = mean (v(xt, t) - ut)^2

Usage::

    batches = HeldOutBatches(images, labels, batch_size=128, num_subclasses=25, seed=0,
                             matcher=make_matcher("otcfm"))
    values = evaluate(net, batches, num_batches=100)     # name -> float64 [num_batches]
    mean, se = mean_and_error(values["local_loss"])
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from cfm.evaluation.constants import LOCALITY_TERMS
from cfm.method.flow_matching import FlowMatcher
from cfm.method.regularizers import ANCHOR_LOSS_TYPES, AnchorRegularizer, LocalRegularizer
from cfm.method.samplers import ClassConditionedSampler

# The path's stream (OT draw, eps of loss_fm) is seeded apart from the shared one, so that a path
# that draws more (otcfm) or less (icfm) never shifts the draws of the locality terms.
PATH_SEED_OFFSET = 1_000_003
# The values `evaluate` returns, in the order they are reported.
TERMS = LOCALITY_TERMS


@dataclass
class HeldOutBatch:
    """Where the net is evaluated for one batch of B images, and what the losses compare with.

    Attributes:
        t: ``[5B]`` times: the main rows' t, the local rows' t' (twice), the main t (twice).
        x: ``[5B, 3, 32, 32]`` inputs: the path's xt, then u_t, s_t, then x_t, e_t.
        ut: ``[B, ...]`` the path's target velocity.
        local: ``[B, ...]`` u - s (the local loss's context).
        anchor: ``(e, x1)``, ``[B, ...]`` each (the anchor loss's context).
        classes: int64 ``[B]`` the CIFAR-10 class of the batch's images (one cluster: one class).
    """

    t: Tensor
    x: Tensor
    ut: Tensor
    local: Tensor
    anchor: tuple[Tensor, Tensor]
    classes: Tensor


class HeldOutBatches:
    """A seeded stream of `HeldOutBatch`es from one data split (see the module docstring).

    Args:
        images: uint8 ``[N, 3, 32, 32]`` (CPU), the split to score on.
        labels: int ``[N]`` CIFAR-10 classes.
        batch_size: B; a cluster smaller than B fills the batch with repeats (as in training).
        num_subclasses, cluster_seed, algorithm, cache_dir: the clustering, as training's
            (`samplers.cluster_assignments`).
        seed: seeds the cluster and image order, flips, noise, times, permutations.
        matcher: the checkpoint's path (for loss_fm); its ``sigma`` is also the regularizers'.
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, num_subclasses: int, seed: int,
                 matcher: FlowMatcher, cluster_seed: int = 42, algorithm: str = "minibatch",
                 cache_dir: str | os.PathLike | None = None):
        self.sampler = ClassConditionedSampler(images, labels, batch_size, num_subclasses, seed=seed,
                                               cache_dir=cache_dir, cluster_seed=cluster_seed, algorithm=algorithm)
        self.matcher = matcher
        self.local = LocalRegularizer(weight=1.0, sigma=matcher.sigma)
        self.anchors = {kind: AnchorRegularizer(1.0, matcher.sigma, kind, images, self.sampler.assignment,
                                                self.sampler.num_clusters, centroid_samples=0)
                        for kind in ANCHOR_LOSS_TYPES}
        centroids = self.anchors["full"].compute_centroids()  # all members: nothing random, computed once
        for anchor in self.anchors.values():
            anchor.centroids = centroids
        self.generator = torch.Generator().manual_seed(seed)
        self.path_generator = torch.Generator().manual_seed(seed + PATH_SEED_OFFSET)

    def next_batch(self) -> HeldOutBatch:
        """Draw the next batch: images, noise, times and every draw of the three terms (CPU)."""
        x1, cluster = self.sampler.next_batch()
        g = self.generator
        x0 = torch.randn(x1.shape, generator=g)
        t = torch.rand(len(x1), generator=g)
        sample = self.matcher.sample(x0, x1, t=t, generator=self.path_generator)
        t_local, x_local, local, _ = self.local.extra_inputs(x1, x0, cluster, None, generator=g)
        t_anchor, x_anchor, anchor, _ = self.anchors["full"].extra_inputs(x1, x0, cluster, sample, generator=g)
        return HeldOutBatch(t=torch.cat([sample.t, t_local, t_anchor]), x=torch.cat([sample.xt, x_local, x_anchor]),
                            ut=sample.ut, local=local, anchor=anchor,
                            classes=cluster.div(self.sampler.num_subclasses, rounding_mode="floor"))


@torch.no_grad()
def evaluate(net: torch.nn.Module, batches: HeldOutBatches, num_batches: int, device: torch.device | str = "cpu",
             progress: bool = False, class_labels: bool = False) -> dict[str, Tensor]:
    """The four losses of `net` (called as ``net(t, x)``) on the next `num_batches` batches.

    `class_labels`: a class-conditioned net is called as ``net(t, x, y)`` with y the batch's class on
    all 5B rows (every row is an image of the batch's cluster, or a point between two of them, or
    its centroid: all of one class), the labels its training gave those rows; without it a
    conditional net takes ``net(t, x)`` as the null label.

    Returns name -> float64 ``[num_batches]`` (CPU) for each of :data:`TERMS`, one value per batch.
    The batches are drawn on the CPU and sent to `device`; the values come back in one copy at the end.
    """
    values = {name: [] for name in TERMS}
    for _ in tqdm(range(num_batches), desc="locality", disable=not progress, dynamic_ncols=True):
        batch = batches.next_batch()
        size = len(batch.ut)
        y = (batch.classes.repeat(5).to(device),) if class_labels else ()
        v = net(batch.t.to(device), batch.x.to(device), *y)
        vt, v_local, v_anchor = v.split([size, 2 * size, 2 * size])
        anchor = tuple(part.to(device) for part in batch.anchor)
        values["local_loss"].append(batches.local.loss(None, v_local, batch.local.to(device)))
        for kind, regularizer in batches.anchors.items():
            values[f"anchor_loss_{kind}"].append(regularizer.loss(None, v_anchor, anchor))
        values["loss_fm"].append(F.mse_loss(vt, batch.ut.to(device)))
    stacked = torch.stack([torch.stack(values[name]) for name in TERMS]).double().cpu()
    return dict(zip(TERMS, stacked))


def mean_and_error(values: Tensor) -> tuple[float, float]:
    """Mean and standard error ``std / sqrt(n)`` (unbiased std) of per-batch values ``[n]``; the
    error is NaN for a single batch."""
    n = len(values)
    error = values.std().item() / math.sqrt(n) if n > 1 else math.nan
    return values.mean().item(), error
