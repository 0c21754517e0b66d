"""The flags every training script shares (names as users type them; defaults: the published
recipe, from the config fields), and `train_config`, which turns the parsed flags into a
`TrainConfig`. Defining the flags is all importing this module does."""

from __future__ import annotations

from absl import flags

from cfm.cli.flag_defs import define, from_flags
from cfm.config import (
    ClusterConfig,
    ConditionConfig,
    ExecutionConfig,
    FIDConfig,
    FlowConfig,
    LaunchConfig,
    OptimConfig,
    PathsConfig,
    RunConfig,
    TrainConfig,
    UNetConfig,
)

define(FlowConfig, "model", "flow matching variant")
define(FlowConfig, "sigma", "std of the extra Gaussian noise on the probability path")
define(FlowConfig, "ot_pairing",
       "otcfm: draw B pairs from the OT plan with replacement (published) or use the optimal permutation")
define(PathsConfig, "output_dir", "where run folders are written")
define(PathsConfig, "data_dir", "CIFAR-10 location (downloaded there on first use)")

# UNet construction arguments (paper config by default); stored in every checkpoint.
define(UNetConfig, "num_channel", "UNet base channels")
define(UNetConfig, "num_res_blocks", "residual blocks per resolution")
define(UNetConfig, "channel_mult", "channel multiplier per resolution")
define(UNetConfig, "attention_resolutions", "resolutions with self-attention, e.g. 16 or 16,8")
define(UNetConfig, "num_head_channels", "channels per attention head")
define(UNetConfig, "dropout", "dropout in residual blocks")

# Optimisation (the published recipe).
define(OptimConfig, "lr", "Adam learning rate")
define(OptimConfig, "grad_clip", "gradient norm clip")
define(OptimConfig, "total_steps", "training steps (loop indices 0..total_steps-1)")
define(OptimConfig, "warmup", "linear learning-rate warm-up steps")
define(OptimConfig, "batch_size", "global batch size (split across ranks)")
define(OptimConfig, "ema_decay", "EMA decay, applied every step")
define(OptimConfig, "seed", "seed of every random stream (shared by all ranks; dropout on rank r uses seed + r)")

# The fast path of the training forward (fast_path.py); sampling and FID stay fp32 and eager.
define(ExecutionConfig, "precision",
       "training forward/backward: bf16 autocast with fp32 weights, Adam and EMA, or fp32; auto = bf16 "
       "on a CUDA GPU with native bf16, else fp32")
define(ExecutionConfig, "channels_last", "channels-last memory format for the UNet and its training inputs")
define(ExecutionConfig, "compile", "torch.compile the training forward (the monitor, grids and FID stay eager)")
define(ExecutionConfig, "compile_mode", "torch.compile mode, with --compile")
define(ExecutionConfig, "ot_pipeline",
       "otcfm: draw the next batch after each step and solve its OT plan on a worker "
       "thread while the device runs the step (False: inline; both train the same run bit for bit)")
define(ExecutionConfig, "ot_scope",
       "otcfm under torchrun: pair the whole global batch (global, world-size invariant) or each "
       "rank's block within itself (local, as the published DDP script)")

# Outputs.
define(RunConfig, "save_step", "checkpoint + sample grids every this many steps (0 = never)")
define(RunConfig, "log_step", "metrics to the progress bar, wandb and {run}_metrics.jsonl every this many steps")
define(RunConfig, "grid_size", "images in each sample grid")
define(RunConfig, "grid_steps", "Euler steps for the sample grids (99: the published t_span = linspace(0, 1, 100))")
define(RunConfig, "checkpoint_path", "resume from this checkpoint")
define(RunConfig, "resume",
       "auto: continue from the newest checkpoint of this run that loads, or start fresh if it has none "
       "(one command for the first launch and every requeue)")
define(RunConfig, "overwrite", "let a new run replace existing checkpoints in its run folder")
define(RunConfig, "wandb_mode",
       "wandb mode (WANDB_MODE in the environment wins); offline runs sync later with `wandb sync`")
define(RunConfig, "device", "training device (default: cuda if available, else cpu)")
define(RunConfig, "collective_timeout",
       "under torchrun: seconds a collective waits for a rank that stopped answering before every "
       "other rank exits, naming it")

# FID at save steps (EMA weights, split across ranks), as in the published runs.
define(FIDConfig, "fid_num_gen", "samples for the FID at each save step: -1 = 10000 on CUDA and 0 on CPU "
       "(hours there); 0 disables")
define(FIDConfig, "integration_method", "ODE solver of the training-time FID")
define(FIDConfig, "integration_steps", "steps of the fixed-step solvers")
define(FIDConfig, "tol", "atol = rtol of dopri5")
define(FIDConfig, "batch_size_fid", "samples per ODE solve and Inception batch")
define(FIDConfig, "fid_inception_path", "local inception-2015-12-05.pt (else $FID_INCEPTION_PATH, caches, download)")
define(FIDConfig, "fid_stats_path", "local reference statistics .npz (else $FID_STATS_PATH, caches, download)")

# Same-cluster batches (locality/anchor training, and the local-loss monitor of train_cifar10.py).
define(ClusterConfig, "num_subclasses", "K-means sub-clusters per CIFAR-10 class (1 = the class itself)")
define(ClusterConfig, "cluster_weighting",
       "how a batch's cluster is drawn: uniformly (published) or proportional to its size")
define(ClusterConfig, "cluster_algorithm", "per-class clustering: MiniBatchKMeans as published, or exact (Lloyd) K-means")
define(ClusterConfig, "cluster_seed", "K-means random_state (42, as published)")
define(ClusterConfig, "visualize", "save one image grid per cluster and a README.txt at start-up")
define(ClusterConfig, "group_dir", "where --visualize writes the cluster grids")

# Conditional generation (training/conditioning.py; README "Conditional generation").
define(ConditionConfig, "condition",
       "train a conditional net on each image's CIFAR-10 class or K-means cluster (10 * num_subclasses "
       "labels), or none (unconditional, as published)")
define(ConditionConfig, "cond_drop_prob",
       "with --condition: probability that a training label is replaced by the null label "
       "(classifier-free guidance; default 0.1)")


def train_config(recipe_type=None, flag_values=flags.FLAGS, launch: bool = False) -> TrainConfig:
    """The `TrainConfig` of the parsed flags: every shared group, the script's recipe group
    (`recipe_type`, e.g. LocalConfig, from its flags; None: the default recipe, as bench/ uses) and,
    for the torchrun script, its LaunchConfig."""
    groups = {name: from_flags(group, flag_values) for name, group in (
        ("flow", FlowConfig), ("paths", PathsConfig), ("unet", UNetConfig), ("optim", OptimConfig),
        ("execution", ExecutionConfig), ("run", RunConfig), ("fid", FIDConfig), ("cluster", ClusterConfig),
        ("condition", ConditionConfig))}
    if recipe_type is not None:
        groups["recipe"] = from_flags(recipe_type, flag_values)
    return TrainConfig(**groups, launch=from_flags(LaunchConfig, flag_values) if launch else None)
