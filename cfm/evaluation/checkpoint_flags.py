"""Which checkpoint an evaluation script scores: the flags compute_fid.py, compute_locality.py and
compute_generalization.py share, and the head of their result records.

    --checkpoint=PATH                       a checkpoint file (ours or a published TorchCFM one)
    --model=M --input_dir=DIR --step=S      {input_dir}/{model}/{model}_cifar10_weights_step_{step}.pt
    --pretrained=otcfm|icfm|fm              the published weights, fetched into {data_dir}/weights/
    --use_ema (True), --num_channel (for checkpoints that store no UNet arguments), --data_dir, --device

Defining the flags is the only thing importing this module does; `load` reads them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from absl import flags, logging

from cfm.evaluation import pretrained
from cfm.io import checkpoint_io, errors, run_files
from cfm.method import nets, unet

FLAGS = flags.FLAGS

flags.DEFINE_string("model", "otcfm", "Method name: the default checkpoint path, and the path of the loss_fm of "
                    "compute_locality.py and compute_generalization.py when the checkpoint stores no flags.")
flags.DEFINE_string("input_dir", "./results", "Folder holding {model}/{model}_cifar10_weights_step_{step}.pt.")
flags.DEFINE_integer("step", 400000, "Training step of the checkpoint (default path; used if the checkpoint stores none).")
flags.DEFINE_string("checkpoint", None, "Checkpoint path; overrides --input_dir/--model/--step.")
flags.DEFINE_enum("pretrained", None, list(pretrained.PUBLISHED),
                  "Score the published TorchCFM 1.0.4 weights of this method (fetched into {data_dir}/weights/).")
flags.DEFINE_integer("num_channel", 128, "Base UNet width, only for checkpoints that store no UNet config.", lower_bound=1)
flags.DEFINE_bool("use_ema", True, "Evaluate the EMA weights (else the raw network).")
flags.DEFINE_string("data_dir", "./data", "CIFAR-10 and what is cached beside it: FID files ({data_dir}/fid/), K-means "
                    "clusters, --pretrained weights ({data_dir}/weights/).")
flags.DEFINE_string("device", "auto", "auto (cuda if available), cpu, cuda, cuda:1, ...")


def check_flags() -> None:
    """UserError (one sentence) for contradicting choices of weights, before anything is loaded."""
    if FLAGS.pretrained and FLAGS.checkpoint:
        raise errors.UserError("--pretrained and --checkpoint both name the weights: pass one of them.")


def default_checkpoint() -> Path:
    """{input_dir}/{model}/{model}_cifar10_weights_step_{step}.pt; for icfm, the published release's
    name `cfm_cifar10_...` is tried when ours is absent."""
    folder = Path(FLAGS.input_dir) / FLAGS.model
    path = folder / f"{FLAGS.model}_cifar10_weights_step_{FLAGS.step}.pt"
    published = folder / f"cfm_cifar10_weights_step_{FLAGS.step}.pt"
    return published if FLAGS.model == "icfm" and not path.is_file() and published.is_file() else path


def load(device: torch.device, progress: bool = True) -> tuple[Path, dict, torch.nn.Module]:
    """The checkpoint path, its contents and its (EMA) net on `device`, in eval mode without gradients.
    A missing or unfitting file, or unavailable published weights, is a UserError."""
    if FLAGS.pretrained:
        path, ckpt = pretrained.published_checkpoint(FLAGS.pretrained, FLAGS.data_dir, progress=progress)
    else:
        path = Path(FLAGS.checkpoint) if FLAGS.checkpoint else default_checkpoint()
        ckpt = checkpoint_io.load_checkpoint(path)
    fallback = dict(unet.PAPER_CONFIG, num_channels=FLAGS.num_channel)
    net = nets.build_net_from_checkpoint(ckpt, FLAGS.use_ema, fallback, device, source=str(path))
    return path, ckpt, net


def checkpoint_model(ckpt: dict) -> str:
    """The method the checkpoint was trained with: its stored --model; for a checkpoint that stores
    no flags (TorchCFM's published ones), --pretrained, else --model."""
    return (ckpt.get("flags") or {}).get("model", FLAGS.pretrained or FLAGS.model)


def checkpoint_path_matcher(ckpt: dict):
    """The checkpoint's path for loss_fm: its stored --model, --sigma, --ot_pairing (TorchCFM's
    published checkpoints store none: --pretrained or --model, sigma 0)."""
    # Imported here: POT comes with flow_matching, and compute_fid.py needs no path.
    from cfm.method.flow_matching import make_matcher

    stored = ckpt.get("flags") or {}
    model = checkpoint_model(ckpt)
    if FLAGS["model"].present and FLAGS.model != model:
        logging.warning("the checkpoint was trained with --model=%s: its loss_fm is scored on that path, "
                        "not on --model=%s.", model, FLAGS.model)
    try:
        return make_matcher(model, stored.get("sigma", 0.0), stored.get("ot_pairing", "replacement"))
    except ValueError as err:  # an unknown --model for a checkpoint that stores none
        raise errors.UserError(str(err)) from err


def record_head(path: Path, ckpt: dict, matcher=None) -> dict:
    """The fields every result record (fid.jsonl, locality.jsonl, generalization.jsonl) starts with,
    in this order: checkpoint, step (the checkpoint's, else --step), model (`checkpoint_model`),
    use_ema; then, where a `matcher` scores loss_fm on the checkpoint's path, that path's sigma."""
    head = {"checkpoint": str(path), "step": int(ckpt.get("step", FLAGS.step)), "model": checkpoint_model(ckpt),
            "use_ema": FLAGS.use_ema}
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
