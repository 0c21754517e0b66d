"""Sampling from a trained flow: integrate dx/dt = v(t, x) from noise x0 at t=0 to data x1 at t=1.

One code path serves training (sample grids), compute_fid.py, the benchmark and the tests.

The solvers (dopri5, euler, midpoint, heun, rk4) and their settings are in solvers.py.

Noise is keyed by sample index: sample i comes from its own generator seeded with (seed, i), so it
is the same whatever the batch size, the number of processes and the device, and torch's global RNG
is never touched (training resumes exactly after drawing a sample grid). With the fixed-step solvers
each image therefore depends only on (seed, index); with dopri5 the step sizes are shared by the
batch, so images depend on the batch composition too (within the solver tolerance).

Under torchrun the samples are split by whole batches: batch k (samples kB .. kB + B - 1) runs on
rank k mod W, so every batch, and with it every dopri5 solve, is the one a single process makes.
Rank 0 gathers the results back into sample order (``gather_shares``). The ranks that finish first
wait for the others (the one with the last, partial batch) in the long-wait group
(``distributed.wait_for_all``), never in the training collectives; a rank whose share raised tells
the others there, so no rank waits for a share that never comes.

A stop request (``stop``, e.g. a pre-emption signal during a training run's sample grids or FID)
is checked before every evaluation of the net: it cuts a solve short within one evaluation
(``SamplingStopped``).

A label-conditioned net is sampled under a `Guidance` (cfm/method/guidance.py): sample i with
label ``labels[i]`` under the guided field of scale w, whose NFE counts every network evaluation
(2 per call for w other than 0 and 1). Without one, such a net gives its unconditional field.

Straightness (Liu et al. 2022, "Flow straight and fast") measures how far the learned paths are from
straight lines; see ``path_straightness``.

Image layout: uint8 tensors are NCHW [N, 3, 32, 32] (the Inception input and torchvision layout);
compute_fid.py transposes to NHWC only when it writes the ``.npz`` evaluator file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from cfm.evaluation.solvers import Field, check_solver, integrate
from cfm.io.atomic_files import atomic_write
from cfm.io.cifar10 import to_uint8
from cfm.io.distributed import World, gather_everywhere, gather_to_main, process_rank, wait_for_all
from cfm.io.errors import writing
from cfm.method.guidance import Guidance


class SamplingStopped(Exception):
    """A stop request cut sampling short (this rank's, or under torchrun any rank's share of the job)."""


class ShareFailed(RuntimeError):
    """Under torchrun, a rank's share of a split sampling job raised: every rank raises this, naming
    that rank and its error, so none waits for a share that never comes."""


def noise(indices: int | Sequence[int], shape: tuple[int, ...] = (3, 32, 32), seed: int = 0) -> Tensor:
    """x0 ~ N(0, I) of the samples `indices` (an int n: samples 0..n-1): float32 [len, *shape] on the CPU.

    Sample i is drawn from its own numpy generator keyed by SeedSequence([seed, i]) (seed taken mod
    2^64): a function of (seed, i) alone, so any process can draw any sample without drawing the
    ones before it, and torch's global RNG is untouched. (torch's CPU generator keeps only 32 bits
    of its seed: too few to key (seed, index) pairs without collisions.)
    """
    indices = range(indices) if isinstance(indices, int) else indices
    draws = [np.random.default_rng([seed % 2**64, i]).standard_normal(shape, dtype=np.float32) for i in indices]
    return torch.from_numpy(np.stack(draws))


def batch_ranges(num: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[range]:
    """The sample indices of each batch rank `rank` of `world_size` solves, in order.

    Batch k holds samples [k B, min((k + 1) B, num)) and runs on rank k mod W. Ranks take whole
    batches because dopri5 shares its step sizes across a batch: a batch split differently would
    give (slightly) different images, and a different FID, for another number of processes.
    """
    return [range(start, min(start + batch_size, num)) for start in range(rank * batch_size, num, world_size * batch_size)]


def interleave(per_rank: Sequence[Sequence]) -> list:
    """Batches gathered from W ranks back in sample order: rank r's list holds batches r, r + W, ..."""
    world_size = len(per_rank)
    return [per_rank[k % world_size][k // world_size] for k in range(sum(map(len, per_rank)))]


def gather_batches(batches: list, world: World | None) -> list | None:
    """Every rank's per-batch results, in sample order (batch 0, 1, ...), on rank 0; None on the
    others. Every rank calls it when its share is done (see `gather_shares`)."""
    if world is None or world.size == 1:
        return batches
    gathered = gather_to_main(batches, world)
    return interleave(gathered) if gathered is not None else None


_STOPPED = "stopped"  # what a rank whose share a stop request cut short reports to the others


def gather_shares(share: Callable[[], list], world: World | None, what: str = "sampling") -> list | None:
    """Run this rank's share of a split job (`share()` -> its per-batch results) and return every
    rank's, in sample order, on rank 0 (None on the others). Alone: ``share()``.

    The ranks that finish first wait for the others in the long-wait group (the last batch may be
    partial, a device slower). Then the ranks exchange how their shares ended: if one raised, every
    rank raises `SamplingStopped` (a stop request cut it short) or `ShareFailed` (naming the rank
    and its error), instead of waiting for results that never come.
    """
    if world is None or world.size == 1:
        return share()
    try:
        batches, failure = share(), None
    except SamplingStopped:
        batches, failure = [], _STOPPED
    except Exception as err:  # noqa: BLE001 -- told to every rank below, raised there
        batches, failure = [], f"{type(err).__name__}: {err}"
    wait_for_all(world, what)
    failures = gather_everywhere(failure, world)
    failed = [(rank, f) for rank, f in enumerate(failures) if f not in (None, _STOPPED)]
    if failed:
        rank, message = failed[0]
        raise ShareFailed(f"rank {rank}'s share of {what} failed: {message}")
    if _STOPPED in failures:
        raise SamplingStopped(f"a stop request cut rank {failures.index(_STOPPED)}'s share of {what} short")
    return gather_batches(batches, world)


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


def _rank_of(world: World | None) -> tuple[int, int]:
    return (world.rank, world.size) if world is not None else (0, 1)


def _stoppable(field: Field, stop: Callable[[], bool] | None) -> Field:
    """`field` v(t, x), raising SamplingStopped once `stop()` is true (checked before every
    evaluation: a long solve ends within one evaluation of the request)."""
    if stop is None:
        return field

    def stoppable(t: Tensor, x: Tensor) -> Tensor:
        if stop():
            raise SamplingStopped("a stop request cut sampling short")
        return field(t, x)

    return stoppable


def solve_batches(
    net: torch.nn.Module, solve: Callable, num: int, batch_size: int, seed: int, rank: int, world_size: int,
    stop: Callable[[], bool] | None = None, guidance: Guidance | None = None,
) -> Iterator[tuple[Tensor, int]]:
    """Yield (out [b, ...], nfe) for each of this rank's batches (see batch_ranges), where `solve(field,
    x0)` returns out and its number of field calls, and nfe counts network evaluations per sample.

    x0 is the batch's noise on the net's device; `field` is the net, or with `guidance` the batch's
    guided field (its labels; nfe = calls x rows per sample), checking `stop` first when given
    (see `_stoppable`). Each solve runs under ``torch.inference_mode()`` (no autograd
    records, no version counters) with the net in eval mode; its previous mode is restored after
    every batch. The outputs are inference tensors: read them, do not train on them.
    """
    if num < 1 or batch_size < 1:
        raise ValueError(f"num ({num}) and batch_size ({batch_size}) must be positive.")
    if guidance is not None and len(guidance.labels) < num:
        raise ValueError(f"guidance holds {len(guidance.labels)} labels for {num} samples.")
    shape, device = _sample_shape(net), _device_of(net)
    for indices in batch_ranges(num, batch_size, rank, world_size):
        x0 = noise(indices, shape, seed).to(device)
        field = net if guidance is None else guidance.field(net, indices)
        per_call = getattr(field, "evaluations_per_call", 1)
        # Entered per batch, never held across a yield: the caller's grad mode and the net's
        # train/eval mode are its own between batches, even if it stops iterating early.
        with _eval_mode(net), torch.inference_mode():
            out, calls = solve(_stoppable(field, stop), x0)
        yield out, calls * per_call


def _progress(
    batches: Iterator[tuple[Tensor, int]], num: int, batch_size: int, world: World | None, show: bool,
    desc: str = "sampling", unit: str = "img",
) -> Iterator[tuple[Tensor, int]]:
    """Pass this rank's (out, nfe) batches of a `num`-sample job through while a tqdm bar over samples
    shows images/s, the mean NFE so far and the ETA, on rank 0 only (under torchrun: rank 0's share)."""
    rank, world_size = _rank_of(world)
    total = sum(map(len, batch_ranges(num, batch_size, rank, world_size)))
    if world_size > 1:
        desc = f"{desc} (rank 0 of {world_size})"
    done = nfe_total = 0
    with tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=not show or process_rank() != 0) as bar:
        for out, nfe in batches:
            yield out, nfe
            done += len(out)
            nfe_total += nfe * len(out)
            bar.set_postfix(nfe=f"{nfe_total / done:.1f}", refresh=False)
            bar.update(len(out))


def sample_batches(
    net: torch.nn.Module,
    num: int,
    batch_size: int,
    method: str = "dopri5",
    steps: int = 100,
    tol: float = 1e-5,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    stop: Callable[[], bool] | None = None,
    guidance: Guidance | None = None,
) -> Iterator[tuple[Tensor, int]]:
    """Yield (x1, nfe) batch by batch: x1 float [b, C, H, W] (about [-1, 1], unclipped) on the net's device.

    Batches hold `batch_size` samples (the last one the remainder), num in all over the
    `world_size` ranks; this rank gets batches rank, rank + W, ... (see batch_ranges). Raises
    SamplingStopped once `stop()` is true. `guidance`: a conditional net's labels and scale.
    """
    check_solver(method)
    yield from solve_batches(net, lambda f, x0: integrate(f, x0, method=method, steps=steps, tol=tol),
                              num, batch_size, seed, rank, world_size, stop, guidance)


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
    world: World | None = None,
    progress: bool = False,
    stop: Callable[[], bool] | None = None,
    guidance: Guidance | None = None,
) -> tuple[Tensor | None, float | None]:
    """Sample `num` images: uint8 NCHW [num, C, H, W] on the CPU (None if not `keep`), and the mean
    NFE per sample.

    Mapped to uint8 as published: (x * 127.5 + 128).clip(0, 255) (``cifar10.to_uint8``), on the
    device before the copy to the host. Runs where the net's parameters are. `on_batch` gets each
    uint8 batch on the device as it is made (e.g. to featurise it for FID while sampling goes on).
    `progress` draws a bar on rank 0.

    Under torchrun (`world` of size W > 1) each rank samples its own batches (``on_batch`` sees only
    those) and rank 0 returns all `num` in sample order, exactly what one process returns; the
    other ranks return (None, None). `stop` cuts sampling short (SamplingStopped; under torchrun on
    every rank, see `gather_shares`). `guidance`: a conditional net's labels (sample i: labels[i])
    and scale, the mean NFE counting both rows of a guided call.
    """

    def share() -> list:  # (uint8 images on the CPU or None, nfe, batch length) per batch of this rank
        batches = []
        solves = sample_batches(net, num, batch_size, method, steps, tol, seed, *_rank_of(world), stop=stop,
                                guidance=guidance)
        for x1, nfe in _progress(solves, num, batch_size, world, progress):
            images = to_uint8(x1)
            if on_batch is not None:
                on_batch(images)
            batches.append((images.cpu() if keep else None, nfe, len(x1)))
        return batches

    batches = gather_shares(share, world)
    if batches is None:
        return None, None
    mean_nfe = sum(nfe * length for _, nfe, length in batches) / num
    return (torch.cat([images for images, _, _ in batches]) if keep else None), mean_nfe


def path_straightness(field: Field, x0: Tensor, steps: int) -> Tensor:
    """Straightness of each path of dx/dt = field(t, x) from x0 [B, ...]: float64 [B], 0 for straight paths.

    On the Euler grid t_i = i / N (N = `steps`), x_{i+1} = x_i + v_i / N with v_i = field(t_i, x_i):

        S = (1/N) sum_{i<N} || (x(1) - x(0)) - v_i ||^2      (squared norm summed over pixels)

    the discretised integral int_0^1 E||(X1 - X0) - v(t, X_t)||^2 dt of Liu et al. (2022). On this
    grid x(1) - x(0) = (1/N) sum_i v_i is the mean velocity, so S is the spread of the velocities
    along the path about their mean: accumulated in one pass with Welford's update (no trajectory is
    stored, and a constant field gives exactly 0). Costs N evaluations, in the caller's grad mode.
    """
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=x0.dtype, device=x0.device)
    x, mean = x0, torch.zeros_like(x0)
    spread = torch.zeros(len(x0), dtype=torch.float64, device=x0.device)
    for i in range(steps):
        v = field(grid[i], x)
        delta = v - mean
        mean = mean + delta / (i + 1)
        spread += (delta * (v - mean)).flatten(1).sum(1, dtype=torch.float64)
        x = x + (grid[i + 1] - grid[i]) * v
    return spread / steps


def straightness(
    net: torch.nn.Module,
    num: int,
    batch_size: int = 1024,
    steps: int = 100,
    seed: int = 0,
    world: World | None = None,
    progress: bool = False,
) -> float | None:
    """Mean ``path_straightness`` of the net's flow over the paths from the noise of samples 0..num-1
    (the first `num` FID samples); split across ranks like ``generate_samples``. None off rank 0."""
    if steps < 1:
        raise ValueError(f"steps must be a positive number of Euler steps, got {steps}.")

    def share() -> list:  # straightness [b] per batch of this rank
        solves = solve_batches(net, lambda f, x0: (path_straightness(f, x0, steps), steps),
                                num, batch_size, seed, *_rank_of(world))
        return [s.cpu() for s, _ in _progress(solves, num, batch_size, world, progress, "straightness", "path")]

    values = gather_shares(share, world, "straightness")
    return None if values is None else torch.cat(values).mean().item()


def save_sample_grid(
    net: torch.nn.Module,
    path: str | os.PathLike,
    num: int = 64,
    method: str = "euler",
    steps: int = 99,
    tol: float = 1e-5,
    seed: int = 0,
    nrow: int = 8,
    stop: Callable[[], bool] | None = None,
) -> Path:
    """Write a PNG grid of `num` samples (Euler, 99 steps by default: the published grids integrate
    over ``t_span = linspace(0, 1, 100)``, i.e. 99 Euler steps).

    Samples are clipped to [-1, 1] and mapped to [0, 1] (x / 2 + 0.5), then written by
    ``torchvision.utils.save_image(..., nrow=8)``. Neither torch's global RNG nor the net's
    train/eval mode is changed, so a training run continues exactly as if no grid had been drawn.
    A failed write is a `errors.SaveError`. `stop` cuts sampling short (SamplingStopped),
    before anything is written.
    """
    x1 = torch.cat([x for x, _ in sample_batches(net, num, num, method, steps, tol, seed, stop=stop)])
    return write_image_grid(path, x1.clip(-1, 1).cpu() / 2 + 0.5, nrow)


def write_image_grid(path: str | os.PathLike, images: Tensor, nrow: int) -> Path:
    """`images` [N, 3, H, W] float in [0, 1] -> a PNG grid of `nrow` columns
    (``torchvision.utils.save_image``), written atomically: a failed write (a full disk, a read-only
    folder) is one sentence (`errors.SaveError`) and never leaves half a file."""
    from torchvision.utils import save_image

    path = Path(path)
    with writing(path):
        atomic_write(path, lambda f: save_image(images, f, nrow=nrow, format="png"))
    return path
