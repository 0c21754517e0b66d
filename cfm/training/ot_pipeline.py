"""Pipelined OT (--ot_pipeline): the next step's batch and noise are drawn, and their exact OT plan
solved on a worker thread, while the device runs the current step.

Exact OT needs the CPU (POT's ``ot.emd`` on the B x B cost; it releases the GIL). Inline, a step
draws its batch, copies the cost matrix to the host (waiting for all the work queued before it on the
device), solves, and only then queues its forward: the device idles for the copy and the solve.
Pipelined, right after step k has been queued (and checkpointed), the loop calls `prefetch`:

    side stream:  batch k+1, noise x0 k+1, costs [blocks, n, n] -> pinned host memory (no blocking)
    worker:       wait for that copy, solve the plans (POT only: no generator, no device work, no
                  collective, so every rank solves its own copy of the same plans)
    main thread:  free again at once; step k+1's `next` waits for the plans, which were solved while
                  the device ran step k, and the main stream waits for the side stream's tensors

Bit for bit the same run as inline: `prefetch` draws what `next` would draw first, from the same
shared streams (batch source, step generator) and right after the step's last draw, so every stream
is drawn in the same order (no stream of its own is needed). A checkpoint written after step k and
before the prefetch holds the streams from before it: a resumed run draws that batch again, inline.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Drawn:
    """A step's global batch x1 [B,3,32,32] (cluster ids [B] or None), its noise x0 [B,3,32,32] and
    the matcher's OT plans: a list of [n, n] float64 arrays (a Future while the worker solves them),
    None for a matcher that needs none."""

    x1: Tensor
    cluster: Tensor | None
    x0: Tensor
    plans: list | Future | None


class OTPipeline:
    """Draws each step's batch, noise and OT plans, ahead of the step when `pipelined` (see the module docstring).

    Args:
        batches: the training BatchSource (its `next_batch()` gives the global batch).
        matcher: the flow matcher (`costs` and `solve` for otcfm; others need no plan).
        generator: the step's shared generator, on the training device (draws x0).
        device: the training device.
        pipelined: solve the next plans on a worker thread after each step (else inline in `next`).
    """

    def __init__(self, batches, matcher, generator: torch.Generator, device: torch.device, pipelined: bool):
        self.batches, self.matcher, self.generator, self.device = batches, matcher, generator, device
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="ot") if pipelined else None
        self.side_stream = torch.cuda.Stream(device) if pipelined and device.type == "cuda" else None
        self.ahead: Drawn | None = None  # the next step's draw, once `prefetch` made it

    def prefetch(self) -> None:
        """Draw the next step's batch and noise now and hand its plans to the worker (no-op inline)."""
        if self.worker is not None:
            self.ahead = self.fetch(ahead=True)

    def next(self) -> Drawn:
        """This step's draw with its plans solved, its tensors ready for the main stream."""
        drawn, self.ahead = self.ahead or self.fetch(), None
        if self.side_stream is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(self.side_stream)
            for x in (drawn.x1, drawn.x0, drawn.cluster):
                if x is not None:
                    x.record_stream(main)  # the allocator must not reuse their memory before main is done
        if isinstance(drawn.plans, Future):
            drawn.plans = drawn.plans.result()
        return drawn

    def fetch(self, ahead: bool = False) -> Drawn:
        """The global batch (the same on every rank), its noise x0 and the matcher's OT plans:
        solved on the worker when `ahead`, else here (a host sync, inherent to exact OT)."""
        side = self.side_stream
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            # An inline fetch (the first after a start or resume) follows what the main stream wrote
            # (the data, a loaded sampler state). A fetch ahead must not wait for the step it is to
            # overlap; between steps the main stream writes nothing the batch source reads.
            if side is not None and not ahead:
                side.wait_stream(torch.cuda.current_stream(self.device))
            x1, cluster = self.batches.next_batch()
            x0 = torch.randn(x1.shape, dtype=x1.dtype, device=x1.device, generator=self.generator)
            costs = self.matcher.costs(x0, x1)
            if costs is None:
                return Drawn(x1, cluster, x0, None)
            # From a side stream into pinned host memory without blocking; `copied` marks its end.
            costs = costs.to("cpu", torch.float64, non_blocking=side is not None)
            copied = None
            if side is not None:
                copied = torch.cuda.Event()
                copied.record(side)
        plans = self.worker.submit(self.solve, costs, copied) if ahead else self.solve(costs, copied)
        return Drawn(x1, cluster, x0, plans)

    def solve(self, costs: Tensor, copied: torch.cuda.Event | None) -> list:
        """The OT plans of host costs [blocks, n, n] once their copy from the device has landed."""
        if copied is not None:
            copied.synchronize()
        return self.matcher.solve(costs.numpy())
