"""The memorizing field v*: the exact minimizer of the flow-matching loss over a finite training set,
and how far a trained net's field is from it.

Every matcher's path is linear in its three random inputs (x0, eps ~ N(0, I), x1 data)::

    xt = a(t) x1 + b(t) x0 + sigma(t) eps,     ut = a'(t) x1 + b'(t) x0 + sigma'(t) eps

with x1 uniform over the training images {y_i} and their left-right mirrors (training flips each
image with probability 1/2): 2N terms. Given x1 = y_i, ``xt ~ N(a y_i, s^2 I)`` with
``s^2 = b^2 + sigma^2``, ``E[x0 | xt = x, y_i] = b (x - a y_i) / s^2`` and
``E[eps | xt = x, y_i] = sigma (x - a y_i) / s^2``, so the minimizer of ``E |v(xt, t) - ut|^2``
over all fields is ``E[ut | xt = x]``::

    v*(x, t) = sum_i w_i [a' y_i + (c / s^2)(x - a y_i)],     c = b b' + sigma sigma'
             = (c / s^2) x + (a' - a c / s^2) ybar(x, t),     ybar = sum_i w_i y_i
    w_i = softmax_i(-|x - a y_i|^2 / (2 s^2))

(icfm with sigma = 0: ``v* = (ybar - x) / (1 - t)``.) Integrated from noise, v* returns training
images: it is the field a net would learn if it memorized its training set. The coefficients are
read off each matcher's own `path` (`path_coefficients`), never restated here.

otcfm re-pairs noise with data by minibatch OT, so x0 and x1 are not independent and v* is not the
minimizer of its loss; its path is icfm's, and icfm's v* is reported as a reference
(`independent_coupling` is False, and `MemorizingField.describe` says so).

Exact evaluation: the softmax over 2N terms runs chunk by chunk over the training images on the
device, in float64, with a streaming log-sum-exp (running max, rescaled sum of exponentials and
weighted sum of images), so the weights stay finite as s -> 0 near t = 1. Under torchrun each rank
holds a contiguous slice of the training set, and the ranks' partial (max, sum, weighted sum) are
combined with two all-reduces: every rank must call the field with the same points at the same time.

Usage::

    field = MemorizingField(train_images, make_matcher("icfm"), world=world, device=device)
    times = generalization.loss_times(10).tolist()        # 0.05, 0.15, ..., 0.95
    on_test = field_distance(net, field, path_points(field.matcher, test_x1, times, seed=0), times)
    on_model = field_distance(net, field, model_trajectory_points(net, 1000, times, world=world), times)
    print(on_test.per_time, on_model.overall)                  # E|v_net - v*|^2 / E|v*|^2
    samples = memorizing_samples(field, noise(1000).to(device))  # the baseline: memorizes
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from cfm.evaluation.sampling import gather_batches, solve_batches
from cfm.evaluation.solvers import Field, integrate
from cfm.io.cifar10 import to_model_range
from cfm.io.distributed import World, broadcast_from_main
from cfm.method.flow_matching import FlowMatcher


@dataclass(frozen=True)
class PathCoefficients:
    """``xt = a x1 + b x0 + sigma eps``, ``ut = da x1 + db x0 + dsigma eps`` at times ``t``: float64 ``[T]`` each."""

    a: Tensor
    b: Tensor
    da: Tensor
    db: Tensor
    sigma: Tensor
    dsigma: Tensor

    @property
    def s2(self) -> Tensor:
        """The variance ``b^2 + sigma^2`` of ``xt`` given ``x1``, per coordinate."""
        return self.b.square() + self.sigma.square()


def path_coefficients(matcher: FlowMatcher, t: Tensor | float) -> PathCoefficients:
    """The coefficients of `matcher`'s path at times `t` (a scalar or ``[T]``), float64 on the CPU.

    Read off the matcher's own `path`, which is linear in (x1, x0, eps): fed one unit input at a
    time, it returns ``xt`` = that input's coefficient and ``ut`` = its time derivative (``dsigma``,
    the ``eps`` term of ``ut``, is 0 for every matcher here but not for a path whose sigma depends
    on t; the tests check ``ut = da x1 + db x0 + dsigma eps`` on random inputs).
    """
    t = torch.as_tensor(t, dtype=torch.float64).cpu().reshape(-1)
    zero, one = torch.zeros(len(t), 1, dtype=torch.float64), torch.ones(len(t), 1, dtype=torch.float64)
    data = matcher.path(t, zero, one, zero)
    noise = matcher.path(t, one, zero, zero)
    extra = matcher.path(t, zero, zero, one)
    return PathCoefficients(a=data.xt[:, 0], b=noise.xt[:, 0], da=data.ut[:, 0], db=noise.ut[:, 0],
                            sigma=extra.xt[:, 0], dsigma=extra.ut[:, 0])


def independent_coupling(matcher: FlowMatcher) -> bool:
    """Whether `matcher` pairs noise and data independently (keeps the drawn order), so that v* is
    the minimizer of its loss. False for otcfm: it re-pairs by minibatch OT (its v* is icfm's)."""
    return type(matcher).couple is FlowMatcher.couple


class MemorizingField:
    """v*(t, x) over `images` and their mirrors; called like a net: ``field(t, x)``.

    Args:
        images: ``[N, C, H, W]`` training images: uint8 (mapped with `to_model_range`, as training
            maps them) or float in the model's range [-1, 1]. Under torchrun every rank passes the
            whole set and keeps its slice ``[r N / W, (r + 1) N / W)``, stored on `device` in
            `dtype` (100k CIFAR-10 images in float64: 2.5 GB over all ranks).
        matcher: the path whose v* this is (its `sigma` included).
        world: the ranks the training set is split over (None: one process).
        device: where the images live and the sums run (default: the images' device).
        chunk_size: training images per chunk; the working memory of B points of D dims is about
            ``2 B x chunk_size + 2 B x D`` values of `dtype`.
        dtype: float64 (default), or float32 with TF32 turned off for its matmuls.
    """

    def __init__(self, images: Tensor, matcher: FlowMatcher, world: World | None = None,
                 device: torch.device | str | None = None, chunk_size: int = 4096, dtype: torch.dtype = torch.float64):
        if len(images) == 0:
            raise ValueError("the memorizing field needs at least one training image.")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
        if dtype not in (torch.float64, torch.float32):
            raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype}.")
        self.matcher, self.world, self.chunk_size, self.dtype = matcher, world, chunk_size, dtype
        self.num_images, self.image_shape = len(images), tuple(images.shape[1:])
        self.device = torch.device(device) if device is not None else images.device
        rank, size = (world.rank, world.size) if world is not None else (0, 1)
        own = images[rank * len(images) // size:(rank + 1) * len(images) // size]
        # This rank's images as rows [n, D] in `dtype`, converted chunk by chunk (no full-size
        # temporaries), and their squared norms [n] (a mirror has its image's norm).
        self.images = torch.empty(len(own), math.prod(self.image_shape), dtype=dtype, device=self.device)
        for begin in range(0, len(own), chunk_size):
            chunk = own[begin:begin + chunk_size].to(self.device)
            chunk = to_model_range(chunk) if chunk.dtype == torch.uint8 else chunk
            self.images[begin:begin + len(chunk)] = chunk.flatten(1)
        self.square_norms = self.images.square().sum(1)

    def describe(self) -> dict:
        """The fields that say which v* a results record compares with."""
        # otcfm's path is icfm's and its v* is icfm's (a reference, not its minimizer): named as such.
        model = self.matcher.name if independent_coupling(self.matcher) else "icfm"
        return {"vstar_model": model, "vstar_sigma": self.matcher.sigma,
                "vstar_is_minimizer": independent_coupling(self.matcher),
                "vstar_train_images": self.num_images, "vstar_terms": 2 * self.num_images}

    def __call__(self, t: Tensor | float, x: Tensor) -> Tensor:
        """v*(x, t) ``[B, C, H, W]`` in `dtype` on `device`, for x ``[B, C, H, W]`` and t a scalar or ``[B]``.

        Raises ValueError where ``s = 0`` (t = 1 on a path with sigma = 0): v* is not defined there.
        """
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"points of shape {tuple(x.shape[1:])} for training images of shape {self.image_shape}.")
        coef = path_coefficients(self.matcher, t)
        if not (coef.s2 > 0).all():
            raise ValueError(f"v* is undefined at t = 1 on the {self.matcher.name} path with sigma = 0 "
                             "(every weight collapses): evaluate at t < 1.")
        # d/dx of v*: the x0 and eps parts of the target, E[b' x0 + sigma' eps | xt = x, y_i] = c (x - a y_i) / s^2.
        x_coef = (coef.b * coef.db + coef.sigma * coef.dsigma) / coef.s2
        y_coef = coef.da - coef.a * x_coef

        def column(values: Tensor) -> Tensor:  # [T] (T = 1 or B) -> [T, 1, 1, 1] on the device
            return values.to(self.device, self.dtype).view(-1, *[1] * (x.ndim - 1))

        x = x.to(self.device, self.dtype)
        return column(x_coef) * x + column(y_coef) * self.posterior_mean(x, column(coef.a), column(coef.s2))

    def posterior_mean(self, x: Tensor, a: Tensor, s2: Tensor) -> Tensor:
        """``ybar = sum_i w_i y_i`` ``[B, C, H, W]`` over all 2N terms (every rank's), for points `x`
        ``[B, C, H, W]`` (`dtype`, on `device`) and ``a``, ``s2`` of shape ``[B or 1, 1, 1, 1]``.

        ``log w_i = (a x.y_i - a^2 |y_i|^2 / 2) / s^2 + const(x)``: the ``|x|^2`` term of
        ``-|x - a y_i|^2 / (2 s^2)`` is the same for every i and cancels in the softmax, so it is
        never formed (less cancellation). A mirror needs no copy: flipping is an orthogonal
        permutation, so ``x . flip(y) = flip(x) . y`` and ``sum_i w_i flip(y_i) = flip(sum_i w_i y_i)``;
        the points and their mirrors ``[2B, D]`` meet the images once.

        Streaming log-sum-exp over chunks: ``top`` ``[B]`` is each point's largest log-weight so far
        (over images and mirrors), ``total = sum_i exp(log w_i - top)``, and ``weighted`` ``[2B, D]``
        the same sums of ``exp(log w_i - top) y_i`` over the images (rows :B) and over the mirrors
        in mirrored coordinates (rows B:); a chunk with a larger maximum rescales all by
        ``exp(top_old - top_new)``.
        """
        size = len(x)
        queries = torch.cat([x, x.flip(-1)]).flatten(1)  # [2B, D]: the points, then their mirrors
        a, s2 = (v.flatten().expand(size).repeat(2)[:, None] for v in (a, s2))  # [2B, 1]
        top = torch.full((size,), -torch.inf, dtype=self.dtype, device=self.device)
        total = torch.zeros(size, dtype=self.dtype, device=self.device)
        weighted = torch.zeros_like(queries)
        with _exact_float32_matmul():
            for begin in range(0, len(self.images), self.chunk_size):
                chunk = self.images[begin:begin + self.chunk_size]
                square_norms = self.square_norms[begin:begin + self.chunk_size]
                logits = (a * (queries @ chunk.T) - 0.5 * a.square() * square_norms) / s2  # [2B, n]
                new_top = torch.maximum(top, logits.view(2, size, -1).amax((0, 2)))
                rescale = torch.exp(top - new_top)  # 0 on the first chunk (top = -inf)
                weights = torch.exp(logits - new_top.repeat(2)[:, None])
                total = total * rescale + weights.view(2, size, -1).sum((0, 2))
                weighted = weighted * rescale.repeat(2)[:, None] + weights @ chunk
                top = new_top
            if self.world is not None and self.world.size > 1:
                total, weighted = self._combine_ranks(top, total, weighted)
        plain, mirrored = weighted.view(2, *x.shape)
        return (plain + mirrored.flip(-1)) / total.view(-1, *[1] * (x.ndim - 1))

    @staticmethod
    def _combine_ranks(top: Tensor, total: Tensor, weighted: Tensor) -> tuple[Tensor, Tensor]:
        """The sums over all ranks' slices (`total` ``[B]``, `weighted` ``[2B, D]``): rescale each
        rank's to the global maximum, then add. A rank with no images (top = -inf, sums 0) adds nothing."""
        global_top = top.clone()
        dist.all_reduce(global_top, op=dist.ReduceOp.MAX)
        rescale = torch.exp(top - global_top)
        sums = torch.cat([total * rescale, (weighted * rescale.repeat(2)[:, None]).flatten()])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        return sums[:len(top)], sums[len(top):].view(weighted.shape)


@contextlib.contextmanager
def _exact_float32_matmul():
    """TF32 off for CUDA matmuls inside (restored on exit): in float32 mode the log-weights of
    3072-dim images need float32's 24-bit mantissa, not TF32's 10 bits."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def on_interval(field: Field, start: float, end: float) -> Field:
    """The field of the time change ``t = start + (end - start) tau``: integrating it over tau in
    [0, 1] integrates `field` over t in [start, end] (a solver's grid on [0, 1] maps onto that interval)."""
    length = end - start
    return lambda tau, x: length * field(start + length * tau, x)


def _check_times(times: Sequence[float]) -> None:
    if not times or any(not 0 < t < 1 for t in times) or any(b <= a for a, b in zip(times, times[1:])):
        raise ValueError(f"times must increase strictly within (0, 1), got {list(times)}.")


def trajectory_points(field: Field, x0: Tensor, times: Sequence[float], method: str = "euler",
                      steps: int = 100) -> Tensor:
    """The states ``[T, B, ...]`` of dx/dt = field(t, x) from x(0) = x0 ``[B, ...]`` at `times`.

    Solved interval by interval, ``[t_{k-1}, t_k]`` with ``max(1, round(steps (t_k - t_{k-1})))``
    steps of `method` (a fixed-step solver of solvers.py), so the points lie on the solver's
    path of about `steps` steps over [0, 1] (on its grid ``linspace(0, 1, steps + 1)`` when the
    times are multiples of 1 / steps).
    """
    _check_times(times)
    points, x, start = [], x0, 0.0
    for end in times:
        x, _ = integrate(on_interval(field, start, end), x, method, max(1, round(steps * (end - start))))
        points.append(x)
        start = end
    return torch.stack(points)


def model_trajectory_points(net: torch.nn.Module, num: int, times: Sequence[float], batch_size: int = 500,
                            method: str = "euler", steps: int = 100, seed: int = 0,
                            world: World | None = None) -> Tensor:
    """`trajectory_points` of the net's own flow from the noise of samples 0..num-1 (`sampling.noise`
    with `seed`: the FID samples' noise): float32 ``[T, num, C, H, W]`` on the CPU, on every rank.

    The net runs in eval mode under inference mode. Under torchrun the batches are split across
    ranks as sampling splits them (batch k on rank k mod W), then every rank gets all points (the
    field needs the same points on every rank).
    """
    rank, size = (world.rank, world.size) if world is not None else (0, 1)
    solves = solve_batches(net, lambda f, x0: (trajectory_points(f, x0, times, method, steps).cpu(), steps),
                            num, batch_size, seed, rank, size)
    batches = gather_batches([points for points, _ in solves], world)
    if world is not None:
        batches = broadcast_from_main(batches, world)
    return torch.cat(batches, 1)


def path_points(matcher: FlowMatcher, images: Tensor, times: Sequence[float], seed: int = 0) -> Tensor:
    """Points of the path from `images` ``[P, C, H, W]`` (uint8 or float in [-1, 1], e.g. held-out
    test images): ``xt = path(t, x0, x1 = image, eps).xt`` at each of `times`, with the same x0 and
    eps (drawn on the CPU from `seed`, so the same on every rank and device) at every time:
    float32 ``[T, P, C, H, W]`` on the CPU."""
    _check_times(times)
    x1 = to_model_range(images.cpu()) if images.dtype == torch.uint8 else images.cpu().float()
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(x1.shape, generator=generator)
    eps = torch.randn(x1.shape, generator=generator)
    return torch.stack([matcher.path(t, x0, x1, eps).xt for t in times])


@dataclass
class FieldDistance:
    """Per point and time: ``squared_error = |v_net - v*|^2`` and ``squared_norm = |v*|^2``,
    float64 ``[T, P]`` (CPU), summed over pixels."""

    times: list[float]
    squared_error: Tensor
    squared_norm: Tensor

    @property
    def per_time(self) -> list[float]:
        """``E|v_net - v*|^2 / E|v*|^2`` at each time, the expectations over the points."""
        return (self.squared_error.sum(1) / self.squared_norm.sum(1)).tolist()

    @property
    def overall(self) -> float:
        """The same ratio with the expectations over the points and the times (uniform on the grid)."""
        return (self.squared_error.sum() / self.squared_norm.sum()).item()


@torch.no_grad()
def field_distance(net: Field, field: MemorizingField, points: Tensor, times: Sequence[float],
                   batch_size: int = 500) -> FieldDistance:
    """How far ``net(t, x)`` is from v* on `points` ``[T, P, ...]`` (points ``[k]`` at ``times[k]``).

    The net (in eval mode: `build_net_from_checkpoint` returns it so) gets float32 points in batches
    of `batch_size` on the field's device, with t ``[b]``; differences are taken in the field's dtype. Under
    torchrun every rank evaluates all points (v* needs them on every rank) and gets the same result.
    """
    if len(points) != len(times):
        raise ValueError(f"{len(points)} sets of points for {len(times)} times.")
    errors, norms = [], []
    for t, points_at_t in zip(times, points):
        for batch in points_at_t.split(batch_size):
            x = batch.to(field.device, torch.float32)
            v_net = net(torch.full((len(x),), t, device=field.device), x)
            v_star = field(t, x)
            errors.append((v_net.to(v_star.dtype) - v_star).flatten(1).square().sum(1).cpu())
            norms.append(v_star.flatten(1).square().sum(1).cpu())
    shape = (len(times), -1)
    return FieldDistance(list(times), torch.cat(errors).view(shape), torch.cat(norms).view(shape))


@torch.no_grad()
def memorizing_samples(field: MemorizingField, x0: Tensor, delta: float = 1e-3, method: str = "euler",
                       steps: int = 100) -> Tensor:
    """The v*-driven sampler: dx/dt = v*(x, t) from x0 ``[B, ...]`` up to t = 1 - `delta` (v* is never
    evaluated at t = 1, where it is undefined for sigma = 0), with `steps` steps of a fixed-step
    solver. Returns x(1 - delta) ``[B, ...]`` in the field's dtype: each within about
    ``s sqrt(D)`` of a training image or mirror (``s^2 = b^2 + sigma^2`` at 1 - delta, the width of
    the path around an image there: about delta for icfm with sigma = 0)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}.")
    samples, _ = integrate(on_interval(field, 0.0, 1.0 - delta), x0.to(field.device, field.dtype), method, steps)
    return samples
