"""The flags every training script shares (names as users type them; defaults: the published recipe), and
the UNet's construction arguments read from them. Defining the flags is all importing this module does."""

from __future__ import annotations

from absl import flags

from cfm.evaluation.solvers import SOLVERS
from cfm.io import errors
from cfm.io.distributed import DEFAULT_COLLECTIVE_TIMEOUT_S
from cfm.method.clustering import (
    CLUSTER_ALGORITHMS,
    PUBLISHED_CLUSTER_ALGORITHM,
    PUBLISHED_CLUSTER_SEED,
    PUBLISHED_NUM_SUBCLASSES,
)
from cfm.method.flow_matching import MATCHERS, OT_PAIRINGS
from cfm.method.unet import PAPER_CONFIG, normalize_config
from cfm.training import checks
from cfm.training.fast_path import COMPILE_MODES, PRECISIONS

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
            raise errors.UserError(
                f"--{flag}={getattr(FLAGS, flag)} contradicts the checkpoint's {arg}={stored[arg]}: "
                f"drop the flag to resume with the stored architecture."
            )
    return stored
