"""Which checkpoint an evaluation scores (`CheckpointSpec`), as data: the settings compute_fid.py,
compute_locality.py and compute_generalization.py share (cfm/evaluation/checkpoints.py acts on it).

    CheckpointSpec(checkpoint="results/otcfm/otcfm_cifar10_weights_step_400000.pt")
    CheckpointSpec(model="icfm", input_dir="./results", step=400000)   # the default path
    CheckpointSpec(pretrained="otcfm")                                 # the published weights
    GuidanceConfig(guidance_scale=2.0)                                 # a conditional net's labels, guided
"""

from __future__ import annotations

from dataclasses import dataclass

from cfm.config.choices import PUBLISHED_WEIGHTS
from cfm.config.settings import setting


@dataclass(frozen=True)
class CheckpointSpec:
    """checkpoint | model/input_dir/step | pretrained names the weights; model None: not given (the
    checkpoint's own method is used where it stores one, else "otcfm")."""

    model: str | None = setting(None, kind=str, flag_default="otcfm")
    input_dir: str = setting("./results")
    step: int = setting(400000)
    checkpoint: str | None = setting(None, kind=str)
    pretrained: str | None = setting(None, kind=str, choices=PUBLISHED_WEIGHTS)
    num_channel: int = setting(128, lower=1)
    use_ema: bool = setting(True)
    data_dir: str = setting("./data")
    device: str = setting("auto")


@dataclass(frozen=True)
class GuidanceConfig:
    """How an evaluation samples a label-conditioned checkpoint (cfm/method/guidance.py): classifier-free
    guidance scale w (v_null + w (v_cond - v_null); 1 the conditional field, 0 the unconditional one)
    and the label of every sample (None: class-balanced). Only for conditional checkpoints."""

    guidance_scale: float = setting(1.0)
    label: int | None = setting(None, kind=int, lower=0)
