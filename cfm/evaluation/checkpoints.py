"""Which checkpoint an evaluation scores (a `CheckpointSpec`, cfm/config/evaluation.py): its file,
its net, the path its loss_fm is scored on, and the head of the result records of compute_fid.py,
compute_locality.py and compute_generalization.py.

    spec.checkpoint=PATH                    a checkpoint file (ours or a published TorchCFM one)
    spec.model, input_dir, step             {input_dir}/{model}/{model}_cifar10_weights_step_{step}.pt
    spec.pretrained=otcfm|icfm|fm           the published weights, fetched into {data_dir}/weights/
    spec.use_ema, num_channel (for checkpoints that store no UNet arguments), data_dir, device

    net = checkpoints.load(CheckpointSpec(checkpoint="run/otcfm_cifar10_weights_step_20000.pt"), "cpu")[2]
"""

from __future__ import annotations

from pathlib import Path

import torch
from absl import logging

from cfm.config import CheckpointSpec, GuidanceConfig
from cfm.config.settings import value_or_default
from cfm.evaluation import pretrained
from cfm.io import checkpoint_io, errors, run_files
from cfm.method import nets, unet
from cfm.method.guidance import Guidance, balanced_labels


def check_spec(spec: CheckpointSpec) -> None:
    """UserError (one sentence) for contradicting choices of weights, before anything is loaded."""
    if spec.pretrained and spec.checkpoint:
        raise errors.UserError("--pretrained and --checkpoint both name the weights: pass one of them.")


def default_checkpoint(spec: CheckpointSpec) -> Path:
    """{input_dir}/{model}/{model}_cifar10_weights_step_{step}.pt; for icfm, the published release's
    name `cfm_cifar10_...` is tried when ours is absent."""
    model = value_or_default(spec, "model")
    folder = Path(spec.input_dir) / model
    path = folder / f"{model}_cifar10_weights_step_{spec.step}.pt"
    published = folder / f"cfm_cifar10_weights_step_{spec.step}.pt"
    return published if model == "icfm" and not path.is_file() and published.is_file() else path


def load(spec: CheckpointSpec, device: torch.device | str, progress: bool = True) -> tuple[Path, dict, torch.nn.Module]:
    """The checkpoint path, its contents and its (EMA) net on `device`, in eval mode without gradients.
    A missing or unfitting file, or unavailable published weights, is a UserError."""
    if spec.pretrained:
        path, ckpt = pretrained.published_checkpoint(spec.pretrained, spec.data_dir, progress=progress)
    else:
        path = Path(spec.checkpoint) if spec.checkpoint else default_checkpoint(spec)
        ckpt = checkpoint_io.load_checkpoint(path)
    fallback = dict(unet.PAPER_CONFIG, num_channels=spec.num_channel)
    net = nets.build_net_from_checkpoint(ckpt, spec.use_ema, fallback, device, source=str(path))
    return path, ckpt, net


def sampling_guidance(config: GuidanceConfig, net: torch.nn.Module, num: int, ckpt: dict | None = None) -> Guidance | None:
    """How `num` samples of the loaded `net` (of checkpoint `ckpt`) are drawn: a conditional net's
    `Guidance` (sample i's label: config.label, else class-balanced, cluster labels in the training
    mix the checkpoint records as ckpt["condition"]["label_counts"]; scale config.guidance_scale),
    None for an unconditional net. Guidance settings for an unconditional net, or a label it does not
    have, are a UserError."""
    num_labels = getattr(net, "num_classes", None)
    if num_labels is None:
        if config != GuidanceConfig():
            raise errors.UserError("--guidance_scale and --label need a label-conditioned checkpoint (trained with "
                                   "--condition=class or cluster); this one is unconditional: drop them.")
        return None
    if config.label is not None and config.label >= num_labels:
        raise errors.UserError(f"--label={config.label} is not one of the checkpoint's {num_labels} labels "
                               f"(0..{num_labels - 1}).")
    counts = ((ckpt or {}).get("condition") or {}).get("label_counts")
    return Guidance(balanced_labels(num, num_labels, config.label, counts), config.guidance_scale)


def guidance_record(ckpt: dict, guidance: Guidance | None, label: int | None) -> dict:
    """The fields a result record of a conditional checkpoint's samples adds: condition ("class" or
    "cluster", as trained), guidance_scale w and label (None: balanced labels). None for an
    unconditional checkpoint (`guidance` None): its records keep exactly the fields they had."""
    if guidance is None:
        return {}
    return {"condition": checkpoint_io.stored_condition(ckpt), "guidance_scale": guidance.scale, "label": label}


def checkpoint_model(spec: CheckpointSpec, ckpt: dict) -> str:
    """The method the checkpoint was trained with: its stored --model; for a checkpoint that stores
    no flags (TorchCFM's published ones), --pretrained, else --model."""
    return (ckpt.get("flags") or {}).get("model", spec.pretrained or value_or_default(spec, "model"))


def checkpoint_path_matcher(spec: CheckpointSpec, ckpt: dict):
    """The checkpoint's path for loss_fm: its stored --model, --sigma, --ot_pairing (TorchCFM's
    published checkpoints store none: --pretrained or --model, sigma 0)."""
    # Imported here: POT comes with flow_matching, and compute_fid.py needs no path.
    from cfm.method.flow_matching import make_matcher

    stored = ckpt.get("flags") or {}
    model = checkpoint_model(spec, ckpt)
    if spec.model is not None and spec.model != model:
        logging.warning("the checkpoint was trained with --model=%s: its loss_fm is scored on that path, "
                        "not on --model=%s.", model, spec.model)
    try:
        return make_matcher(model, stored.get("sigma", 0.0), stored.get("ot_pairing", "replacement"))
    except ValueError as err:  # an unknown --model for a checkpoint that stores none
        raise errors.UserError(str(err)) from err


def record_head(spec: CheckpointSpec, path: Path, ckpt: dict, matcher=None) -> dict:
    """The fields every result record (fid.jsonl, locality.jsonl, generalization.jsonl) starts with,
    in this order: checkpoint, step (the checkpoint's, else --step), model (`checkpoint_model`),
    use_ema; then, where a `matcher` scores loss_fm on the checkpoint's path, that path's sigma."""
    head = {"checkpoint": str(path), "step": int(ckpt.get("step", spec.step)), "model": checkpoint_model(spec, ckpt),
            "use_ema": spec.use_ema}
    if matcher is not None:
        head["sigma"] = matcher.sigma
    return head


def results_file(checkpoint: Path, name: str) -> Path:
    """`{checkpoint's folder}/{name}`, where an evaluation appends its records; a UserError now if
    that folder cannot be written, rather than after the evaluation's minutes or hours."""
    path = checkpoint.parent / name
    reason = run_files.unwritable_reason(checkpoint.parent)
    if reason is not None:
        raise errors.UserError(f"cannot append to {path} ({reason}): copy the checkpoint to a writable "
                                    f"folder and pass it with --checkpoint.")
    return path
