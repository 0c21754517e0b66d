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
each), and for cluster labels every cluster of a class the same share of the class's samples;
`label_classes` maps class or cluster labels back to their CIFAR-10 class.
"""

from __future__ import annotations

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


def balanced_labels(num: int, num_labels: int, label: int | None = None) -> Tensor:
    """Labels int64 ``[num]`` of samples 0..num-1 of a net with `num_labels` labels: all `label` when
    given, else class-balanced. Class labels (``num_labels`` = 10): sample i gets ``i mod 10``.
    Cluster labels (``10 S``, cluster ``class * S + sub``): class ``i mod 10``, and within the class
    its clusters in turn, sub ``(i // 10) mod S``: every class gets the same share, every cluster
    the same share of its class (each label once in any ``num_labels`` consecutive samples)."""
    if label is not None:
        if not 0 <= label < num_labels:
            raise ValueError(f"label {label} is not one of the net's labels 0..{num_labels - 1}.")
        return torch.full((num,), label, dtype=torch.int64)
    index = torch.arange(num)
    if num_labels % NUM_CLASSES:  # not class or cluster labels: every label in turn
        return index % num_labels
    subclasses = num_labels // NUM_CLASSES
    return (index % NUM_CLASSES) * subclasses + (index // NUM_CLASSES) % subclasses


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
