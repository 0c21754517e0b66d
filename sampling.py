"""Sampling from a trained flow: integrate dx/dt = v(t, x) from noise x0 at t=0 to data x1 at t=1.

One code path serves training (sample grids), compute_fid.py, the benchmark and the tests.

Solvers (``SOLVERS``):
    dopri5    adaptive Dormand-Prince 5(4) from torchdiffeq, atol = rtol = ``tol``, the whole batch
              integrated as ONE system (one step size for all samples), as the published numbers were.
    euler     x <- x + h v(t, x)                                            (order 1, 1 NFE / step)
    midpoint  x <- x + h v(t + h/2, x + h/2 v(t, x))                        (order 2, 2 NFE / step)
    heun      k1 = v(t, x), k2 = v(t + h, x + h k1), x <- x + h/2 (k1 + k2) (order 2, 2 NFE / step)
    rk4       the classical Runge-Kutta scheme (1/6, 1/3, 1/3, 1/6)       (order 4, 4 NFE / step)

The fixed-step schemes are written here rather than taken from torchdiffeq because (a) torchdiffeq
builds its grid from a step size with ``ceil((t1 - t0) / h + 1)`` points, which float rounding can
turn into one extra step (so ``steps`` and NFE would not be exact), (b) its ``rk4`` is the 3/8-rule
variant, not the classical scheme users expect, and (c) each scheme is three lines. The time grid is
``torch.linspace(0, 1, steps + 1)``, the grid of the published Euler runs (torchdyn's t_span).

Noise is drawn sample by sample from a CPU generator seeded with `seed`: sample i is the same
whatever the batch size and device, and torch's global RNG is never touched (training resumes
exactly after drawing a sample grid). With the fixed-step solvers each image therefore depends only
on (seed, index); with dopri5 the step sizes are shared by the batch, so images depend on the batch
composition too (within the solver tolerance).

Image layout: uint8 tensors are NCHW [N, 3, 32, 32] (the Inception input and torchvision layout);
compute_fid.py transposes to NHWC only when it writes the ``.npz`` evaluator file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from utils_cifar import to_uint8, writing

SOLVERS = ("dopri5", "euler", "midpoint", "heun", "rk4")

Field = Callable[[Tensor, Tensor], Tensor]


def check_solver(method: str) -> None:
    """Raise ValueError naming the choices if `method` is not a known solver."""
    if method not in SOLVERS:
        raise ValueError(f"unknown ODE solver {method!r}: choose one of {', '.join(SOLVERS)}.")


class _CountingField:
    """Wraps v(t, x) and counts its calls: the NFE of each sample path, since the batch is one system."""

    def __init__(self, field: Field):
        self.field = field
        self.calls = 0

    def __call__(self, t: Tensor, x: Tensor) -> Tensor:
        self.calls += 1
        return self.field(t, x)


def _euler_step(f: Field, t: Tensor, h: Tensor, x: Tensor) -> Tensor:
    return x + h * f(t, x)


def _midpoint_step(f: Field, t: Tensor, h: Tensor, x: Tensor) -> Tensor:
    k1 = f(t, x)
    return x + h * f(t + h / 2, x + (h / 2) * k1)


def _heun_step(f: Field, t: Tensor, h: Tensor, x: Tensor) -> Tensor:
    k1 = f(t, x)
    k2 = f(t + h, x + h * k1)
    return x + (h / 2) * (k1 + k2)


def _rk4_step(f: Field, t: Tensor, h: Tensor, x: Tensor) -> Tensor:
    k1 = f(t, x)
    k2 = f(t + h / 2, x + (h / 2) * k1)
    k3 = f(t + h / 2, x + (h / 2) * k2)
    k4 = f(t + h, x + h * k3)
    return x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)


_FIXED_STEPS = {"euler": _euler_step, "midpoint": _midpoint_step, "heun": _heun_step, "rk4": _rk4_step}


def integrate(
    field: Field, x0: Tensor, method: str = "dopri5", steps: int = 100, tol: float = 1e-5
) -> tuple[Tensor, int]:
    """Solve dx/dt = field(t, x) from x(0) = x0 to t = 1.

    Args:
        field: v(t, x) -> dx/dt with the shape of x; t is a 0-dim tensor (one time for the batch).
        x0: [B, ...] initial state.
        method: one of ``SOLVERS``.
        steps: number of equal steps for the fixed-step solvers (ignored by dopri5).
        tol: atol = rtol for dopri5 (ignored by the fixed-step solvers).

    Returns:
        x1: [B, ...] the state at t = 1.
        nfe: number of field evaluations (per sample path: the batch is integrated as one system).
            euler: steps; midpoint, heun: 2 * steps; rk4: 4 * steps; dopri5: what the solver took.

    Runs in the caller's autograd mode: wrap in ``torch.no_grad()`` for sampling.
    """
    check_solver(method)
    counter = _CountingField(field)
    if method == "dopri5":
        # Imported here: only the adaptive solver needs torchdiffeq.
        from torchdiffeq import odeint

        t_span = torch.tensor([0.0, 1.0], dtype=x0.dtype, device=x0.device)
        x1 = odeint(counter, x0, t_span, method="dopri5", atol=tol, rtol=tol)[-1]
        return x1, counter.calls
    if steps < 1:
        raise ValueError(f"steps must be a positive number of solver steps, got {steps}.")
    step = _FIXED_STEPS[method]
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=x0.dtype, device=x0.device)
    x = x0
    for i in range(steps):
        x = step(counter, grid[i], grid[i + 1] - grid[i], x)
    return x, counter.calls


class NoiseSource:
    """x0 ~ N(0, I) drawn one sample at a time from a CPU generator seeded with `seed`.

    Sample i is the i-th draw whatever the batch sizes asked for (one ``randn(shape)`` per sample:
    a single big ``randn`` is not guaranteed to equal consecutive small ones), the same on every
    device, and torch's global RNG is untouched.
    """

    def __init__(self, shape: tuple[int, ...] = (3, 32, 32), seed: int = 0):
        self.shape = tuple(shape)
        self.generator = torch.Generator().manual_seed(seed)

    def take(self, num: int) -> Tensor:
        """The next `num` samples: float32 [num, *shape] on the CPU."""
        return torch.stack([torch.randn(self.shape, generator=self.generator) for _ in range(num)])


def noise(num: int, shape: tuple[int, ...] = (3, 32, 32), seed: int = 0) -> Tensor:
    """The first `num` noise samples of `seed`: float32 [num, *shape] on the CPU."""
    return NoiseSource(shape, seed).take(num)


@contextlib.contextmanager
def _eval_mode(net: torch.nn.Module):
    """Eval mode (no dropout: deterministic, and no draw on the global RNG), restored on exit."""
    was_training = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was_training)


def _sample_shape(net: torch.nn.Module) -> tuple[int, ...]:
    config = getattr(net, "config", None) or {}
    return tuple(config.get("dim", (3, 32, 32)))


def _device_of(net: torch.nn.Module) -> torch.device:
    return next(net.parameters()).device


def sample_batches(
    net: torch.nn.Module,
    num: int,
    batch_size: int,
    method: str = "dopri5",
    steps: int = 100,
    tol: float = 1e-5,
    seed: int = 0,
) -> Iterator[tuple[Tensor, int]]:
    """Yield (x1, nfe) batch by batch: x1 float [b, C, H, W] (about [-1, 1], unclipped) on the net's device.

    Batches hold `batch_size` samples (the last one the remainder), num in all. Each solve runs under
    ``torch.no_grad()`` with the net in eval mode; its previous mode is restored after every batch.
    """
    check_solver(method)
    if num < 1 or batch_size < 1:
        raise ValueError(f"num ({num}) and batch_size ({batch_size}) must be positive.")
    source, device = NoiseSource(_sample_shape(net), seed), _device_of(net)
    for start in range(0, num, batch_size):
        x0 = source.take(min(batch_size, num - start)).to(device)
        # Entered per batch, never held across a yield: the caller's grad mode and the net's
        # train/eval mode are its own between batches, even if it stops iterating early.
        with _eval_mode(net), torch.no_grad():
            x1, nfe = integrate(net, x0, method=method, steps=steps, tol=tol)
        yield x1, nfe


def generate_samples(
    net: torch.nn.Module,
    num: int,
    batch_size: int = 1024,
    method: str = "dopri5",
    steps: int = 100,
    tol: float = 1e-5,
    seed: int = 0,
    on_batch: Callable[[Tensor], None] | None = None,
    keep: bool = True,
) -> tuple[Tensor | None, float]:
    """Sample `num` images: uint8 NCHW [num, C, H, W] on the CPU (None if not `keep`), and the mean
    NFE per sample.

    Mapped to uint8 as published: (x * 127.5 + 128).clip(0, 255) (``utils_cifar.to_uint8``), on the
    device before the copy to the host. Runs where the net's parameters are. `on_batch` gets each
    uint8 batch on the device as it is made (e.g. to featurise it for FID while sampling goes on).
    """
    images, nfe_total = [], 0
    for x1, nfe in sample_batches(net, num, batch_size, method, steps, tol, seed):
        batch = to_uint8(x1)
        if on_batch is not None:
            on_batch(batch)
        if keep:
            images.append(batch.cpu())
        nfe_total += nfe * len(x1)
    return (torch.cat(images) if keep else None), nfe_total / num


def save_sample_grid(
    net: torch.nn.Module,
    path: str | os.PathLike,
    num: int = 64,
    method: str = "euler",
    steps: int = 99,
    tol: float = 1e-5,
    seed: int = 0,
    nrow: int = 8,
) -> Path:
    """Write a PNG grid of `num` samples (Euler, 99 steps by default: the published grids integrate
    over ``t_span = linspace(0, 1, 100)``, i.e. 99 Euler steps).

    Samples are clipped to [-1, 1] and mapped to [0, 1] (x / 2 + 0.5), then written by
    ``torchvision.utils.save_image(..., nrow=8)``. Neither torch's global RNG nor the net's
    train/eval mode is changed, so a training run continues exactly as if no grid had been drawn.
    A failed write is a `utils_cifar.SaveError`.
    """
    from torchvision.utils import save_image

    x1 = torch.cat([x for x, _ in sample_batches(net, num, num, method, steps, tol, seed)])
    path = Path(path)
    with writing(path):  # a full disk or read-only folder: one sentence (SaveError)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(x1.clip(-1, 1).cpu() / 2 + 0.5, path, nrow=nrow)
    return path
