"""A training run's settings as frozen config groups; `TrainConfig` holds one of each.

Field names are the flag names users type (`--lr`, `--num_subclasses`, ...), and `TrainConfig`'s
groups come in the order the scripts have always recorded their flags, so `flag_record(config)` is
the `ckpt["flags"]` and wandb config of the published commands, byte for byte. A field whose
default is None means "not given": resuming then takes the checkpoint's value (the UNet's
architecture, the clusters' `num_subclasses`) and a fresh run the flag's default.

    config = TrainConfig(optim=OptimConfig(batch_size=64), recipe=LocalConfig(lambda_local=0.5))
    config.optim.lr                                  # 2e-4, the published default
    dataclasses.replace(config, run=RunConfig(device="cpu"))
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cfm.config.choices import (
    ANCHOR_LOSS_TYPES,
    ANCHOR_PAIRINGS,
    CLUSTER_ALGORITHMS,
    COMPILE_MODES,
    CONDITIONS,
    DEFAULT_COLLECTIVE_TIMEOUT_S,
    MATCHERS,
    OT_PAIRINGS,
    PAPER_CONFIG,
    PRECISIONS,
    PUBLISHED_CLUSTER_ALGORITHM,
    PUBLISHED_CLUSTER_SEED,
    PUBLISHED_NUM_SUBCLASSES,
    SOLVERS,
)
from cfm.config.settings import setting


@dataclass(frozen=True)
class FlowConfig:
    """The probability path and coupling: --model, --sigma, --ot_pairing."""

    model: str = setting("otcfm", choices=MATCHERS)
    sigma: float = setting(0.0, lower=0.0)
    ot_pairing: str = setting("replacement", choices=OT_PAIRINGS)


@dataclass(frozen=True)
class PathsConfig:
    """Where runs are written and CIFAR-10 (and the caches beside it) is found."""

    output_dir: str = setting("./results/")
    data_dir: str = setting("./data")


@dataclass(frozen=True)
class UNetConfig:
    """The UNet's architecture flags (None: not given: the checkpoint's when resuming, else the
    paper's). `method.nets.unet_arguments` turns them into `UNetModel`'s construction arguments."""

    num_channel: int | None = setting(None, lower=1, kind=int, flag_default=PAPER_CONFIG["num_channels"])
    num_res_blocks: int | None = setting(None, lower=1, kind=int, flag_default=PAPER_CONFIG["num_res_blocks"])
    channel_mult: tuple[int, ...] | None = setting(None, positive_ints=True, kind=tuple,
                                                   flag_default=PAPER_CONFIG["channel_mult"])
    attention_resolutions: str | None = setting(None, positive_ints=True, kind=str,
                                                flag_default=PAPER_CONFIG["attention_resolutions"])
    num_head_channels: int | None = setting(None, kind=int, flag_default=PAPER_CONFIG["num_head_channels"])
    dropout: float | None = setting(None, kind=float, flag_default=PAPER_CONFIG["dropout"])


# What each architecture flag sets among UNetModel's construction arguments.
ARCH_FLAGS = {
    "num_channel": "num_channels",
    "num_res_blocks": "num_res_blocks",
    "channel_mult": "channel_mult",
    "attention_resolutions": "attention_resolutions",
    "num_head_channels": "num_head_channels",
    "dropout": "dropout",
}


@dataclass(frozen=True)
class OptimConfig:
    """Optimisation (the published recipe); --lr and --warmup always come from this config, also
    when resuming."""

    lr: float = setting(2e-4)
    grad_clip: float = setting(1.0)
    total_steps: int = setting(400001, lower=1)
    warmup: int = setting(5000, lower=0)
    batch_size: int = setting(128)
    ema_decay: float = setting(0.9999, lower=0.0, upper=1.0)
    seed: int = setting(0)


@dataclass(frozen=True)
class ExecutionConfig:
    """How a step runs on the hardware (training/fast_path.py, ot_pipeline.py) and how otcfm pairs
    under torchrun (--ot_scope)."""

    precision: str = setting("auto", choices=PRECISIONS)
    channels_last: bool = setting(False)
    compile: bool = setting(False)
    compile_mode: str = setting("default", choices=COMPILE_MODES)
    ot_pipeline: bool = setting(True)
    ot_scope: str = setting("global", choices=("global", "local"))


@dataclass(frozen=True)
class RunConfig:
    """Outputs, resume and the run's surroundings (device, wandb, torchrun's timeout)."""

    save_step: int = setting(20000, lower=0)
    log_step: int = setting(100, lower=1)
    grid_size: int = setting(64, lower=1)
    grid_steps: int = setting(99, lower=1)
    checkpoint_path: str = setting("")
    resume: str = setting("off", choices=("off", "auto"))
    overwrite: bool = setting(False)
    wandb_mode: str = setting("offline", choices=("online", "offline", "disabled"))
    device: str = setting("")
    # At least 10 s: a shorter wait mistakes an ordinary slow step on a busy machine for a lost rank.
    # At most a day: no wait of a healthy run comes near it (the longest, one rank working alone,
    # is an hour), and a far larger value (inf, 1e15) overflows the timeouts torch builds from it.
    collective_timeout: float = setting(DEFAULT_COLLECTIVE_TIMEOUT_S, lower=10.0, upper=86400.0)


@dataclass(frozen=True)
class FIDConfig:
    """The FID at save steps (EMA weights, split across ranks)."""

    fid_num_gen: int = setting(-1, lower=-1)
    integration_method: str = setting("dopri5", choices=SOLVERS)
    integration_steps: int = setting(100, lower=1)
    tol: float = setting(1e-5)
    batch_size_fid: int = setting(1024, lower=1)
    fid_inception_path: str | None = setting(None, kind=str)
    fid_stats_path: str | None = setting(None, kind=str)


@dataclass(frozen=True)
class ClusterConfig:
    """Same-cluster batches (locality, anchor, and the plain script's local-loss monitor)."""

    num_subclasses: int | None = setting(None, lower=1, kind=int, flag_default=PUBLISHED_NUM_SUBCLASSES)
    cluster_weighting: str = setting("uniform", choices=("uniform", "size"))
    cluster_algorithm: str = setting(PUBLISHED_CLUSTER_ALGORITHM, choices=CLUSTER_ALGORITHMS)
    cluster_seed: int = setting(PUBLISHED_CLUSTER_SEED)
    visualize: bool = setting(True)
    group_dir: str = setting("./group")


@dataclass(frozen=True)
class MonitorConfig:
    """train_cifar10.py's recipe: no regularizer; the local loss of a same-cluster batch is logged
    on log steps (monitoring only) unless monitor_local is False."""

    monitor_local: bool = setting(True)


@dataclass(frozen=True)
class LocalConfig:
    """train_cifar10_locality.py's recipe: + lambda_local * the local loss on same-cluster batches."""

    lambda_local: float = setting(1.0)
    lambda_name: str = setting("1e0")


@dataclass(frozen=True)
class AnchorConfig:
    """train_cifar10_anchor.py's recipe: + lambda_anchor * the anchor loss against cluster centroids."""

    lambda_anchor: float = setting(1.0)
    lambda_name: str = setting("1e0")
    centroid_update_freq: int = setting(1000, lower=1)
    centroid_samples: int = setting(500, lower=0)
    anchor_loss_type: str = setting("full", choices=ANCHOR_LOSS_TYPES)
    anchor_pairing: str = setting("published", choices=ANCHOR_PAIRINGS)


@dataclass(frozen=True)
class LaunchConfig:
    """train_cifar10_ddp.py's rendezvous settings (they only fill MASTER_ADDR/MASTER_PORT when the
    launcher set none); recorded with the run's flags, as the published DDP script's."""

    parallel: bool = setting(True)
    master_addr: str = setting("localhost")
    master_port: str = setting("12355")


@dataclass(frozen=True)
class ConditionConfig:
    """Class- or cluster-conditioned training with classifier-free-guidance dropout
    (training/conditioning.py): --condition, and --cond_drop_prob, the probability that a training
    label is replaced by the null label (None: not given, 0.1).

    `recorded`: an unconditional run leaves this group out of `flag_record`, so its ckpt["flags"]
    and wandb config stay the records of the runs before conditioning existed, byte for byte
    (tests/data/golden/flag_records.json); a conditional run records both flags."""

    condition: str = setting("none", choices=CONDITIONS)
    cond_drop_prob: float | None = setting(None, lower=0.0, upper=1.0, kind=float, flag_default=0.1)

    @property
    def recorded(self) -> bool:
        return self.condition != "none"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run takes. `recipe` picks the script's loss (training/recipes.py)."""

    flow: FlowConfig = field(default_factory=FlowConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    run: RunConfig = field(default_factory=RunConfig)
    fid: FIDConfig = field(default_factory=FIDConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    recipe: MonitorConfig | LocalConfig | AnchorConfig = field(default_factory=MonitorConfig)
    launch: LaunchConfig | None = None
    condition: ConditionConfig = field(default_factory=ConditionConfig)
