"""The one training loop behind every training script.

A script defines its own flags, picks a regularizer (or none) and calls `run(FLAGS, ...)`. One code
path serves a plain `python train_*.py` (a world of size 1) and `torchrun` (one process per GPU):
every rank computes, only rank 0 writes files or logs.

One step (see `Trainer.step`), the same on every rank up to the forward call:
    x1, cluster, x0, plans = pipeline.next()           # the global batch [B,3,32,32] in [-1,1], its noise and
                                                       # OT plans, drawn from the streams all ranks share
    sample = matcher.sample(x0, x1, generator=g)       # t, x0, x1, xt, ut (otcfm re-pairs by exact OT)
    t_extra, x_extra, ctx = regularizer.extra_inputs(x1, x0, cluster, sample, g)   # the batch as drawn
    v = net(own(t ++ t_extra), own(xt ++ x_extra))     # this rank's rows; regularizer rows in the same call;
                                                       # --precision / --channels_last / --compile: fast_path.py
    loss = mse(vt, own(ut)) + lambda * regularizer.loss(vt, v_extra, own(ctx))
    backward (DDP averages) -> clip (grad_norm) -> Adam -> warm-up schedule -> EMA lerp -> finiteness flag
After each step: metrics (log steps); on save steps the checkpoint, then the sample grids (rank 0)
and the FID (split across ranks), which a stop request cuts short; the stop signal the ranks agree
on (pre-emption: checkpoint and exit); then the next batch and noise are drawn and their OT plan
solved on a worker thread while the device runs the step (`Trainer.prefetch`, ot_pipeline.py).
Under torchrun, a rank that stops answering ends every other rank within --collective_timeout
(and a short roll call), with one sentence naming it (distributed.PeerLost); where one rank works
alone on purpose, the others wait in a long-wait group (see distributed.py).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from absl import flags, logging
from torch import Tensor
from tqdm import tqdm

import checks
import utils_cifar
from distributed import (DEFAULT_COLLECTIVE_TIMEOUT_S, LOCK_LOST, PeerLost, StopRequest, World, broadcast_from_main,
                         gather_everywhere, gather_to_main, init_world, is_collective_failure, main_first,
                         mean_over_ranks, own_rows, peers_watched, wait_for_main)
from fast_path import COMPILE_MODES, PRECISIONS, FastForward, resolve_precision
from flow_matching import MATCHERS, OT_PAIRINGS, FlowSample, make_matcher
from ot_pipeline import OTPipeline
from samplers import (CLUSTER_ALGORITHMS, PUBLISHED_CLUSTER_ALGORITHM, PUBLISHED_CLUSTER_SEED, PUBLISHED_NUM_SUBCLASSES,
                      ClassConditionedSampler, kmeans_cache_dir, save_cluster_grids)
from sampling import SOLVERS, SamplingStopped, save_sample_grid
from run_lock import LockLost, RunLock, RunLocked
from unet import PAPER_CONFIG, UNetModel, normalize_config

# Flags are declarations, not work: every training script shares these (names as users type them).
flags.DEFINE_enum("model", "otcfm", list(MATCHERS), "flow matching variant")
flags.DEFINE_float("sigma", 0.0, "std of the extra Gaussian noise on the probability path", lower_bound=0.0)
flags.DEFINE_enum("ot_pairing", "replacement", list(OT_PAIRINGS),
                  "otcfm: draw B pairs from the OT plan with replacement (published) or use the optimal permutation")
flags.DEFINE_string("output_dir", "./results/", "where run folders are written")
flags.DEFINE_string("data_dir", "./data", "CIFAR-10 location (downloaded there on first use)")
# UNet construction arguments (paper config by default); stored in every checkpoint.
flags.DEFINE_integer("num_channel", PAPER_CONFIG["num_channels"], "UNet base channels", lower_bound=1)
flags.DEFINE_integer("num_res_blocks", PAPER_CONFIG["num_res_blocks"], "residual blocks per resolution", lower_bound=1)
flags.DEFINE_list("channel_mult", [str(m) for m in PAPER_CONFIG["channel_mult"]], "channel multiplier per resolution")
flags.DEFINE_string("attention_resolutions", PAPER_CONFIG["attention_resolutions"], "resolutions with self-attention, e.g. 16 or 16,8")
flags.DEFINE_integer("num_head_channels", PAPER_CONFIG["num_head_channels"], "channels per attention head")
flags.DEFINE_float("dropout", PAPER_CONFIG["dropout"], "dropout in residual blocks")
# A malformed list is a parse error (one line, from absl), not a traceback once the data are loaded.
for _flag in ("channel_mult", "attention_resolutions"):
    flags.register_validator(_flag, checks.positive_ints, message="must be comma-separated positive integers")
# Optimisation (the published recipe).
flags.DEFINE_float("lr", 2e-4, "Adam learning rate")
flags.DEFINE_float("grad_clip", 1.0, "gradient norm clip")
flags.DEFINE_integer("total_steps", 400001, "training steps (loop indices 0..total_steps-1)", lower_bound=1)
flags.DEFINE_integer("warmup", 5000, "linear learning-rate warm-up steps", lower_bound=0)
flags.DEFINE_integer("batch_size", 128, "global batch size (split across ranks)")
flags.DEFINE_float("ema_decay", 0.9999, "EMA decay, applied every step", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_integer("seed", 0, "seed of every random stream (shared by all ranks; dropout on rank r uses seed + r)")
# The fast path of the training forward (fast_path.py); sampling and FID stay fp32 and eager.
flags.DEFINE_enum("precision", "auto", list(PRECISIONS),
                  "training forward/backward: bf16 autocast with fp32 weights, Adam and EMA, or fp32; auto = bf16 "
                  "on a CUDA GPU with native bf16, else fp32")
flags.DEFINE_bool("channels_last", False, "channels-last memory format for the UNet and its training inputs")
flags.DEFINE_bool("compile", False, "torch.compile the training forward (the monitor, grids and FID stay eager)")
flags.DEFINE_enum("compile_mode", "default", list(COMPILE_MODES), "torch.compile mode, with --compile")
flags.DEFINE_bool("ot_pipeline", True, "otcfm: draw the next batch after each step and solve its OT plan on a worker "
                  "thread while the device runs the step (False: inline; both train the same run bit for bit)")
flags.DEFINE_enum("ot_scope", "global", ["global", "local"],
                  "otcfm under torchrun: pair the whole global batch (global, world-size invariant) or each "
                  "rank's block within itself (local, as the published DDP script)")
# Outputs.
flags.DEFINE_integer("save_step", 20000, "checkpoint + sample grids every this many steps (0 = never)",
                     lower_bound=0)
flags.DEFINE_integer("log_step", 100, "metrics to the progress bar, wandb and {run}_metrics.jsonl every this many steps",
                     lower_bound=1)
flags.DEFINE_integer("grid_size", 64, "images in each sample grid", lower_bound=1)
flags.DEFINE_integer("grid_steps", 99, "Euler steps for the sample grids (99: the published t_span = linspace(0, 1, 100))",
                     lower_bound=1)
flags.DEFINE_string("checkpoint_path", "", "resume from this checkpoint")
flags.DEFINE_enum("resume", "off", ["off", "auto"],
                  "auto: continue from the newest checkpoint of this run that loads, or start fresh if it has none "
                  "(one command for the first launch and every requeue)")
flags.DEFINE_bool("overwrite", False, "let a new run replace existing checkpoints in its run folder")
flags.DEFINE_enum("wandb_mode", "offline", ["online", "offline", "disabled"],
                  "wandb mode (WANDB_MODE in the environment wins); offline runs sync later with `wandb sync`")
flags.DEFINE_string("device", "", "training device (default: cuda if available, else cpu)")
flags.DEFINE_float("collective_timeout", DEFAULT_COLLECTIVE_TIMEOUT_S,
                   "under torchrun: seconds a collective waits for a rank that stopped answering before every "
                   "other rank exits, naming it", lower_bound=1.0)
# FID at save steps (EMA weights, split across ranks), as in the published runs.
flags.DEFINE_integer("fid_num_gen", -1, "samples for the FID at each save step: -1 = 10000 on CUDA and 0 on CPU "
                     "(hours there); 0 disables", lower_bound=-1)
flags.DEFINE_enum("integration_method", "dopri5", list(SOLVERS), "ODE solver of the training-time FID")
flags.DEFINE_integer("integration_steps", 100, "steps of the fixed-step solvers", lower_bound=1)
flags.DEFINE_float("tol", 1e-5, "atol = rtol of dopri5")
flags.DEFINE_integer("batch_size_fid", 1024, "samples per ODE solve and Inception batch", lower_bound=1)
flags.DEFINE_string("fid_inception_path", None, "local inception-2015-12-05.pt (else $FID_INCEPTION_PATH, caches, download)")
flags.DEFINE_string("fid_stats_path", None, "local reference statistics .npz (else $FID_STATS_PATH, caches, download)")
# Same-cluster batches (locality/anchor training, and the local-loss monitor of train_cifar10.py).
flags.DEFINE_integer("num_subclasses", PUBLISHED_NUM_SUBCLASSES,
                     "K-means sub-clusters per CIFAR-10 class (1 = the class itself)", lower_bound=1)
flags.DEFINE_enum("cluster_weighting", "uniform", ["uniform", "size"],
                  "how a batch's cluster is drawn: uniformly (published) or proportional to its size")
flags.DEFINE_enum("cluster_algorithm", PUBLISHED_CLUSTER_ALGORITHM, list(CLUSTER_ALGORITHMS),
                  "per-class clustering: MiniBatchKMeans as published, or exact (Lloyd) K-means")
flags.DEFINE_integer("cluster_seed", PUBLISHED_CLUSTER_SEED, "K-means random_state (42, as published)")
flags.DEFINE_bool("visualize", True, "save one image grid per cluster and a README.txt at start-up")
flags.DEFINE_string("group_dir", "./group", "where --visualize writes the cluster grids")

ARCH_FLAGS = {  # flag name -> UNet construction argument
    "num_channel": "num_channels",
    "num_res_blocks": "num_res_blocks",
    "channel_mult": "channel_mult",
    "attention_resolutions": "attention_resolutions",
    "num_head_channels": "num_head_channels",
    "dropout": "dropout",
}


class BatchSource(Protocol):
    """Yields training batches on the device; its state makes a resumed stream exact."""

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
                     sample: FlowSample | None) -> tuple[Tensor, Tensor, object]:
        """(t_extra [E], x_extra [E,3,32,32], ctx): where to evaluate the net, and what loss() needs.

        x1, x0: the batch and noise as drawn (before any OT re-pairing); sample: the main term's
        draw (None when monitoring)."""

    def loss(self, vt: Tensor | None, v_extra: Tensor, ctx) -> Tensor:
        """Scalar loss from the main prediction vt [B,...] and the extra outputs v_extra [E,...]."""

    def before_step(self, step: int) -> None:
        """Hook at the start of each step (e.g. refresh centroids)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class DataContext:
    """What a batch-source factory gets: the device-resident data set and this rank's share."""

    images: Tensor  # uint8 [N,3,32,32] on the training device
    labels: Tensor  # int64 [N] (CPU)
    batch_size: int  # the global batch: every rank draws it whole and trains on its own block
    seed: int
    world: World
    data_dir: str
    stored: dict | None = None  # this source's state in the checkpoint being resumed (e.g. its clusters)


@dataclass
class RunSpec:
    """What a script trains and where it writes.

    run_dir:          folder under --output_dir, e.g. "otcfm" or "otcfm_local_1e0"
    file_prefix:      checkpoint prefix and wandb run name, e.g. "otcfm_cifar10_local_1e0"
    make_batches:     DataContext -> BatchSource for training (default: shuffled batches)
    make_regularizer: training BatchSource -> Regularizer added to the loss (default: none)
    make_monitor:     DataContext -> (BatchSource, Regularizer) evaluated under no_grad on log steps
                      only, logged as f"{name}_loss" (default: none)
    """

    run_dir: str
    file_prefix: str
    make_batches: Callable[[DataContext], BatchSource] | None = None
    make_regularizer: Callable[[BatchSource], Regularizer] | None = None
    make_monitor: Callable[[DataContext], tuple[BatchSource, Regularizer]] | None = None


# --------------------------------------------------------------------------------------------
# Set-up helpers
# --------------------------------------------------------------------------------------------


def flag_dict(FLAGS) -> dict:
    """All flags defined by this project (not absl's own), name -> value."""
    out = {}
    for module, module_flags in FLAGS.flags_by_module_dict().items():
        if module.startswith("absl"):
            continue
        for flag in module_flags:
            out[flag.name] = flag.value
    return out


def unet_config_from_flags(FLAGS) -> dict:
    config = dict(PAPER_CONFIG)
    for flag, arg in ARCH_FLAGS.items():
        value = getattr(FLAGS, flag)
        config[arg] = [int(m) for m in value] if flag == "channel_mult" else value
    return normalize_config(config)


def resolve_unet_config(FLAGS, ckpt: dict | None) -> dict:
    """The checkpoint's UNet arguments when resuming (published resume commands give no
    --num_channel), else the flags'. An architecture flag given explicitly that contradicts the
    checkpoint is an error rather than a silent rebuild."""
    from_flags = unet_config_from_flags(FLAGS)
    if ckpt is None or "unet_config" not in ckpt:
        return from_flags
    stored = normalize_config(ckpt["unet_config"])
    for flag, arg in ARCH_FLAGS.items():
        if FLAGS[flag].present and from_flags[arg] != stored[arg]:
            raise utils_cifar.UserError(
                f"--{flag}={getattr(FLAGS, flag)} contradicts the checkpoint's {arg}={stored[arg]}: "
                f"drop the flag to resume with the stored architecture."
            )
    return stored


def warmup_schedule(warmup: int):
    """lr multiplier at scheduler step s: min(s, warmup) / warmup (0 at the first step, as published)."""
    return lambda s: min(s, warmup) / warmup if warmup > 0 else 1.0


def cluster_sampler(FLAGS, data: DataContext):
    """A K-means ClassConditionedSampler over `data` (one cluster per batch).

    The clustering is cached under --data_dir (elsewhere if it is read-only: see
    `samplers.kmeans_cache_dir`); a resumed run takes the assignment stored in its checkpoint, so it
    trains on the same clusters.
    """
    stored = (data.stored or {}).get("assignment")  # absent when the checkpoint's stream was shuffled
    num_subclasses = FLAGS.num_subclasses
    if stored is not None:
        if FLAGS["num_subclasses"].present and data.stored["num_subclasses"] != FLAGS.num_subclasses:
            raise utils_cifar.UserError(
                f"--num_subclasses={FLAGS.num_subclasses} contradicts the checkpoint's clusters "
                f"(num_subclasses={data.stored['num_subclasses']}): drop the flag to resume on the same clusters."
            )
        num_subclasses = data.stored["num_subclasses"]
    # Rank 0 clusters, caches and draws the cluster grids; the other ranks then read its cache.
    with main_first(data.world, "the K-means clustering"):
        sampler = ClassConditionedSampler(
            data.images, data.labels, data.batch_size, num_subclasses=num_subclasses, seed=data.seed,
            cluster_weighting=FLAGS.cluster_weighting, cache_dir=kmeans_cache_dir(data.data_dir),
            assignment=stored, cluster_seed=FLAGS.cluster_seed, algorithm=FLAGS.cluster_algorithm,
        )
        if FLAGS.visualize and data.world.is_main:
            save_cluster_grids(data.images, data.labels, sampler.assignment, num_subclasses, FLAGS.group_dir)
    return sampler


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


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
    cluster: ``[B]`` the global batch's cluster ids (clustered sources), else None
    """

    t: Tensor
    x: Tensor
    ut: Tensor
    ctx: object = None
    cluster: Tensor | None = None


class Trainer:
    """Owns net, EMA, optimizer, schedule, matcher, batch sources and random streams; `step()` does
    one update: `draw` the inputs, evaluate the `losses`, `update` the weights.

    World-size invariance (see `distributed.py`): the batch sources yield the global batch, and
    every random draw of a step (noise, t, eps, OT pairing, the regularizer's draws) comes from
    `generator`, seeded with --seed on every rank. Every rank thus computes the same global sample
    and trains on its own block of rows. Only dropout uses torch's global RNG (seed + rank).
    """

    def __init__(self, net, ema, optimizer, scheduler, matcher, batches, FLAGS, world: World,
                 regularizer=None, monitor=None, ddp_net=None):
        self.net = net  # the bare module (EMA source, checkpoints)
        self.precision = resolve_precision(FLAGS.precision, world.device)
        # What the step calls: the DDP wrapper when distributed, compiled with --compile. The
        # monitor's batch has another shape (a recompilation), so it calls the bare net, eager.
        self.forward = FastForward(ddp_net or net, world.device, self.precision, FLAGS.channels_last,
                                   FLAGS.compile_mode if FLAGS.compile else None)
        self.monitor_forward = FastForward(net, world.device, self.precision, FLAGS.channels_last)
        self.ema, self.optimizer, self.scheduler = ema, optimizer, scheduler
        self.matcher, self.batches, self.regularizer = matcher, batches, regularizer
        self.monitor = monitor  # (BatchSource, Regularizer) or None
        self.world = world
        self.grad_clip, self.ema_decay = FLAGS.grad_clip, FLAGS.ema_decay
        self.global_batch = FLAGS.batch_size
        self.generator = torch.Generator(world.device).manual_seed(FLAGS.seed)
        self.monitor_generator = torch.Generator(world.device).manual_seed(FLAGS.seed + MONITOR_SEED_OFFSET)
        # Listed once: walking 300 parameters per step costs host time the GPU would wait for.
        self.params, self.ema_params = list(net.parameters()), list(ema.parameters())
        # Divergence watch, on the device (no host sync per step): whether every loss and gradient
        # norm so far was finite, and the step and values where that first failed.
        self.finite = torch.ones((), dtype=torch.bool, device=world.device)
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=world.device)
        self.first_bad_values: Tensor | None = None
        self.watched: list[str] = []  # names of the watched values
        # Each step's batch, noise and OT plans; with --ot_pipeline drawn and solved ahead (`prefetch`).
        self.pipeline = OTPipeline(batches, matcher, self.generator, world.device, FLAGS.ot_pipeline)
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
        if inputs.cluster is not None:
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
            return StepInputs(t, x, ut, cluster=cluster)
        # The regularizer sees the batch as drawn, as the published scripts do.
        t_extra, x_extra, ctx = reg.extra_inputs(x1, x0, cluster, sample, generator=g)
        return StepInputs(torch.cat([t, self.own(t_extra)]), torch.cat([x, self.own(x_extra)]), ut, self.own(ctx),
                          cluster)

    def losses(self, inputs: StepInputs) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """(terms, loss, vt): the named loss terms, their weighted sum and the main prediction
        ``vt`` [b,3,32,32], from one forward call over the main and extra rows (outputs in the inputs' dtype)."""
        reg = self.regularizer
        v = self.forward(inputs.t, inputs.x)
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
        utils_cifar.ema_update(self.ema_params, self.params, self.ema_decay)
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
        t_extra, x_extra, ctx = reg.extra_inputs(x1, x0, cluster, None, generator=g)
        v_extra = self.monitor_forward(self.own(t_extra), self.own(x_extra))
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


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------


class RunLogger:
    """Rank 0's metrics sink: progress bar, wandb and `{file_prefix}_metrics.jsonl`."""

    def __init__(self, paths: utils_cifar.RunPaths, spec: RunSpec, config: dict, mode: str, start: int,
                 provenance: dict):
        import wandb  # imported here: a slow import that only rank 0 needs

        self.paths = paths
        # The metrics file holds one history: a fresh run starts it anew, a resumed run drops the
        # lines a crashed run wrote after its checkpoint (they will be logged again), and a torn
        # last line (a kill or a full disk mid-append) with a warning.
        utils_cifar.truncate_jsonl(paths.metrics, keep=lambda record: record.get("step", -1) < start)
        self.wandb = wandb.init(
            project="conditional-flow-matching",
            name=spec.file_prefix,
            config={**config, "provenance": provenance},
            mode=os.environ.get("WANDB_MODE", mode),
            dir=str(paths.run_dir),
        )
        # One line per (re)start: where the metrics that follow came from.
        utils_cifar.append_jsonl(paths.metrics, {"step": start, "event": "start", "provenance": provenance})

    def log(self, record: dict) -> None:
        self.wandb.log(record, step=record["step"])
        utils_cifar.append_jsonl(self.paths.metrics, record)

    def close(self) -> None:
        self.wandb.finish()


def fid_num_gen(FLAGS, world: World) -> int:
    """Samples per training-time FID: --fid_num_gen, or by default 10000 on CUDA (published) and 0 on CPU."""
    return FLAGS.fid_num_gen if FLAGS.fid_num_gen >= 0 else (10000 if world.device.type == "cuda" else 0)


def prepare_fid(FLAGS, world: World):
    """Every rank's FID scorer for save steps (each samples and featurises its share of the
    samples), or None on every rank (FID off, or its files unreachable from some rank: logged).

    Rank 0 finds or downloads the files (or computes the reference statistics) while the others
    wait for it; they then find its files. Checked before training starts, so a missing Inception
    file or statistics never crashes a run.
    """
    if fid_num_gen(FLAGS, world) == 0:
        return None
    import fid

    def prepare():
        try:
            return fid.FIDScorer.prepare(FLAGS.fid_inception_path, FLAGS.fid_stats_path, FLAGS.data_dir,
                                         device=world.device, batch_size=FLAGS.batch_size_fid), None
        except utils_cifar.UserError as err:  # FIDUnavailable, or no CIFAR-10 to compute statistics from
            return None, str(err)

    scorer, problem = prepare() if world.is_main else (None, None)
    wait_for_main(world, "preparing the FID files")
    problem = broadcast_from_main(problem, world)
    if problem is None and not world.is_main:
        scorer, problem = prepare()
    problems = [p for p in gather_everywhere(problem, world) if p is not None]  # every rank scores, or none
    if problems:
        if world.is_main:
            logging.warning("training without FID: %s", problems[0])
        return None
    return scorer


def log_fid(scorer, ema, FLAGS, num_gen: int, step: int, logger: RunLogger | None, world: World,
            stop: Callable[[], bool]) -> list[str]:
    """FID of the EMA net's samples, every rank sampling and featurising its share, logged by rank 0
    as `fid` (with its mean NFE). Returns what a stop request skipped (["the FID"] or []). A failure
    on any rank (say, out of memory) is logged and training goes on: a metric must never cost the run."""
    try:
        result = scorer.evaluate_net(ema, num_gen, FLAGS.batch_size_fid, FLAGS.integration_method,
                                     FLAGS.integration_steps, FLAGS.tol, FLAGS.seed, world=world, stop=stop)
    except SamplingStopped:
        return ["the FID"]
    except Exception as err:  # noqa: BLE001 -- see docstring; sampling.ShareFailed on every rank
        if isinstance(err, PeerLost) or is_collective_failure(err):  # a rank stopped answering: not a metric's failure
            raise
        if world.is_main:
            logging.warning("FID at step %d failed: %s: %s", step, type(err).__name__, err)
        return []
    if logger is not None:
        logger.log({"step": step, "fid": result.fid, "fid_nfe": result.mean_nfe, "fid_num_gen": result.num_gen,
                    "fid_seconds": round(result.seconds, 1)})
    return []


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


class Diverged(utils_cifar.UserError):
    """A loss term or the gradient norm became NaN or infinite; nothing non-finite was written."""


def run(FLAGS, spec: RunSpec) -> None:
    """Entry point for the scripts: `train`, with user errors as one sentence and exit status 1, and
    exit status 130 after a checkpoint written on SIGINT (0 after SIGTERM / SIGUSR1)."""
    try:
        outcome = train(FLAGS, spec)
    except utils_cifar.UserError as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:  # Ctrl-C outside the loop (data, K-means, FID set-up), before its handler is in place
        print("interrupted by Ctrl-C outside a training step: the checkpoints already written are intact; run the "
              "same command (with --resume=auto) to continue.", file=sys.stderr, flush=True)
        sys.exit(130)
    if outcome.stopped_by == signal.SIGINT:
        sys.exit(130)


@dataclass
class Outcome:
    """How `train` ended: its run paths, and the signal that stopped it early (0 if none)."""

    paths: utils_cifar.RunPaths
    stopped_by: int = 0


def load_resume_checkpoint(FLAGS, paths: utils_cifar.RunPaths) -> tuple[str, dict | None]:
    """The checkpoint to resume from and its contents: --checkpoint_path, or with --resume=auto the
    highest-step checkpoint of this run that loads (("", None) when the run has none: a fresh start).
    Checkpoints that do not load are named in a warning, never deleted. Each file is read once."""
    if FLAGS.checkpoint_path or FLAGS.resume != "auto":
        path = FLAGS.checkpoint_path
        return path, (utils_cifar.load_checkpoint(path) if path else None)
    candidates = paths.checkpoints_by_step()
    for path in reversed(candidates):
        try:
            ckpt = utils_cifar.load_checkpoint(path)
        except utils_cifar.CheckpointError as err:
            logging.warning("--resume=auto skips %s: %s", path.name, err)
            continue
        logging.info("--resume=auto: resuming from %s", path)
        return str(path), ckpt
    if candidates:
        raise utils_cifar.CheckpointError(
            f"--resume=auto found {len(candidates)} checkpoints of {paths.file_prefix} in {paths.run_dir} but none "
            f"loads: pass a good one with --checkpoint_path, or move them away to start afresh."
        )
    return "", None


def train(FLAGS, spec: RunSpec) -> Outcome:
    world = init_world(FLAGS.device, FLAGS.collective_timeout)
    checks.check_batch_and_clip(FLAGS, world.size)
    # --ot_scope=local pairs each rank's block within itself, as the published DDP script does.
    matcher = make_matcher(FLAGS.model, FLAGS.sigma, FLAGS.ot_pairing,
                           ot_blocks=world.size if FLAGS.ot_scope == "local" else 1)
    paths = utils_cifar.RunPaths(Path(FLAGS.output_dir) / spec.run_dir, spec.file_prefix)
    checks.check_output_dir(FLAGS, paths)
    lock = RunLock(paths.run_dir, spec.file_prefix)
    refusal = None
    if world.is_main:  # rank 0 decides; every rank stops if it refuses
        try:  # with --resume=auto, a requeue waits out the lock of a run on another host
            lock.acquire(wait=FLAGS.resume == "auto")
        except utils_cifar.UserError as err:  # RunLocked, or a full disk (SaveError)
            refusal = str(err)
        else:  # a run killed mid-save left temp files; with the lock held, none of them is live
            paths.remove_stale_temp_files()
    wait_for_main(world, "the run lock (with --resume=auto, waiting out another host's live lock)")
    refusal = broadcast_from_main(refusal, world)
    if refusal is not None:
        raise RunLocked(refusal)
    try:
        return train_locked(FLAGS, spec, world, matcher, paths, lock)
    finally:
        lock.release()


def train_locked(FLAGS, spec: RunSpec, world: World, matcher, paths: utils_cifar.RunPaths, lock: RunLock) -> Outcome:
    """`train` once this run's lock is held (rank 0)."""
    checkpoint_path, ckpt = load_resume_checkpoint(FLAGS, paths)
    unet_config = resolve_unet_config(FLAGS, ckpt)
    checks.check_training_inputs(FLAGS, ckpt, checkpoint_path, unet_config, ARCH_FLAGS)  # before data and clustering
    existing = paths.checkpoints_by_step()
    if ckpt is None and existing and not FLAGS.overwrite:
        raise utils_cifar.UserError(
            f"{paths.run_dir} already holds checkpoints ({existing[-1].name}): "
            f"resume with --checkpoint_path or --resume=auto, pick another --output_dir, or pass --overwrite."
        )

    torch.manual_seed(FLAGS.seed + world.rank)  # dropout: each rank its own masks
    with main_first(world, "the CIFAR-10 download"):  # one download/extraction; the other ranks read what rank 0 put there
        images, labels = utils_cifar.load_cifar10(FLAGS.data_dir)
    # The streams are shared by all ranks, so a checkpoint of N processes resumes on M.
    stored = ckpt.get("streams", {}) if ckpt is not None else {}
    data = DataContext(images=images.to(world.device), labels=labels, batch_size=FLAGS.batch_size,
                       seed=FLAGS.seed, world=world, data_dir=FLAGS.data_dir)
    if spec.make_batches is None:
        batches = utils_cifar.ShuffledBatches(data.images, data.batch_size, data.seed)
    else:
        batches = spec.make_batches(dataclasses.replace(data, stored=stored.get(TRAIN_STREAM)))
    regularizer = spec.make_regularizer(batches) if spec.make_regularizer is not None else None
    monitor = None
    if spec.make_monitor is not None:
        monitor = spec.make_monitor(dataclasses.replace(data, stored=stored.get(MONITOR_STREAM)))
    trainer = build_trainer(FLAGS, unet_config, world, matcher, batches, regularizer, monitor)
    start = resume(trainer, ckpt, checkpoint_path, FLAGS, world) if ckpt is not None else 0

    config = flag_dict(FLAGS)
    logger = None
    provenance = utils_cifar.provenance(world.device)  # the code and machine cannot change mid-run
    if world.is_main:
        paths.run_dir.mkdir(parents=True, exist_ok=True)
        logger = RunLogger(paths, spec, config, FLAGS.wandb_mode, start, provenance)
    wait_for_main(world, "starting its logger (wandb)")
    scorer = prepare_fid(FLAGS, world)
    writer = CheckpointWriter(trainer, paths, unet_config, config, provenance, world, lock, last=checkpoint_path)
    progress = tqdm(range(start, FLAGS.total_steps), initial=start, total=FLAGS.total_steps,
                    disable=not world.is_main, dynamic_ncols=True)
    last = FLAGS.total_steps - 1
    tic = time.perf_counter()
    # A rank that stops answering: every other rank exits, naming it, without writing (PeerLost).
    with StopRequest(world) as stop_request, peers_watched(world, writer.resume_hint):
        for step in progress:
            is_log = step % FLAGS.log_step == 0 or step == last
            metrics = trainer.step(step, with_metrics=is_log)
            if is_log:
                record = {"step": step, **host_metrics(metrics, world), "seconds": round(time.perf_counter() - tic, 3)}
                if record.pop("all_finite") < 1:  # any rank's loss or gradient norm was NaN / inf
                    raise writer.diverged()
                if trainer.regularized_name is not None:  # the published name for the regularizer's value
                    record["regularized_loss"] = record[trainer.regularized_name]
                if logger is not None and lock.verify():  # a run whose lock was taken writes nothing more
                    logger.log(record)
                    progress.set_postfix(progress_fields(record))
            is_save = FLAGS.save_step > 0 and ((step % FLAGS.save_step == 0 and step > 0) or step == last)
            if is_save:
                writer.save(step)  # first: a stop request during the grids or the FID finds it written
                skipped = writer.draw_grids(step, stop_request.requested) if world.is_main else []
                wait_for_main(world, f"the checkpoint and sample grids of step {step}")
                if scorer is not None:
                    skipped += log_fid(scorer, trainer.ema, FLAGS, fid_num_gen(FLAGS, world), step, logger, world,
                                       stop_request.requested)
                if skipped and world.is_main:
                    print(f"stop requested during the save of step {step}: skipped {' and '.join(skipped)} "
                          f"(its checkpoint is written).", flush=True)
            if lock.lost:  # found by the heartbeat thread or a write's check (rank 0): every rank stops
                stop_request.request(LOCK_LOST)
            stopped_by = stop_request.agreed()
            if stopped_by == LOCK_LOST:
                raise LockLost(lock.lost_message() if world.is_main else
                               "rank 0 lost the run's lock to another run: this run stops and writes nothing more.")
            if stopped_by:
                if not is_save:  # only the checkpoint: the scheduler's kill is near
                    writer.save(step)
                if world.is_main:
                    progress.close()
                    print(f"stopped by {signal.Signals(stopped_by).name} after step {step}: checkpoint "
                          f"{writer.last}; continue with the same command plus --checkpoint_path={writer.last} "
                          f"(or --resume=auto).", flush=True)
                break
            if step < last:
                trainer.prefetch()  # after the checkpoint, which thus holds the streams from before it
        else:
            stopped_by = 0
    if logger is not None:
        logger.close()
    return Outcome(paths, stopped_by)


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


def build_trainer(FLAGS, unet_config: dict, world: World, matcher, batches, regularizer=None, monitor=None) -> Trainer:
    """Net, EMA (a frozen copy, never wrapped in DDP), Adam, warm-up schedule and DDP wrapper."""
    memory_format = torch.channels_last if FLAGS.channels_last else torch.contiguous_format
    net = UNetModel(**unet_config).to(world.device, memory_format=memory_format)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    # fused: one kernel for all parameters on CUDA (same maths; not implemented for every CPU build).
    optimizer = torch.optim.Adam(net.parameters(), lr=FLAGS.lr, fused=world.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(FLAGS.warmup))
    ddp_net = None
    if world.size > 1:
        ddp_net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[world.device.index] if world.device.type == "cuda" else None
        )
        # DDP gave every rank rank 0's initial weights (each rank drew its own: seed + rank); so
        # does the EMA, which every rank samples for its share of the FID.
        ema.load_state_dict(net.state_dict())
    return Trainer(net, ema, optimizer, scheduler, matcher, batches, FLAGS, world, regularizer, monitor, ddp_net)


def progress_fields(record: dict) -> dict:
    """What the progress bar shows: losses, lr and (for clustered batches) the batch's cluster."""
    losses = [k for k in record if k in ("loss", "loss_fm") or k.endswith("_loss") and k != "regularized_loss"]
    fields = {k: f"{record[k]:.4f}" for k in losses}
    fields["lr"] = f"{record['lr']:.2e}"
    if "cluster" in record:
        fields["cluster"] = record["cluster"]
    return fields


def resume(trainer: Trainer, ckpt: dict, source: str, FLAGS, world: World) -> int:
    """Load weights, EMA, optimizer, schedule and stream states; return the first step to run.

    Published TorchCFM checkpoints carry only weights, optimizer, schedule and step: their random
    streams restart from --seed.
    """
    utils_cifar.load_weights(trainer.net, ckpt["net_model"], f"{source} (net_model)")
    utils_cifar.load_weights(trainer.ema, ckpt["ema_model"], f"{source} (ema_model)")
    trainer.optimizer.load_state_dict(ckpt["optim"])
    scheduler = trainer.scheduler
    scheduler.load_state_dict(ckpt["sched"])
    # Training flags (--lr, --warmup) come from this command line, not the checkpoint.
    scheduler.base_lrs = [FLAGS.lr for _ in trainer.optimizer.param_groups]
    for group in trainer.optimizer.param_groups:
        group["initial_lr"] = FLAGS.lr
        group["lr"] = FLAGS.lr * warmup_schedule(FLAGS.warmup)(scheduler.last_epoch)
    if "streams" in ckpt:
        trainer.load_streams_state(ckpt["streams"])
    else:
        logging.warning("%s holds no shared random streams (a published or older checkpoint): they restart "
                        "from --seed.", source)
    rank_states = ckpt.get("rank_states") or []
    if world.rank < len(rank_states) and "rng" in rank_states[world.rank]:
        utils_cifar.set_rng_state(rank_states[world.rank]["rng"], world.device)  # this rank's dropout RNG
    elif FLAGS.dropout > 0:
        logging.warning("the checkpoint holds no dropout RNG for rank %d: its dropout masks restart from "
                        "--seed + rank.", world.rank)
    if trainer.regularizer is not None and ckpt.get("regularizer"):
        trainer.regularizer.load_state_dict(ckpt["regularizer"])
    return int(ckpt["step"]) + 1


class CheckpointWriter:
    """Writes the run's checkpoints (rank 0; every rank calls `save` on the same steps) and
    remembers the last one written. State with a non-finite loss or gradient behind it is never
    written: `save` raises `Diverged` instead."""

    def __init__(self, trainer: Trainer, paths: utils_cifar.RunPaths, unet_config: dict, config: dict,
                 provenance: dict, world: World, lock: RunLock, last: str = ""):
        self.trainer, self.paths, self.world, self.lock = trainer, paths, world, lock
        self.unet_config, self.config, self.provenance = unet_config, config, provenance
        self.last = last  # the newest good checkpoint of this run ("" before the first)

    def save(self, step: int) -> None:
        """An atomic checkpoint holding the state after update `step` (written by rank 0; every rank
        calls it). Its grids come after it (`draw_grids`), so a stop request finds it written."""
        trainer, world = self.trainer, self.world
        if mean_over_ranks(trainer.finite.float(), world).item() < 1:  # a host sync: save steps only
            raise self.diverged()
        # Each rank's own RNG drives only its dropout masks; the shared streams are the same everywhere.
        rank_states = gather_to_main({"rng": utils_cifar.rng_state(world.device)}, world)
        path = self.paths.checkpoint(step)
        if world.is_main and not self.lock.verify():  # taken over: the loop stops after this step
            return
        if world.is_main:
            ckpt = {
                "net_model": trainer.net.state_dict(),
                "ema_model": trainer.ema.state_dict(),
                "sched": trainer.scheduler.state_dict(),
                "optim": trainer.optimizer.state_dict(),
                "step": step,
                "unet_config": self.unet_config,
                "flags": self.config,
                "streams": trainer.streams_state(),
                "rank_states": rank_states,
                "regularizer": trainer.regularizer.state_dict() if trainer.regularizer is not None else {},
                "provenance": self.provenance,
            }
            utils_cifar.atomic_save(ckpt, path)
        self.last = str(path)

    def draw_grids(self, step: int, stop: Callable[[], bool]) -> list[str]:
        """The sample grids of the net and its EMA at `step` (rank 0); returns what a stop request
        (`stop()` true) skipped, e.g. ["the normal and ema sample grids"]."""
        kinds = {"normal": self.trainer.net, "ema": self.trainer.ema}
        if not self.lock.verify():  # taken over: nothing more is written
            return []
        for drawn, (kind, model) in enumerate(kinds.items()):
            try:
                save_sample_grid(model, self.paths.grid(kind, step), num=self.config["grid_size"],
                                 steps=self.config["grid_steps"], seed=self.config["seed"], stop=stop)
            except SamplingStopped:
                return [f"the {' and '.join(list(kinds)[drawn:])} sample grid{'s' if drawn == 0 else ''}"]
        return []

    def resume_hint(self) -> str:
        """Where a run that stops now continues from (ends a PeerLost sentence)."""
        if not self.last:
            return "this process exits without writing, and no checkpoint was written yet"
        return (f"this process exits without writing, and the last good checkpoint is {self.last}: resume from it "
                f"(--resume=auto) once every process runs")

    def diverged(self) -> Diverged:
        """The error that stops a diverged run: the first bad step, its values, the last good checkpoint."""
        step, values = self.trainer.first_non_finite()
        where = f"at step {step} ({values})" if step >= 0 else "on another rank"
        last = f"the last good checkpoint is {self.last}" if self.last else "no checkpoint was written yet"
        return Diverged(f"training diverged: a loss term or the gradient norm became NaN or infinite {where}; "
                        f"nothing non-finite was written and {last}: resume from it with a lower --lr or --grad_clip.")
