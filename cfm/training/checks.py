"""Up-front checks of a training run's inputs, run before any heavy work.

Loading CIFAR-10 and clustering it take seconds to minutes; a mistake found after them (or at the
first step, or never) costs that time and often a traceback. `check_training_inputs` runs once, in
`loop.train`, after the config is checked (`cfm.config.check_config`) and the checkpoint is read (`check_batch_and_clip` and
`check_output_dir` earlier, before the run's lock file is written there), and turns each mistake a
user can make into one `UserError` sentence naming the fix:

    recipe             the anchor term's main pairing needs a straight-line model (icfm, otcfm)
    --batch_size       a positive multiple of the number of processes; --grad_clip positive
    learning rate      finite and >= 0 (Adam takes NaN silently, a negative rate only later)
    UNet arguments     see `unet.check_config` (heads, attention resolutions, widths, levels)
    --output_dir       a writable folder (or one that can be created there)
    --checkpoint_path  holds what resuming needs (weights, EMA, optimizer, schedule, step), with
                       weights and optimizer state shaped for the UNet being built
    --num_subclasses   leaves every class's clusters a batch on average (`check_cluster_sizes`: once
                       the labels are loaded, before K-means)

Single-setting formats (bounds, choices, lists of positive integers) are checked earlier, by absl at
parsing and by `check_config` on any config; the device by `distributed.resolve_device`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from cfm.config import AnchorConfig, OptimConfig, TrainConfig
from cfm.config.choices import STRAIGHT_LINE_MODELS
from cfm.config.training import ARCH_FLAGS
from cfm.io import checkpoint_io, errors, run_files
from cfm.method import nets
from cfm.method.clustering import CIFAR10_CLASSES
from cfm.method.unet import UNetModel, check_config

# What `training.resume` reads. The published TorchCFM checkpoints hold exactly these.
RESUME_KEYS = ("net_model", "ema_model", "optim", "sched", "step")


def check_recipe(config: TrainConfig) -> None:
    """Raise a `UserError` for settings of the recipe that contradict the flow: the anchor term's
    main pairing reuses the main term's straight-line x_t, which only icfm and otcfm train on."""
    recipe, model = config.recipe, config.flow.model
    if isinstance(recipe, AnchorConfig) and recipe.anchor_pairing == "main" and model not in STRAIGHT_LINE_MODELS:
        raise errors.UserError(f"--anchor_pairing=main reuses the main term's straight-line x_t, which --model={model} "
                               f"does not train on: use --anchor_pairing=published or --model=icfm/otcfm.")


def check_batch_and_clip(optim: OptimConfig, world_size: int) -> None:
    """Raise a `UserError` unless --batch_size splits into `world_size` equal blocks and --grad_clip is
    positive (checked first: neither needs anything but the flags and the world)."""
    if optim.batch_size <= 0 or optim.batch_size % world_size:
        raise errors.UserError(
            f"--batch_size={optim.batch_size} must be a positive multiple of the {world_size} processes."
        )
    if optim.grad_clip <= 0:
        raise errors.UserError("--grad_clip must be positive.")


def check_cluster_sizes(num_subclasses: int, labels: torch.Tensor, batch_size: int) -> None:
    """Raise a `UserError` unless each class's images split into `num_subclasses` clusters of at
    least `batch_size` images on average, naming the largest `--num_subclasses` that does.

    The rule: floor(n_c / K) >= B for the smallest class c, i.e. K <= floor(min_c n_c / B). K-means
    clusters vary in size, so this guarantees the mean cluster size of every class, not each cluster's
    (a smaller cluster's batches repeat images, see `samplers.ClassConditionedSampler`). A K that fails
    it makes most clusters smaller than a batch, and past n_c it asks K-means for more clusters than
    there are images: many minutes of clustering, and a warning per class, for batches of repeats.
    `labels`: int [N] classes of the training images; B is the global batch (one cluster per batch).
    """
    counts = torch.bincount(labels.cpu(), minlength=len(CIFAR10_CLASSES))
    present = counts.nonzero().flatten()
    if len(present) == 0:
        return  # no data: the sampler says so
    smallest = int(present[counts[present].argmin()])
    size = int(counts[smallest])
    if size // num_subclasses >= batch_size:
        return
    largest = size // batch_size
    what = (f"--num_subclasses={num_subclasses} splits the smallest class ({CIFAR10_CLASSES[smallest]}, {size} images) "
            f"into clusters of {size / num_subclasses:g} images on average, fewer than --batch_size={batch_size}")
    if largest == 0:
        raise errors.UserError(f"{what}, and even the whole class is smaller than a batch: pass --batch_size={size} "
                               f"or less with --num_subclasses=1.")
    raise errors.UserError(f"{what}: pass --num_subclasses={largest} or less (or a smaller --batch_size).")


def check_output_dir(output_dir: str, paths: run_files.RunPaths) -> None:
    """Raise a `UserError` unless the run folder (`paths.run_dir`, under `output_dir`) can be created and written."""
    reason = run_files.unwritable_reason(paths.run_dir)
    if reason is not None:
        raise errors.UserError(
            f"--output_dir={output_dir} cannot hold the run folder ({reason}): pass a writable --output_dir."
        )


def check_training_inputs(optim: OptimConfig, ckpt: dict | None, checkpoint_path: str, unet_config: dict) -> None:
    """Raise a `UserError` for the first input that would fail (or silently go wrong) later.

    `ckpt` is the checkpoint being resumed (read from `checkpoint_path`), or None;
    `unet_config` is the architecture this run builds (the checkpoint's or the config's); messages
    name the architecture flags (`ARCH_FLAGS`).
    """
    if not math.isfinite(optim.lr) or optim.lr < 0:
        raise errors.UserError(f"--lr={optim.lr} is not a learning rate: pass a finite number >= 0, e.g. 2e-4.")
    try:
        check_config(unet_config, names={arg: f"--{flag}" for flag, arg in ARCH_FLAGS.items()})
    except ValueError as err:
        raise errors.UserError(str(err)) from err
    if ckpt is not None:
        check_resumable(ckpt, checkpoint_path, unet_config)


def check_resumable(ckpt: dict, path: str | Path, unet_config: dict) -> None:
    """Raise a `CheckpointError` unless `ckpt` holds everything `training.resume` loads, shaped for
    a UNet built with `unet_config`: weights and EMA (keys and shapes), the optimizer state (one
    entry per parameter, moment buffers of the parameter's shape), the schedule and the step.

    The UNet is built on the meta device: shapes only, no memory, no time.
    """
    missing = [key for key in RESUME_KEYS if key not in ckpt]
    if missing:
        raise checkpoint_io.CheckpointError(
            f"checkpoint {path} lacks {', '.join(missing)}, which resuming needs: pass a checkpoint written by a "
            f"training script (it holds {', '.join(RESUME_KEYS)})."
        )
    with torch.device("meta"):
        net = UNetModel(**unet_config)
    for key in ("net_model", "ema_model"):
        nets.check_weights(net, ckpt[key], f"{path} ({key})")
    try:
        int(ckpt["step"])
        usable = isinstance(ckpt["sched"], dict) and "last_epoch" in ckpt["sched"]
    except (TypeError, ValueError, RuntimeError):
        usable = False
    if not usable:
        raise checkpoint_io.CheckpointError(
            f"checkpoint {path} holds no usable 'step' number or 'sched' state: pass a checkpoint written by a "
            f"training script."
        )
    problem = optimizer_state_problem(ckpt["optim"], list(net.parameters()))
    if problem is not None:
        raise checkpoint_io.CheckpointError(
            f"checkpoint {path}: its optimizer state does not fit this UNet ({problem}): resume with the "
            f"architecture it was trained with."
        )


def optimizer_state_problem(state: dict, params: list) -> str | None:
    """What keeps `torch.optim.Optimizer.load_state_dict(state)` from fitting `params` (one
    parameter group or several, in `net.parameters()` order), or None. torch itself only compares
    the counts; a mis-shaped moment buffer would crash the first step."""
    if not isinstance(state, dict) or not isinstance(state.get("param_groups"), list) or "state" not in state:
        return "no 'param_groups' and 'state'"
    ids = [index for group in state["param_groups"] for index in group.get("params", [])]
    if len(ids) != len(params):
        return f"{len(ids)} parameters, this UNet has {len(params)}"
    for number, (index, param) in enumerate(zip(ids, params)):
        for name, value in state["state"].get(index, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                return f"parameter {number}'s {name} is {tuple(value.shape)}, the parameter {tuple(param.shape)}"
    return None
