"""Classifier-free guidance (Ho & Salimans 2022; for flows, Zheng et al. 2023, "Guided Flows"): the
guided velocity of a label-conditioned net,

    v_w(t, x | y) = v(t, x | null) + w (v(t, x | y) - v(t, x | null)),

w = 0 the unconditional field (the null label), w = 1 the conditional one, w > 1 pushes samples
toward their label. For w other than 0 and 1 both fields come from ONE forward call over 2B rows
(the states twice, labels then null labels): GroupNorm is per sample, so this is the two passes,
with the GPU better used. `GuidedField.evaluations_per_call` is the number of network evaluations
(rows per sample) a call costs, which an honest NFE counts.

Sampling many images (`Guidance`): sample i gets label ``labels[i]``, a function of its index alone
like its noise, so the images do not depend on the batch size or the number of processes.
`balanced_labels` gives every class the same number of samples (CIFAR-10's train set has 5000 of
each), and for cluster labels the clusters of a class their share of its training images (the
counts a conditional checkpoint records), so the samples have the training set's label mix;
`label_classes` maps class or cluster labels back to their CIFAR-10 class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cfm.method.clustering import NUM_CLASSES


class GuidedField(nn.Module):
    """``field(t, x)`` = the guided velocity ``[B, *dim]`` of `net` for `labels` ``[B]`` at `scale` w.

    Args:
        net: a conditional UNet (``net.num_classes`` labels, ``net(t, x, y)``; its null label is
            ``num_classes``).
        labels: int64 ``[B]`` in 0..num_classes - 1, the label of each sample path (on net's device).
        scale: w; 0 and 1 call the net once on B rows, any other value once on 2B rows.
    """

    def __init__(self, net: nn.Module, labels: Tensor, scale: float):
        super().__init__()
        if getattr(net, "num_classes", None) is None:
            raise ValueError("guidance needs a label-conditioned net (num_classes set): this one is unconditional.")
        self.net, self.labels, self.scale = net, labels, float(scale)
        self.null = torch.full_like(labels, net.num_classes)
        self.evaluations_per_call = 1 if self.scale in (0.0, 1.0) else 2

    def forward(self, t: Tensor | float, x: Tensor, **solver_kwargs) -> Tensor:
        if self.scale == 1.0:
            return self.net(t, x, self.labels)
        if self.scale == 0.0:
            return self.net(t, x, self.null)
        t = torch.as_tensor(t, device=x.device)
        both = self.net(t.repeat(2) if t.numel() > 1 else t, torch.cat([x, x]), torch.cat([self.labels, self.null]))
        conditional, unconditional = both.chunk(2)
        return unconditional + self.scale * (conditional - unconditional)


# 1/phi: k * GOLDEN mod 1 (k = 0, 1, ...) fills [0, 1) evenly at every length (a low-discrepancy sequence).
GOLDEN = (math.sqrt(5) - 1) / 2


def balanced_labels(num: int, num_labels: int, label: int | None = None,
                    label_counts: Sequence[int] | None = None) -> Tensor:
    """Labels int64 ``[num]`` of samples 0..num-1 of a net with `num_labels` labels: all `label` when
    given, else class-balanced, sample i of class ``i mod 10``. Class labels (``num_labels`` = 10):
    that class. Cluster labels (``10 S``, cluster ``class * S + sub``): the k-th sample of a class
    (k = i // 10) takes the sub-cluster whose interval of the class's cumulative shares holds
    ``q_k = k / phi mod 1``, the shares being `label_counts` (training images per label, ``[10 S]``)
    within the class; so each cluster gets its training share of its class's samples, to within
    O(log n / n) at any length n, and empty clusters none. Without counts every cluster of a class
    the same share (sub ``k mod S``). Sample i's label depends on i alone, like its noise."""
    if label is not None:
        if not 0 <= label < num_labels:
            raise ValueError(f"label {label} is not one of the net's labels 0..{num_labels - 1}.")
        return torch.full((num,), label, dtype=torch.int64)
    index = torch.arange(num)
    if num_labels % NUM_CLASSES:  # not class or cluster labels: every label in turn
        return index % num_labels
    subclasses = num_labels // NUM_CLASSES
    classes, k = index % NUM_CLASSES, index // NUM_CLASSES
    if label_counts is None:
        return classes * subclasses + k % subclasses
    if len(label_counts) != num_labels:
        raise ValueError(f"{len(label_counts)} label counts for a net of {num_labels} labels.")
    counts = torch.as_tensor(label_counts, dtype=torch.float64).reshape(NUM_CLASSES, subclasses)
    shares = counts.cumsum(1) / counts.sum(1, keepdim=True).clamp(min=1)  # [10, S], ending at 1
    q = (k.double() * GOLDEN).remainder(1.0)
    sub = torch.searchsorted(shares[classes], q[:, None], right=True).squeeze(1).clamp(max=subclasses - 1)
    return classes * subclasses + sub


def label_classes(labels: Tensor, num_labels: int) -> Tensor:
    """The CIFAR-10 class int64 ``[N]`` of labels ``[N]`` of a net with `num_labels` labels: a class
    label is its class, cluster ``class * S + sub`` (``num_labels`` = 10 S) is ``label // S``.
    ValueError for label sets that are neither (``num_labels`` not a multiple of 10)."""
    if num_labels % NUM_CLASSES:
        raise ValueError(f"{num_labels} labels are neither the 10 CIFAR-10 classes nor clusters of them (a multiple of 10).")
    return labels // (num_labels // NUM_CLASSES)


@dataclass(frozen=True)
class Guidance:
    """How a label-conditioned net is sampled: sample i with label ``labels[i]`` (int64 ``[num]``, on
    the CPU) under the guided field of scale w = `scale` (see `GuidedField`)."""

    labels: Tensor
    scale: float = 1.0

    def field(self, net: nn.Module, indices: Sequence[int]) -> GuidedField:
        """The guided field of the samples `indices` (one batch), on the net's device."""
        device = next(net.parameters()).device
        return GuidedField(net, self.labels[list(indices)].to(device), self.scale)
