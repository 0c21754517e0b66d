"""What a run writes while it trains (rank 0): checkpoints (`CheckpointWriter`), sample grids, metrics
(`RunLogger`: progress bar, wandb, `{run}_metrics.jsonl`) and the training-time FID, which every rank shares."""

from __future__ import annotations

import os
from typing import Callable

from absl import logging

from cfm.config import FIDConfig
from cfm.evaluation.sampling import SamplingStopped, save_sample_grid
from cfm.io import checkpoint_io, errors, run_files
from cfm.io.distributed import (
    PeerLost,
    World,
    broadcast_from_main,
    gather_everywhere,
    gather_to_main,
    is_collective_failure,
    mean_over_ranks,
    wait_for_main,
)
from cfm.training.run_lock import RunLock
from cfm.training.trainer import Trainer


class RunLogger:
    """Rank 0's metrics sink: progress bar, wandb and `{file_prefix}_metrics.jsonl`. Every write to
    the metrics file checks the run's lock just before it (`lock.verify()`): a run that lost its
    lock leaves the new holder's history alone."""

    def __init__(self, paths: run_files.RunPaths, config: dict, mode: str, start: int,
                 provenance: dict, lock: RunLock):
        import wandb  # imported here: a slow import that only rank 0 needs

        self.paths, self.lock = paths, lock
        # The metrics file holds one history: a fresh run starts it anew, a resumed run drops the
        # lines a crashed run wrote after its checkpoint (they will be logged again), and a torn
        # last line (a kill or a full disk mid-append) with a warning.
        if lock.verify():
            run_files.truncate_jsonl(paths.metrics, keep=lambda record: record.get("step", -1) < start)
        self.wandb = wandb.init(
            project="conditional-flow-matching",
            name=paths.file_prefix,
            config={**config, "provenance": provenance},
            mode=os.environ.get("WANDB_MODE", mode),
            dir=str(paths.run_dir),
        )
        # One line per (re)start: where the metrics that follow came from.
        if lock.verify():
            run_files.append_jsonl(paths.metrics, {"step": start, "event": "start", "provenance": provenance})

    def log(self, record: dict) -> bool:
        """Log `record` (metrics or FID) unless the run lost its lock; whether it was logged."""
        if not self.lock.verify():
            return False
        self.wandb.log(record, step=record["step"])
        run_files.append_jsonl(self.paths.metrics, record)
        return True

    def close(self) -> None:
        self.wandb.finish()


def fid_num_gen(fid_config: FIDConfig, world: World) -> int:
    """Samples per training-time FID: --fid_num_gen, or by default 10000 on CUDA (published) and 0 on CPU."""
    num_gen = fid_config.fid_num_gen
    return num_gen if num_gen >= 0 else (10000 if world.device.type == "cuda" else 0)


def prepare_fid(fid_config: FIDConfig, data_dir: str, world: World):
    """Every rank's FID scorer for save steps (each samples and featurises its share of the
    samples), or None on every rank (FID off, or its files unreachable from some rank: logged).

    Rank 0 finds or downloads the files (or computes the reference statistics) while the others
    wait for it; they then find its files. Checked before training starts, so a missing Inception
    file or statistics never crashes a run.
    """
    if fid_num_gen(fid_config, world) == 0:
        return None
    from cfm.evaluation import fid

    def prepare():
        try:
            return fid.FIDScorer.prepare(fid_config.fid_inception_path, fid_config.fid_stats_path, data_dir,
                                         device=world.device, batch_size=fid_config.batch_size_fid), None
        except errors.UserError as err:  # FIDUnavailable, or no CIFAR-10 to compute statistics from
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


def log_fid(scorer, ema, fid_config: FIDConfig, seed: int, step: int, logger: RunLogger | None, world: World,
            stop: Callable[[], bool]) -> list[str]:
    """FID of the EMA net's samples, every rank sampling and featurising its share, logged by rank 0
    as `fid` (with its mean NFE); `fid_num_gen` samples of noise seeded with `seed`. Returns what a stop request skipped (["the FID"] or []). A failure
    on any rank (say, out of memory) is logged and training goes on: a metric must never cost the run."""
    try:
        result = scorer.evaluate_net(ema, fid_num_gen(fid_config, world), fid_config.batch_size_fid,
                                     fid_config.integration_method, fid_config.integration_steps, fid_config.tol,
                                     seed, world=world, stop=stop)
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


class Diverged(errors.UserError):
    """A loss term or the gradient norm became NaN or infinite; nothing non-finite was written."""


def progress_fields(record: dict) -> dict:
    """What the progress bar shows: losses, lr and (for clustered batches) the batch's cluster."""
    losses = [k for k in record if k in ("loss", "loss_fm") or k.endswith("_loss") and k != "regularized_loss"]
    fields = {k: f"{record[k]:.4f}" for k in losses}
    fields["lr"] = f"{record['lr']:.2e}"
    if "cluster" in record:
        fields["cluster"] = record["cluster"]
    return fields


class CheckpointWriter:
    """Writes the run's checkpoints (rank 0; every rank calls `save` on the same steps) and
    remembers the last one written. State with a non-finite loss or gradient behind it is never
    written: `save` raises `Diverged` instead."""

    def __init__(self, trainer: Trainer, paths: run_files.RunPaths, unet_config: dict, config: dict,
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
        rank_states = gather_to_main({"rng": checkpoint_io.rng_state(world.device)}, world)
        path = self.paths.checkpoint(step)
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
            if trainer.condition is not None:  # an unconditional checkpoint keeps the keys it had
                ckpt["condition"] = trainer.condition.record()
            if not self.lock.verify():  # taken over: the loop stops after this step
                return
            checkpoint_io.atomic_save(ckpt, path)
        self.last = str(path)

    def draw_grids(self, step: int, stop: Callable[[], bool]) -> list[str]:
        """The sample grids of the net and its EMA at `step` (rank 0), each drawn only if the run
        still holds its lock just before it; returns what a stop request (`stop()` true) skipped,
        e.g. ["the normal and ema sample grids"]."""
        kinds = {"normal": self.trainer.net, "ema": self.trainer.ema}
        for drawn, (kind, model) in enumerate(kinds.items()):
            if not self.lock.verify():  # taken over (a grid takes seconds): nothing more is written
                return []
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
