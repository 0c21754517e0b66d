"""Probability paths and matchers for flow matching: ``--model`` in {otcfm, icfm, fm, si}.

Conventions: ``x0`` is noise, ``x1`` is data, both ``[B, ...]`` of the same shape; ``t`` is ``[B]`` in
[0, 1]; ``xt`` is the point on the path at time ``t`` and ``ut`` the conditional target velocity
``d xt / d t`` that the network ``vt = net(t, xt)`` regresses onto. ``eps`` is an extra standard
Gaussian ``[B, ...]`` scaled by ``sigma``.

==========  =================================================  ==========================================
model       xt                                                 ut
==========  =================================================  ==========================================
icfm        t x1 + (1 - t) x0 + sigma eps                      x1 - x0
otcfm       as icfm, after re-pairing (x0, x1) by minibatch OT as icfm
fm          t x1 + (1 - (1 - sigma) t) x0                      x1 - (1 - sigma) x0
si          cos(pi t / 2) x0 + sin(pi t / 2) x1 + sigma eps    pi / 2 (cos(pi t / 2) x1 - sin(pi t / 2) x0)
==========  =================================================  ==========================================

Usage::

    matcher = make_matcher("otcfm", sigma=0.0)
    sample = matcher.sample(torch.randn_like(x1), x1)          # FlowSample(t, x0, x1, xt, ut, eps)
    loss = (net(sample.t, sample.xt) - sample.ut).square().mean()
    # a regularizer reuses the same pairing and noise at another time:
    other = matcher.path(t2, sample.x0, sample.x1, sample.eps)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import ot
import torch
from torch import Tensor

from cfm.config.choices import MATCHERS, OT_PAIRINGS

@dataclass
class FlowSample:
    """One draw from a probability path; named so that regularizers reuse the same t, pairing, noise.

    Attributes:
        t: ``[B]`` times in [0, 1].
        x0: ``[B, ...]`` noise (re-paired by OT for otcfm).
        x1: ``[B, ...]`` data (re-paired by OT for otcfm).
        xt: ``[B, ...]`` point on the path at ``t``.
        ut: ``[B, ...]`` conditional target velocity ``d xt / d t``.
        eps: ``[B, ...]`` the standard Gaussian noise that ``sigma`` scales (drawn for every path,
            even where the path does not use it, so all matchers consume the RNG alike).
        index: ``[B]`` int64, the row of the ``x1`` given to `FlowMatcher.sample` that each row's
            data is (``x1 = x1_given[index]``), so whatever belongs to an image (its label) can
            follow it through otcfm's re-pairing; None where no re-pairing happened (the identity).
    """

    t: Tensor
    x0: Tensor
    x1: Tensor
    xt: Tensor
    ut: Tensor
    eps: Tensor
    index: Tensor | None = None


def pad_t_like_x(t: Tensor, x: Tensor) -> Tensor:
    """Reshape ``t`` ``[B]`` to ``[B, 1, ..., 1]`` so it broadcasts against ``x`` ``[B, ...]``."""
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def _check_ot_pairing(mode: str) -> None:
    if mode not in OT_PAIRINGS:
        raise ValueError(f"unknown --ot_pairing {mode!r}: choose one of {', '.join(OT_PAIRINGS)}.")


def ot_pairing_indices(
    x0: Tensor, x1: Tensor, mode: str = "replacement", generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Pair noise with data by an exact minibatch optimal-transport plan (Tong et al. 2023, OT-CFM).

    The plan ``pi`` ``[B, B]`` solves ``min_pi sum_ij pi_ij ||x0_i - x1_j||^2`` subject to uniform
    marginals ``pi 1 = pi^T 1 = 1/B`` (POT's network simplex, ``ot.emd``). With uniform marginals
    and a square cost, the optimal vertex it returns is a permutation matrix scaled by ``1/B``.

    Args:
        x0: ``[B, ...]`` noise.
        x1: ``[B, ...]`` data, same shape.
        mode: ``"replacement"``: draw ``B`` pairs ``(i, j)`` with probabilities ``pi_ij``, with
            replacement (the published procedure). ``"permutation"``: use the optimal permutation
            itself, ``j = 0..B-1`` in order and ``i`` the noise index matched to each ``j``, so every
            sample is used exactly once.
        generator: RNG for the ``"replacement"`` draw; the draw runs on its device. ``None`` uses
            torch's global CPU RNG, so ``torch.manual_seed`` reproduces the pairing. Numpy's RNG is
            never used.

    Returns:
        ``(i, j)``: two ``[B]`` int64 index tensors on ``x0.device``; the re-paired batch is
        ``x0[i], x1[j]``.

    Note: the cost matrix is computed on the tensors' device, but the exact OT solver runs on the
    CPU, so this function syncs with the device once per call (inherent to exact OT). The three
    parts, `ot_cost`, `ot_plan` and `pairs_from_plan`, let a caller solve the plan elsewhere (the
    training loop solves the next step's on a worker thread).
    """
    _check_ot_pairing(mode)
    cost = ot_cost(x0, x1).to("cpu", torch.float64).numpy()  # host sync: POT solves on the CPU.
    return pairs_from_plan(ot_plan(cost), mode, generator, x0.device)


def ot_cost(x0: Tensor, x1: Tensor) -> Tensor:
    """Squared Euclidean costs ``||x0_i - x1_j||^2`` ``[B, B]`` of ``x0``, ``x1`` ``[B, ...]``, on their device."""
    batch = x0.shape[0]
    # float32 at least: half precision rounds squared distances of ~1e4 (3072-D) to steps of 8,
    # coarse enough to change the plan.
    cost_dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    return torch.cdist(x0.reshape(batch, -1).to(cost_dtype), x1.reshape(batch, -1).to(cost_dtype)).square()


def ot_plan(cost: np.ndarray) -> np.ndarray:
    """The exact OT plan ``[B, B]`` (float64) between uniform marginals for a host cost ``[B, B]``
    (float64): POT's network simplex, which releases the GIL while it solves."""
    if not np.isfinite(cost).all():
        raise FloatingPointError("OT cost is not finite: x0 or x1 has NaN or inf (did training diverge?).")
    marginal = np.full(cost.shape[0], 1.0 / cost.shape[0])
    return ot.emd(marginal, marginal, cost)


def pairs_from_plan(plan: np.ndarray, mode: str, generator: torch.Generator | None,
                    device: torch.device) -> tuple[Tensor, Tensor]:
    """``(i, j)`` ``[B]`` int64 on ``device`` from a plan ``[B, B]``: see `ot_pairing_indices`.

    Host arrays go to a GPU from pinned memory without blocking: a blocking copy would wait for the
    work queued on the device (a host sync)."""
    batch = plan.shape[0]

    def to(x: Tensor, target: torch.device) -> Tensor:
        return (x.pin_memory() if target.type == "cuda" else x).to(target, non_blocking=True)

    if mode == "permutation":
        i = torch.from_numpy(plan.argmax(axis=0))  # the one noise row carrying each data column's mass
        j = torch.arange(batch)
    else:
        draw_device = generator.device if generator is not None else torch.device("cpu")
        flat = torch.multinomial(to(torch.from_numpy(plan).flatten(), draw_device), batch, replacement=True,
                                 generator=generator)
        i, j = flat // batch, flat % batch
    return to(i, device), to(j, device)


class FlowMatcher:
    """Base matcher: optional re-pairing, then draw ``t`` and ``eps``, then evaluate the path.

    Subclasses implement :meth:`_xt_ut`; otcfm also overrides :meth:`couple`.
    """

    name = ""

    def __init__(self, sigma: float = 0.0):
        self.sigma = float(sigma)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"

    def couple(
        self, x0: Tensor, x1: Tensor, generator: torch.Generator | None = None, plans: list | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Pair noise with data: ``(x0', x1', index)`` with ``x1' = x1[index]`` (``index`` ``[B]``, or
        None for the identity); independent coupling (keep the given order) unless overridden."""
        return x0, x1, None

    def costs(self, x0: Tensor, x1: Tensor) -> Tensor | None:
        """The cost matrices ``[blocks, n, n]`` whose OT plans `couple` needs, on the tensors'
        device; None for a matcher that solves none (all but otcfm)."""
        return None

    def solve(self, costs: np.ndarray) -> list[np.ndarray]:
        """The OT plans of `costs` ``[blocks, n, n]`` (float64, on the host), to pass to `sample` as ``plans``."""
        return [ot_plan(cost) for cost in costs]

    def _xt_ut(self, t: Tensor, x0: Tensor, x1: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """``xt`` and ``ut`` for ``t`` already shaped ``[B, 1, ..., 1]``."""
        raise NotImplementedError

    def path(self, t: Tensor | float, x0: Tensor, x1: Tensor, eps: Tensor) -> FlowSample:
        """Evaluate the path at given ``t``, pairing and noise (no re-pairing, no random draws).

        Args:
            t: ``[B]`` times, or a scalar applied to every sample.
            x0, x1, eps: ``[B, ...]`` noise, data and extra Gaussian noise, already paired.
        """
        t = torch.as_tensor(t, dtype=x1.dtype, device=x1.device).expand(x1.shape[0])
        xt, ut = self._xt_ut(pad_t_like_x(t, x1), x0, x1, eps)
        return FlowSample(t=t, x0=x0, x1=x1, xt=xt, ut=ut, eps=eps)

    def sample(
        self,
        x0: Tensor,
        x1: Tensor,
        t: Tensor | float | None = None,
        generator: torch.Generator | None = None,
        plans: list | None = None,
    ) -> FlowSample:
        """Draw a training sample from the path.

        Args:
            x0: ``[B, ...]`` noise.
            x1: ``[B, ...]`` data, same shape as ``x0``.
            t: ``[B]`` times (or a scalar); ``None`` draws ``t ~ U(0, 1)`` per sample.
            generator: RNG for the pairing (otcfm), ``t`` and ``eps``, in that order; ``None`` uses
                torch's global RNG. Must live on ``x1``'s device.
            plans: otcfm: the plans ``solve(costs(x0, x1))`` solved beforehand (None: solved here).

        Returns:
            :class:`FlowSample` with ``x0``, ``x1`` after re-pairing and ``index``, the given row
            of each re-paired ``x1`` (None when the order is kept).
        """
        if x0.shape != x1.shape:
            raise ValueError(
                f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}."
            )
        x0, x1, index = self.couple(x0, x1, generator, plans)
        if t is None:
            t = torch.rand(x1.shape[0], dtype=x1.dtype, device=x1.device, generator=generator)
        eps = torch.randn(x1.shape, dtype=x1.dtype, device=x1.device, generator=generator)
        sample = self.path(t, x0, x1, eps)
        sample.index = index
        return sample


class ICFM(FlowMatcher):
    """Independent-coupling CFM (Tong et al. 2023), straight path with constant-width Gaussian tube.

    ``xt = t x1 + (1 - t) x0 + sigma eps``, ``ut = d xt / d t = x1 - x0``.
    """

    name = "icfm"

    def _xt_ut(self, t, x0, x1, eps):
        xt = t * x1 + (1 - t) * x0 + self.sigma * eps
        return xt, x1 - x0


class OTCFM(ICFM):
    """OT-CFM (Tong et al. 2023): the icfm path after re-pairing ``(x0, x1)`` by minibatch exact OT.

    See :func:`ot_pairing_indices` for the two pairing modes. With ``ot_blocks = W > 1`` the batch
    is cut into ``W`` equal contiguous blocks and each is paired within itself: what ``W`` torchrun
    processes of the published DDP script compute on their own ``B / W`` samples
    (``--ot_scope=local``). The default, one block, pairs the whole (global) batch.
    """

    name = "otcfm"

    def __init__(self, sigma: float = 0.0, ot_pairing: str = "replacement", ot_blocks: int = 1):
        super().__init__(sigma)
        _check_ot_pairing(ot_pairing)
        if ot_blocks < 1:
            raise ValueError(f"ot_blocks must be >= 1, got {ot_blocks}.")
        self.ot_pairing = ot_pairing
        self.ot_blocks = int(ot_blocks)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma}, ot_pairing={self.ot_pairing!r}, ot_blocks={self.ot_blocks})"

    def costs(self, x0, x1):
        if x1.shape[0] % self.ot_blocks:
            raise ValueError(f"a batch of {x1.shape[0]} does not split into {self.ot_blocks} OT blocks.")
        size = x1.shape[0] // self.ot_blocks
        return torch.stack([ot_cost(a, b) for a, b in zip(x0.split(size), x1.split(size))])

    def couple(self, x0, x1, generator=None, plans=None):
        if plans is None:
            plans = self.solve(self.costs(x0, x1).to("cpu", torch.float64).numpy())  # host sync: POT runs on the CPU
        pairs = [pairs_from_plan(plan, self.ot_pairing, generator, x0.device) for plan in plans]
        size = x1.shape[0] // self.ot_blocks
        offsets = [block * size for block in range(self.ot_blocks)]
        i = torch.cat([i + offset for (i, _), offset in zip(pairs, offsets)])
        j = torch.cat([j + offset for (_, j), offset in zip(pairs, offsets)])
        return x0[i], x1[j], j


class FM(FlowMatcher):
    """Flow matching with the optimal-transport conditional path of Lipman et al. (2023).

    ``mu_t = t x1``, ``sigma_t = 1 - (1 - sigma) t``, ``xt = mu_t + sigma_t x0`` (``eps`` unused).
    The paper's target ``ut = (x1 - (1 - sigma) xt) / (1 - (1 - sigma) t)`` divides by ``sigma_t``,
    which vanishes at ``t = 1`` when ``sigma = 0``. Substituting ``xt``::

        x1 - (1 - sigma) xt = x1 - (1 - sigma) t x1 - (1 - sigma) (1 - (1 - sigma) t) x0
                            = (1 - (1 - sigma) t) x1 - (1 - sigma) (1 - (1 - sigma) t) x0
                            = (1 - (1 - sigma) t) (x1 - (1 - sigma) x0)

    so the division cancels exactly: ``ut = x1 - (1 - sigma) x0`` (``= d xt / d t``), which is
    accurate for every ``t`` and equals ``x1 - x0`` when ``sigma = 0``.
    """

    name = "fm"

    def _xt_ut(self, t, x0, x1, eps):
        shrink = 1 - self.sigma
        xt = t * x1 + (1 - shrink * t) * x0
        return xt, x1 - shrink * x0


class SI(FlowMatcher):
    """Variance-preserving stochastic interpolant (Albergo & Vanden-Eijnden 2023).

    ``xt = cos(pi t / 2) x0 + sin(pi t / 2) x1 + sigma eps``,
    ``ut = d xt / d t = pi / 2 (cos(pi t / 2) x1 - sin(pi t / 2) x0)``.
    """

    name = "si"

    def _xt_ut(self, t, x0, x1, eps):
        angle = t * (math.pi / 2)
        cos, sin = torch.cos(angle), torch.sin(angle)
        xt = cos * x0 + sin * x1 + self.sigma * eps
        return xt, (math.pi / 2) * (cos * x1 - sin * x0)


_CLASSES = {cls.name: cls for cls in (OTCFM, ICFM, FM, SI)}


def make_matcher(name: str, sigma: float = 0.0, ot_pairing: str = "replacement", ot_blocks: int = 1) -> FlowMatcher:
    """Build the matcher for ``--model name``.

    Args:
        name: one of :data:`MATCHERS`.
        sigma: width of the Gaussian around the path (``>= 0``; for fm, the final std ``sigma_min``).
        ot_pairing: one of :data:`OT_PAIRINGS`; used by otcfm, validated for every model so a typo
            fails before training starts.
        ot_blocks: otcfm pairs within this many equal blocks of the batch (see :class:`OTCFM`).
    """
    if name not in _CLASSES:
        raise ValueError(f"unknown --model {name!r}: choose one of {', '.join(MATCHERS)}.")
    _check_ot_pairing(ot_pairing)
    if not sigma >= 0:
        raise ValueError(f"--sigma must be >= 0, got {sigma}.")
    if name == "otcfm":
        return OTCFM(sigma, ot_pairing, ot_blocks)
    return _CLASSES[name](sigma)
