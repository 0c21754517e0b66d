"""The one training loop behind every training script.

A script turns its flags into a `TrainConfig` (cfm/cli/) and calls `recipes.run(config)`, which picks
the regularizer (or none) as a `RunSpec` and calls `run(config, spec)` here; a notebook calls
`recipes.train(config)`. The loop reads settings from the config, never flags. One code
path serves a plain `python train_*.py` (a world of size 1) and `torchrun` (one process per GPU):
every rank computes, only rank 0 writes files or logs.

One step (see `Trainer.step`), the same on every rank up to the forward call:
    x1, cluster, x0, plans = pipeline.next()           # the global batch [B,3,32,32] in [-1,1], its noise and
                                                       # OT plans, drawn from the streams all ranks share
    sample = matcher.sample(x0, x1, generator=g)       # t, x0, x1, xt, ut (otcfm re-pairs by exact OT)
    t_extra, x_extra, ctx, rows = regularizer.extra_inputs(x1, x0, cluster, sample, g)   # the batch as drawn
    y = labels of x1[sample.index] ++ x1[rows], some dropped   # --condition only (conditioning.py)
    v = net(own(t ++ t_extra), own(xt ++ x_extra), own(y))     # this rank's rows; regularizer rows in the same call;
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

import dataclasses
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from absl import logging
from torch import Tensor
from tqdm import tqdm

from cfm.config import ClusterConfig, OptimConfig, RunConfig, TrainConfig, check_config, flag_record
from cfm.config.settings import value_or_default
from cfm.io import checkpoint_io, cifar10, errors, run_files
from cfm.io.distributed import World, broadcast_from_main, init_world, main_first, peers_watched, wait_for_main
from cfm.method import nets
from cfm.method.clustering import kmeans_cache_dir
from cfm.method.flow_matching import make_matcher
from cfm.method.samplers import ClassConditionedSampler, save_cluster_grids
from cfm.training import checks, conditioning
from cfm.training.run_lock import LockLost, RunLock, RunLocked
from cfm.training.run_outputs import CheckpointWriter, RunLogger, log_fid, prepare_fid, progress_fields
from cfm.training.stop_request import LOCK_LOST, StopRequest
from cfm.training.trainer import (
    MONITOR_STREAM,
    TRAIN_STREAM,
    BatchSource,
    Regularizer,
    Trainer,
    build_trainer,
    host_metrics,
    warmup_schedule,
)


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


def cluster_sampler(cluster: ClusterConfig, data: DataContext):
    """A K-means ClassConditionedSampler over `data` (one cluster per batch).

    The clustering is cached under --data_dir (elsewhere if it is read-only: see
    `samplers.kmeans_cache_dir`); a resumed run takes the assignment stored in its checkpoint, so it
    trains on the same clusters (`cluster.num_subclasses` None: not given, the stored one or 25).
    """
    stored = (data.stored or {}).get("assignment")  # absent when the checkpoint's stream was shuffled
    num_subclasses = value_or_default(cluster, "num_subclasses")
    if stored is not None:
        if cluster.num_subclasses is not None and data.stored["num_subclasses"] != cluster.num_subclasses:
            raise errors.UserError(
                f"--num_subclasses={cluster.num_subclasses} contradicts the checkpoint's clusters "
                f"(num_subclasses={data.stored['num_subclasses']}): drop the flag to resume on the same clusters."
            )
        num_subclasses = data.stored["num_subclasses"]
    else:  # before K-means, on every rank alike (a stored assignment has trained already: it stays)
        checks.check_cluster_sizes(num_subclasses, data.labels, data.batch_size)
    # Rank 0 clusters, caches and draws the cluster grids; the other ranks then read its cache.
    with main_first(data.world, "the K-means clustering"):
        sampler = ClassConditionedSampler(
            data.images, data.labels, data.batch_size, num_subclasses=num_subclasses, seed=data.seed,
            cluster_weighting=cluster.cluster_weighting, cache_dir=kmeans_cache_dir(data.data_dir),
            assignment=stored, cluster_seed=cluster.cluster_seed, algorithm=cluster.cluster_algorithm,
        )
        if cluster.visualize and data.world.is_main:
            save_cluster_grids(data.images, data.labels, sampler.assignment, num_subclasses, cluster.group_dir)
    return sampler


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def run(config: TrainConfig, spec: RunSpec) -> None:
    """Entry point for the scripts: `train`, with user errors as one sentence and exit status 1, and
    exit status 130 after a checkpoint written on SIGINT (0 after SIGTERM / SIGUSR1)."""
    try:
        outcome = train(config, spec)
    except errors.UserError as err:
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

    paths: run_files.RunPaths
    stopped_by: int = 0


def load_resume_checkpoint(run_config: RunConfig, paths: run_files.RunPaths) -> tuple[str, dict | None]:
    """The checkpoint to resume from and its contents: --checkpoint_path, or with --resume=auto the
    highest-step checkpoint of this run that loads (("", None) when the run has none: a fresh start).
    Checkpoints that do not load are named in a warning, never deleted. Each file is read once."""
    if run_config.checkpoint_path or run_config.resume != "auto":
        path = run_config.checkpoint_path
        return path, (checkpoint_io.load_checkpoint(path) if path else None)
    candidates = paths.checkpoints_by_step()
    for path in reversed(candidates):
        try:
            ckpt = checkpoint_io.load_checkpoint(path)
        except checkpoint_io.CheckpointError as err:
            logging.warning("--resume=auto skips %s: %s", path.name, err)
            continue
        logging.info("--resume=auto: resuming from %s", path)
        return str(path), ckpt
    if candidates:
        raise checkpoint_io.CheckpointError(
            f"--resume=auto found {len(candidates)} checkpoints of {paths.file_prefix} in {paths.run_dir} but none "
            f"loads: pass a good one with --checkpoint_path, or move them away to start afresh."
        )
    return "", None


def train(config: TrainConfig, spec: RunSpec) -> Outcome:
    """Train the run `config` describes with the loss and batches of `spec`; user errors (a bad
    setting, checkpoint or folder, a run locked by another) raise `errors.UserError`."""
    check_config(config)  # what absl checks at parsing, for a config built in Python
    checks.check_recipe(config)
    world = init_world(config.run.device, config.run.collective_timeout)
    # Before the loop as inside it (the lock's verdict, DDP's broadcast, the FID's gathers): a rank
    # that stops answering ends the others within the timeout, with one sentence naming it.
    with peers_watched(world):
        return train_in_world(config, spec, world)


def train_in_world(config: TrainConfig, spec: RunSpec, world: World) -> Outcome:
    """`train` once this process joined the world: the run's lock, then `train_locked`."""
    checks.check_batch_and_clip(config.optim, world.size)
    flow = config.flow
    # --ot_scope=local pairs each rank's block within itself, as the published DDP script does.
    matcher = make_matcher(flow.model, flow.sigma, flow.ot_pairing,
                           ot_blocks=world.size if config.execution.ot_scope == "local" else 1)
    paths = run_files.RunPaths(Path(config.paths.output_dir) / spec.run_dir, spec.file_prefix)
    checks.check_output_dir(config.paths.output_dir, paths)
    lock = RunLock(paths.run_dir, spec.file_prefix)
    refusal = None
    if world.is_main:  # rank 0 decides; every rank stops if it refuses
        try:  # with --resume=auto, a requeue waits out the lock of a run on another host
            lock.acquire(wait=config.run.resume == "auto")
        except errors.UserError as err:  # RunLocked, or a full disk (SaveError)
            refusal = str(err)
        else:  # a run killed mid-save left temp files; with the lock held, none of them is live
            if lock.verify():
                paths.remove_stale_temp_files()
    wait_for_main(world, "the run lock (with --resume=auto, waiting out another host's live lock)")
    refusal = broadcast_from_main(refusal, world)
    if refusal is not None:
        raise RunLocked(refusal)
    try:
        return train_locked(config, spec, world, matcher, paths, lock)
    finally:
        lock.release()


def train_locked(config: TrainConfig, spec: RunSpec, world: World, matcher, paths: run_files.RunPaths,
                 lock: RunLock) -> Outcome:
    """`train` once this run's lock is held (rank 0)."""
    optim, run_config, data_dir = config.optim, config.run, config.paths.data_dir
    checkpoint_path, ckpt = load_resume_checkpoint(run_config, paths)
    # First: resuming across --condition is one sentence, not the UNet's missing label embedding.
    condition = conditioning.conditioning(config, ckpt)
    unet_config = conditioning.conditioned_unet(nets.unet_arguments(config.unet, ckpt), condition)
    checks.check_training_inputs(optim, ckpt, checkpoint_path, unet_config)  # before data and clustering
    existing = paths.checkpoints_by_step()
    if ckpt is None and existing and not run_config.overwrite:
        raise errors.UserError(
            f"{paths.run_dir} already holds checkpoints ({existing[-1].name}): "
            f"resume with --checkpoint_path or --resume=auto, pick another --output_dir, or pass --overwrite."
        )

    torch.manual_seed(optim.seed + world.rank)  # dropout: each rank its own masks
    with main_first(world, "the CIFAR-10 download"):  # one download/extraction; the other ranks read what rank 0 put there
        images, labels = cifar10.load_cifar10(data_dir)
    # The streams are shared by all ranks, so a checkpoint of N processes resumes on M.
    stored = ckpt.get("streams", {}) if ckpt is not None else {}
    data = DataContext(images=images.to(world.device), labels=labels, batch_size=optim.batch_size,
                       seed=optim.seed, world=world, data_dir=data_dir)
    if spec.make_batches is None:
        batches = cifar10.ShuffledBatches(data.images, data.batch_size, data.seed)
    else:
        batches = spec.make_batches(dataclasses.replace(data, stored=stored.get(TRAIN_STREAM)))
    if condition is not None:  # the training label mix, which evaluation samples labels in
        condition = condition.counted(batches)
    regularizer = spec.make_regularizer(batches) if spec.make_regularizer is not None else None
    monitor = None
    if spec.make_monitor is not None:
        monitor = spec.make_monitor(dataclasses.replace(data, stored=stored.get(MONITOR_STREAM)))
    trainer = build_trainer(optim, config.execution, unet_config, world, matcher, batches, regularizer, monitor,
                            condition)
    start = resume(trainer, ckpt, checkpoint_path, optim, world) if ckpt is not None else 0

    record = flag_record(config)  # ckpt["flags"] and wandb's config: the flags as the scripts record them
    logger = None
    provenance = run_files.provenance(world.device)  # the code and machine cannot change mid-run
    if world.is_main:
        paths.run_dir.mkdir(parents=True, exist_ok=True)
        logger = RunLogger(paths, record, run_config.wandb_mode, start, provenance, lock)
    wait_for_main(world, "starting its logger (wandb)")
    scorer = prepare_fid(config.fid, data_dir, world)
    writer = CheckpointWriter(trainer, paths, unet_config, record, provenance, world, lock, last=checkpoint_path)
    progress = tqdm(range(start, optim.total_steps), initial=start, total=optim.total_steps,
                    disable=not world.is_main, dynamic_ncols=True)
    last = optim.total_steps - 1
    tic = time.perf_counter()
    # A rank that stops answering: every other rank exits, naming it, without writing (PeerLost).
    with StopRequest(world) as stop_request, peers_watched(world, writer.resume_hint):
        for step in progress:
            is_log = step % run_config.log_step == 0 or step == last
            metrics = trainer.step(step, with_metrics=is_log)
            if is_log:
                record = {"step": step, **host_metrics(metrics, world), "seconds": round(time.perf_counter() - tic, 3)}
                if record.pop("all_finite") < 1:  # any rank's loss or gradient norm was NaN / inf
                    raise writer.diverged()
                if trainer.regularized_name is not None:  # the published name for the regularizer's value
                    record["regularized_loss"] = record[trainer.regularized_name]
                if logger is not None and logger.log(record):  # a run whose lock was taken writes nothing more
                    progress.set_postfix(progress_fields(record))
            is_save = run_config.save_step > 0 and ((step % run_config.save_step == 0 and step > 0) or step == last)
            if is_save:
                writer.save(step)  # first: a stop request during the grids or the FID finds it written
                skipped = writer.draw_grids(step, stop_request.requested) if world.is_main else []
                wait_for_main(world, f"the checkpoint and sample grids of step {step}")
                if scorer is not None:
                    skipped += log_fid(scorer, trainer.ema, config.fid, optim.seed, step, logger, world,
                                       stop_request.requested)
                if skipped and world.is_main:
                    print(f"stop requested during the save of step {step}: skipped {' and '.join(skipped)} "
                          f"(its checkpoint is written).", flush=True)
            # Found by a write's check, the heartbeat thread, or the thread's death or silence (rank 0):
            # every rank stops.
            if lock.lost:
                stop_request.request(LOCK_LOST)
            stopped_by = stop_request.agreed()
            if stopped_by == LOCK_LOST:
                raise LockLost(lock.lost_message() if world.is_main else
                               "rank 0 lost the run's lock: this run stops and writes nothing more.")
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


def resume(trainer: Trainer, ckpt: dict, source: str, optim: OptimConfig, world: World) -> int:
    """Load weights, EMA, optimizer, schedule and stream states; return the first step to run.

    Published TorchCFM checkpoints carry only weights, optimizer, schedule and step: their random
    streams restart from --seed.
    """
    nets.load_weights(trainer.net, ckpt["net_model"], f"{source} (net_model)")
    nets.load_weights(trainer.ema, ckpt["ema_model"], f"{source} (ema_model)")
    trainer.optimizer.load_state_dict(ckpt["optim"])
    scheduler = trainer.scheduler
    scheduler.load_state_dict(ckpt["sched"])
    # Training flags (--lr, --warmup) come from this command line, not the checkpoint.
    scheduler.base_lrs = [optim.lr for _ in trainer.optimizer.param_groups]
    for group in trainer.optimizer.param_groups:
        group["initial_lr"] = optim.lr
        group["lr"] = optim.lr * warmup_schedule(optim.warmup)(scheduler.last_epoch)
    if "streams" in ckpt:
        trainer.load_streams_state(ckpt["streams"])
    else:
        logging.warning("%s holds no shared random streams (a published or older checkpoint): they restart "
                        "from --seed.", source)
    rank_states = ckpt.get("rank_states") or []
    if world.rank < len(rank_states) and "rng" in rank_states[world.rank]:
        checkpoint_io.set_rng_state(rank_states[world.rank]["rng"], world.device)  # this rank's dropout RNG
    elif trainer.net.config["dropout"] > 0:
        logging.warning("the checkpoint holds no dropout RNG for rank %d: its dropout masks restart from "
                        "--seed + rank.", world.rank)
    if trainer.regularizer is not None and ckpt.get("regularizer"):
        trainer.regularizer.load_state_dict(ckpt["regularizer"])
    return int(ckpt["step"]) + 1


