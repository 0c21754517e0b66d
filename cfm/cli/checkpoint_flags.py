"""The flags naming the checkpoint an evaluation scores, shared by compute_fid.py, compute_locality.py
and compute_generalization.py, and `checkpoint_spec`, which turns them into a `CheckpointSpec`:

    --checkpoint=PATH                       a checkpoint file (ours or a published TorchCFM one)
    --model=M --input_dir=DIR --step=S      {input_dir}/{model}/{model}_cifar10_weights_step_{step}.pt
    --pretrained=otcfm|icfm|fm              the published weights, fetched into {data_dir}/weights/
    --use_ema (True), --num_channel (for checkpoints that store no UNet arguments), --data_dir, --device

Defining the flags is the only thing importing this module does. Four names here are also training
flags with another meaning, on purpose (no script defines both sets): --model is free text (a
checkpoint's folder name, checked against the checkpoint), --num_channel only rebuilds checkpoints
that store no UNet arguments, --device takes "auto", and --data_dir also holds the FID files.
"""

from __future__ import annotations

from absl import flags

from cfm.cli.flag_defs import define, from_flags
from cfm.config import CheckpointSpec

define(CheckpointSpec, "model", "Method name: the default checkpoint path, and the path of the loss_fm of "
       "compute_locality.py and compute_generalization.py when the checkpoint stores no flags.")
define(CheckpointSpec, "input_dir", "Folder holding {model}/{model}_cifar10_weights_step_{step}.pt.")
define(CheckpointSpec, "step", "Training step of the checkpoint (default path; used if the checkpoint stores none).")
define(CheckpointSpec, "checkpoint", "Checkpoint path; overrides --input_dir/--model/--step.")
define(CheckpointSpec, "pretrained",
       "Score the published TorchCFM 1.0.4 weights of this method (fetched into {data_dir}/weights/).")
define(CheckpointSpec, "num_channel", "Base UNet width, only for checkpoints that store no UNet config.")
define(CheckpointSpec, "use_ema", "Evaluate the EMA weights (else the raw network).")
define(CheckpointSpec, "data_dir", "CIFAR-10 and what is cached beside it: FID files ({data_dir}/fid/), K-means "
       "clusters, --pretrained weights ({data_dir}/weights/).")
define(CheckpointSpec, "device", "auto (cuda if available), cpu, cuda, cuda:1, ...")


def checkpoint_spec(flag_values=flags.FLAGS) -> CheckpointSpec:
    """The `CheckpointSpec` of the parsed flags (--model None unless given)."""
    return from_flags(CheckpointSpec, flag_values)
