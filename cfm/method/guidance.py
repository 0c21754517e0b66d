"""Classifier-free guidance (Ho & Salimans 2022; for flows, Zheng et al. 2023, "Guided Flows"): the
guided velocity of a label-conditioned net,

    v_w(t, x | y) = v(t, x | null) + w (v(t, x | y) - v(t, x | null)),

w = 0 the unconditional field (the null label), w = 1 the conditional one, w > 1 pushes samples
toward their label. For w other than 0 and 1 both fields come from ONE forward call over 2B rows
(the states twice, labels then null labels): GroupNorm is per sample, so this is the two passes,
with the GPU better used. `GuidedField.evaluations_per_call` is the number of network evaluations
(rows per sample) a call costs, which an honest NFE counts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


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
