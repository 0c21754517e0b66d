"""The Trainer: net, EMA, Adam, warm-up schedule, matcher, batch sources and the shared random streams,
and `Trainer.step`, one optimisation step (see loop.py for where it runs). Also the protocols a batch
source and a regularizer follow, and the EMA update.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from absl import logging
from torch import Tensor

from cfm.config import ExecutionConfig, OptimConfig
from cfm.io.distributed import World, mean_over_ranks, own_rows
from cfm.method.flow_matching import FlowSample
from cfm.method.unet import UNetModel
from cfm.training.conditioning import Conditioning
from cfm.training.fast_path import FastForward, resolve_precision
from cfm.training.ot_pipeline import OTPipeline


@torch.no_grad()
def ema_update(ema_params: list[Tensor], net_params: list[Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * net, over parameter lists, as one fused foreach lerp.

    Pass `list(ema.parameters())` and `list(net.parameters())`: the UNet has no buffers
    (GroupNorm keeps no running statistics), so parameters are its whole state.
    """
    torch._foreach_lerp_(ema_params, net_params, 1.0 - decay)


class BatchSource(Protocol):
    """Yields training batches on the device; its state makes a resumed stream exact.

    `single_cluster`: every batch's ids are one cluster's (logged as the step's `cluster`), rather
    than one id per image (e.g. each image's class)."""

    single_cluster: bool

    def next_batch(self) -> tuple[Tensor, Tensor | None]:
        """x1 [B,3,32,32] float in [-1,1] (flipped at random) and cluster ids [B] (or None)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Regularizer(Protocol):
    """A training term added to loss_fm with weight `weight`.

    Its extra network inputs are appended to the main forward call: one batched call (GroupNorm is
    per sample, so results are unchanged), better GPU use, and DDP sees a single forward.
    """

    name: str  # logged as f"{name}_loss" and as "regularized_loss"
    weight: float

    def extra_inputs(self, x1: Tensor, x0: Tensor, cluster: Tensor | None,
                     sample: FlowSample | None) -> tuple[Tensor, Tensor, object, Tensor]:
        """(t_extra [E], x_extra [E,3,32,32], ctx, rows [E]): where to evaluate the net, what loss()
        needs, and the row of x1 each extra row evaluates (its label's image, conditioning.py).

        x1, x0: the batch and noise as drawn (before any OT re-pairing); sample: the main term's
        draw (None when monitoring)."""

    def loss(self, vt: Tensor | None, v_extra: Tensor, ctx) -> Tensor:
        """Scalar loss from the main prediction vt [B,...] and the extra outputs v_extra [E,...]."""

    def before_step(self, step: int) -> None:
        """Hook at the start of each step (e.g. refresh centroids)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def warmup_schedule(warmup: int):
    """lr multiplier at scheduler step s: min(s, warmup) / warmup (0 at the first step, as published)."""
    return lambda s: min(s, warmup) / warmup if warmup > 0 else 1.0


# Checkpoint keys of the random streams shared by all ranks (ckpt["streams"][key]).
TRAIN_STREAM, MONITOR_STREAM = "batches", "monitor_batches"


# The monitor's noise has its own generator, seeded apart from the step stream, so that logging
# (how often, or at all) never changes what is trained.
MONITOR_SEED_OFFSET = 1_000_003


@dataclass
class StepInputs:
    """This rank's share of one step's draw: where the net is evaluated and what the losses compare.

    t, x: ``[R]`` and ``[R,3,32,32]``, the main term's rows then the regularizer's extra rows
    ut: ``[b,3,32,32]``, the main term's target velocity for its first ``b`` rows
    ctx: what the regularizer's loss needs (None without a regularizer)
    cluster: ``[B]`` the global batch's ids from its source (clustered sources: cluster ids), else None
    y: ``[R]`` a conditional run's labels of the rows of ``x`` (conditioning.py), else None
    """

    t: Tensor
    x: Tensor
    ut: Tensor
    ctx: object = None
    cluster: Tensor | None = None
    y: Tensor | None = None


class Trainer:
    """Owns net, EMA, optimizer, schedule, matcher, batch sources and random streams; `step()` does
    one update: `draw` the inputs, evaluate the `losses`, `update` the weights.

    World-size invariance (see `distributed.py`): the batch sources yield the global batch, and
    every random draw of a step (noise, t, eps, OT pairing, the regularizer's draws) comes from
    `generator`, seeded with --seed on every rank. Every rank thus computes the same global sample
    and trains on its own block of rows. Only dropout uses torch's global RNG (seed + rank).
    """

    def __init__(self, net, ema, optimizer, scheduler, matcher, batches, optim: OptimConfig,
                 execution: ExecutionConfig, world: World, regularizer=None, monitor=None, ddp_net=None,
                 condition: Conditioning | None = None):
        self.net = net  # the bare module (EMA source, checkpoints)
        self.precision = resolve_precision(execution.precision, world.device)
        # What the step calls: the DDP wrapper when distributed, compiled with --compile. The
        # monitor's batch has another shape (a recompilation), so it calls the bare net, eager.
        self.forward = FastForward(ddp_net or net, world.device, self.precision, execution.channels_last,
                                   execution.compile_mode if execution.compile else None)
        self.monitor_forward = FastForward(net, world.device, self.precision, execution.channels_last)
        self.ema, self.optimizer, self.scheduler = ema, optimizer, scheduler
        self.matcher, self.batches, self.regularizer = matcher, batches, regularizer
        self.monitor = monitor  # (BatchSource, Regularizer) or None
        self.condition = condition  # a conditional run's labels (conditioning.py), or None
        self.world = world
        self.grad_clip, self.ema_decay = optim.grad_clip, optim.ema_decay
        self.global_batch = optim.batch_size
        self.generator = torch.Generator(world.device).manual_seed(optim.seed)
        self.monitor_generator = torch.Generator(world.device).manual_seed(optim.seed + MONITOR_SEED_OFFSET)
        # Listed once: walking 300 parameters per step costs host time the GPU would wait for.
        self.params, self.ema_params = list(net.parameters()), list(ema.parameters())
        # Divergence watch, on the device (no host sync per step): whether every loss and gradient
        # norm so far was finite, and the step and values where that first failed.
        self.finite = torch.ones((), dtype=torch.bool, device=world.device)
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=world.device)
        self.first_bad_values: Tensor | None = None
        self.watched: list[str] = []  # names of the watched values
        # Each step's batch, noise and OT plans; with --ot_pipeline drawn and solved ahead (`prefetch`).
        self.pipeline = OTPipeline(batches, matcher, self.generator, world.device, execution.ot_pipeline)
        # The term logged as `regularized_loss`: the trained regularizer, else the monitored one.
        logged = regularizer if regularizer is not None else monitor[1] if monitor is not None else None
        self.regularized_name = f"{logged.name}_loss" if logged is not None else None

    def own(self, x):
        """This rank's rows of a global tensor, or of each tensor of a tuple (see distributed.own_rows)."""
        if isinstance(x, tuple):
            return tuple(own_rows(part, self.global_batch, self.world) for part in x)
        return own_rows(x, self.global_batch, self.world)

    def step(self, step: int, with_metrics: bool = False) -> dict:
        """One optimisation step. Returns device tensors (no host sync; `lr` is the host's float);
        the full metric set only when `with_metrics`, to keep non-log steps free of extra
        reductions and monitor passes."""
        inputs = self.draw(step)
        terms, loss, vt = self.losses(inputs)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this update uses (a float: no sync)
        grad_norm = self.update(loss)
        self.watch_finite(step, {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()},
                                 "grad_norm": grad_norm})

        if not with_metrics:
            return {"loss": loss.detach()}
        metrics = {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}, "lr": lr,
                   "all_finite": self.finite}
        if inputs.cluster is not None and self.batches.single_cluster:
            metrics["cluster"] = inputs.cluster[0]
        metrics["grad_norm"] = grad_norm
        metrics["vector_field_mean_norm"] = vt.detach().flatten(1).norm(dim=1).mean()
        if self.monitor is not None:
            metrics.update(self.monitor_losses())
        return metrics

    def prefetch(self) -> None:
        """Pipelined OT: draw the next step's batch and noise and solve its OT plans on the worker
        thread while the device runs the step just queued (see ot_pipeline.py; no-op inline). The
        loop calls it after a step's checkpoint, which thus holds the streams from before the draw."""
        self.pipeline.prefetch()

    def draw(self, step: int) -> StepInputs:
        """The step's random draws, all from the streams every rank shares: the global batch, its
        noise and OT plans (`prefetch`ed, or drawn now), the matcher's pairing, t and eps, the
        regularizer's inputs; this rank's rows of them."""
        reg, g = self.regularizer, self.generator
        if reg is not None:
            reg.before_step(step)
        drawn = self.pipeline.next()
        x1, cluster, x0 = drawn.x1, drawn.cluster, drawn.x0
        sample = self.matcher.sample(x0, x1, generator=g, plans=drawn.plans)
        t, x, ut = self.own(sample.t), self.own(sample.xt), self.own(sample.ut)
        if reg is None:
            return StepInputs(t, x, ut, cluster=cluster, y=self.row_labels(cluster, sample.index))
        # The regularizer sees the batch as drawn, as the published scripts do.
        t_extra, x_extra, ctx, rows = reg.extra_inputs(x1, x0, cluster, sample, generator=g)
        return StepInputs(torch.cat([t, self.own(t_extra)]), torch.cat([x, self.own(x_extra)]), ut, self.own(ctx),
                          cluster, self.row_labels(cluster, sample.index, rows))

    def row_labels(self, ids: Tensor | None, index: Tensor | None, rows: Tensor | None = None) -> Tensor | None:
        """This rank's labels of the step's rows, each its image's (see conditioning.py): the main
        rows' images ``x1[index]`` (None: as drawn), then the extra rows' ``x1[rows]``, with the
        classifier-free-guidance drop drawn from the step generator (after every other draw of the
        step); None for an unconditional run, which draws nothing here."""
        if self.condition is None:
            return None
        labels = self.condition.labels(ids, self.batches)
        y = labels if index is None else labels[index]
        if rows is not None:
            y = torch.cat([y, labels[rows]])
        y = self.condition.drop(y, len(labels), self.generator)
        return torch.cat([self.own(part) for part in y.split(len(labels))])

    def losses(self, inputs: StepInputs) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """(terms, loss, vt): the named loss terms, their weighted sum and the main prediction
        ``vt`` [b,3,32,32], from one forward call over the main and extra rows (outputs in the inputs' dtype)."""
        reg = self.regularizer
        v = self.forward(inputs.t, inputs.x, inputs.y)
        vt = v[: len(inputs.ut)]
        terms = {"loss_fm": F.mse_loss(vt, inputs.ut)}
        loss = terms["loss_fm"]
        if reg is not None:
            terms[f"{reg.name}_loss"] = reg.loss(vt, v[len(inputs.ut):], inputs.ctx)
            loss = loss + reg.weight * terms[f"{reg.name}_loss"]
        return terms, loss, vt

    def update(self, loss: Tensor) -> Tensor:
        """Backward, clip, Adam, schedule, EMA; returns the gradient norm before clipping (a device scalar)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        ema_update(self.ema_params, self.params, self.ema_decay)
        return grad_norm

    def watch_finite(self, step: int, values: dict[str, Tensor]) -> None:
        """Fold this step's values into the divergence watch (a few tiny device ops, no sync)."""
        stacked = torch.stack(list(values.values())).float()
        ok = torch.isfinite(stacked).all()
        newly_bad = self.finite & ~ok
        if self.first_bad_values is None:
            self.watched, self.first_bad_values = list(values), torch.zeros_like(stacked)
        self.first_bad_step = torch.where(newly_bad, step, self.first_bad_step)
        self.first_bad_values = torch.where(newly_bad, stacked, self.first_bad_values)
        self.finite = self.finite & ok

    def first_non_finite(self) -> tuple[int, str]:
        """The first step with a non-finite value (-1 if none on this rank) and its values, e.g.
        "loss=nan, loss_fm=nan, grad_norm=inf" (a host sync: call it only when stopping)."""
        step = int(self.first_bad_step.item())
        if self.first_bad_values is None or step < 0:
            return step, ""
        return step, ", ".join(f"{name}={value:.4g}" for name, value in zip(self.watched, self.first_bad_values.tolist()))

    @torch.no_grad()
    def monitor_losses(self) -> dict[str, Tensor]:
        """The monitor regularizer's loss on a global batch of its own source and noise of its own
        (as the published monitor draws them), without training on it; each rank evaluates its rows."""
        batches, reg = self.monitor
        g = self.monitor_generator
        x1, cluster = batches.next_batch()
        x0 = torch.randn(x1.shape, dtype=x1.dtype, device=x1.device, generator=g)
        t_extra, x_extra, ctx, rows = reg.extra_inputs(x1, x0, cluster, None, generator=g)
        # A conditional net is monitored on its images' labels, none dropped (the conditional field).
        y = None if self.condition is None else self.own(self.condition.labels(cluster, batches)[rows])
        v_extra = self.monitor_forward(self.own(t_extra), self.own(x_extra), y)
        return {f"{reg.name}_loss": reg.loss(None, v_extra, self.own(ctx))}

    def batch_sources(self) -> dict:
        """The batch sources whose streams a checkpoint keeps, by state key."""
        sources = {TRAIN_STREAM: self.batches}
        if self.monitor is not None:
            sources[MONITOR_STREAM] = self.monitor[0]
        return sources

    def streams_state(self) -> dict:
        """The random streams shared by all ranks: step and monitor generators, batch sources.

        Taken between a step and the next `prefetch` (as the loop saves): after one, the streams
        would have moved past a batch that no checkpoint holds."""
        if self.pipeline.ahead is not None:
            raise RuntimeError("streams_state() after prefetch(): save before prefetching the next step.")
        state = {"generator": self.generator.get_state(), "monitor_generator": self.monitor_generator.get_state()}
        for key, source in self.batch_sources().items():
            state[key] = {**source.state_dict(), "kind": type(source).__name__}
        return state

    def load_streams_state(self, state: dict) -> None:
        """Restore the shared streams. A source of another kind (e.g. a plain run continued with the
        locality script) cannot continue its stream: it restarts from --seed, with a warning."""
        self.generator.set_state(state["generator"])
        self.monitor_generator.set_state(state["monitor_generator"])
        for key, source in self.batch_sources().items():
            stored = state.get(key)
            if stored is None or stored.get("kind") != type(source).__name__:
                logging.warning("the checkpoint holds no %s stream for %s: it restarts from --seed.",
                                type(source).__name__, key)
                continue
            source.load_state_dict({k: v for k, v in stored.items() if k != "kind"})


def host_metrics(metrics: dict, world: World) -> dict:
    """A log step's metrics as python numbers, averaged over ranks, in one device-to-host copy.

    `cluster` (the batch's cluster) is an id, not a quantity: rank 0's own is kept. `all_finite`
    averaged over ranks is 1 only if every rank's values were finite.
    """
    tensors = {k: v.float() for k, v in metrics.items() if isinstance(v, Tensor)}
    local = torch.stack(list(tensors.values()))
    reduced = mean_over_ranks(local, world)  # every rank reaches this line on the same steps
    local_values, reduced_values = torch.stack([local, reduced]).tolist()  # the one host sync
    values = {k: (int(lv) if k == "cluster" else rv) for k, lv, rv in zip(tensors, local_values, reduced_values)}
    return {**metrics, **values}


def build_trainer(optim: OptimConfig, execution: ExecutionConfig, unet_config: dict, world: World, matcher, batches,
                  regularizer=None, monitor=None, condition: Conditioning | None = None) -> Trainer:
    """Net (`UNetModel(**unet_config)`), EMA (a frozen copy, never wrapped in DDP), Adam, warm-up
    schedule and DDP wrapper; `condition`: a conditional run's labels (unet_config's num_classes)."""
    memory_format = torch.channels_last if execution.channels_last else torch.contiguous_format
    net = UNetModel(**unet_config).to(world.device, memory_format=memory_format)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    # fused: one kernel for all parameters on CUDA (same maths; not implemented for every CPU build).
    optimizer = torch.optim.Adam(net.parameters(), lr=optim.lr, fused=world.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(optim.warmup))
    ddp_net = None
    if world.size > 1:
        ddp_net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[world.device.index] if world.device.type == "cuda" else None
        )
        # DDP gave every rank rank 0's initial weights (each rank drew its own: seed + rank); so
        # does the EMA, which every rank samples for its share of the FID.
        ema.load_state_dict(net.state_dict())
    return Trainer(net, ema, optimizer, scheduler, matcher, batches, optim, execution, world, regularizer, monitor,
                   ddp_net, condition)
