"""Checkpoint -> ODE samples -> FID (clean-fid legacy_tensorflow, 50k samples vs CIFAR-10 train).

    python compute_fid.py --model=otcfm --step=400000 --integration_method=dopri5
    python compute_fid.py --checkpoint=results/otcfm/otcfm_cifar10_weights_step_400000.pt \
        --integration_method=euler --integration_steps=100 --save_samples=samples.npz

Works with our checkpoints (they store the UNet's construction arguments) and with the published
TorchCFM ones (no arguments stored: the paper UNet with --num_channel channels is rebuilt). Each
result is printed and appended to `fid.jsonl` in the checkpoint's folder. Missing FID files are
reported before any sampling starts (see fid.py for where they are looked up).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from absl import app, flags

import fid
import utils_cifar
from sampling import SOLVERS, generate_samples

FLAGS = flags.FLAGS

flags.DEFINE_string("model", "otcfm", "Method name, used in the default checkpoint path.")
flags.DEFINE_string("input_dir", "./results", "Folder holding {model}/{model}_cifar10_weights_step_{step}.pt.")
flags.DEFINE_integer("step", 400000, "Training step of the checkpoint (default path; used if the checkpoint stores none).")
flags.DEFINE_string("checkpoint", None, "Checkpoint path; overrides --input_dir/--model/--step.")
flags.DEFINE_enum("integration_method", "dopri5", SOLVERS, "ODE solver.")
flags.DEFINE_integer("integration_steps", 100, "Steps of the fixed-step solvers.", lower_bound=1)
flags.DEFINE_float("tol", 1e-5, "atol = rtol of dopri5.", lower_bound=1e-12)
flags.DEFINE_integer("num_gen", 50000, "Number of generated samples.", lower_bound=1)
flags.DEFINE_integer("batch_size_fid", 1024, "Samples per ODE solve (one system) and per Inception batch.", lower_bound=1)
flags.DEFINE_integer("num_channel", 128, "Base UNet width, only for checkpoints that store no UNet config.", lower_bound=1)
flags.DEFINE_bool("use_ema", True, "Sample with the EMA weights (else the raw network).")
flags.DEFINE_integer("seed", 0, "Seed of the noise x0 (sample i is the same whatever the batch size).", lower_bound=0)
flags.DEFINE_bool("fid", True, "Compute FID; False only generates (and saves) samples.")
flags.DEFINE_string("save_samples", None, "Write the samples to this .npz (uint8 NHWC under 'arr_0').")
flags.DEFINE_string("grid", None, "Write a PNG grid of the first 64 samples here.")
flags.DEFINE_string("data_dir", "./data", "CIFAR-10 and FID files ({data_dir}/fid/) live here.")
flags.DEFINE_string("fid_inception_path", None, "Local inception-2015-12-05.pt (else $FID_INCEPTION_PATH, caches, download).")
flags.DEFINE_string("fid_stats_path", None, "Local reference statistics .npz with mu, sigma (else $FID_STATS_PATH, ...).")
flags.DEFINE_string("device", "auto", "auto (cuda if available), cpu, cuda, cuda:1, ...")


def fail(message: str) -> None:
    """A user-fixable problem: one line on stderr, exit status 1, no traceback."""
    print(f"compute_fid.py: {message}", file=sys.stderr)
    sys.exit(1)


def default_checkpoint() -> Path:
    """{input_dir}/{model}/{model}_cifar10_weights_step_{step}.pt; for icfm, the published release's
    name `cfm_cifar10_...` is tried when ours is absent."""
    folder = Path(FLAGS.input_dir) / FLAGS.model
    path = folder / f"{FLAGS.model}_cifar10_weights_step_{FLAGS.step}.pt"
    published = folder / f"cfm_cifar10_weights_step_{FLAGS.step}.pt"
    return published if FLAGS.model == "icfm" and not path.is_file() and published.is_file() else path


def save_outputs(samples: torch.Tensor) -> None:
    """--save_samples (uint8 NHWC npz, the common evaluator format) and --grid (8 per row)."""
    if FLAGS.save_samples:
        path = Path(FLAGS.save_samples)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, arr_0=samples.permute(0, 2, 3, 1).contiguous().numpy())
        print(f"samples: {path}")
    if FLAGS.grid:
        from torchvision.utils import save_image

        path = Path(FLAGS.grid)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(samples[:64].float() / 255, path, nrow=8)
        print(f"grid: {path}")


def main(argv):
    del argv
    path = Path(FLAGS.checkpoint) if FLAGS.checkpoint else default_checkpoint()
    scorer = None
    try:
        device = utils_cifar.resolve_device(FLAGS.device)
        ckpt = utils_cifar.load_checkpoint(path)
        fallback = dict(utils_cifar.PAPER_CONFIG, num_channels=FLAGS.num_channel)
        net = utils_cifar.build_net_from_checkpoint(ckpt, FLAGS.use_ema, fallback, device, source=str(path))
        if FLAGS.fid:
            scorer = fid.FIDScorer.prepare(FLAGS.fid_inception_path, FLAGS.fid_stats_path, FLAGS.data_dir,
                                           device=device, batch_size=FLAGS.batch_size_fid)
    except utils_cifar.UserError as err:  # checkpoint, data, FID files, device
        fail(str(err))
    step = int(ckpt.get("step", FLAGS.step))
    method = FLAGS.integration_method
    keep = bool(FLAGS.save_samples or FLAGS.grid)
    sampler_args = dict(method=method, steps=FLAGS.integration_steps, tol=FLAGS.tol, seed=FLAGS.seed)

    start = time.perf_counter()
    if scorer is not None:
        result = scorer.evaluate_net(net, FLAGS.num_gen, FLAGS.batch_size_fid, keep_samples=keep, **sampler_args)
        samples, mean_nfe, score = result.samples, result.mean_nfe, result.fid
    else:
        samples, mean_nfe = generate_samples(net, FLAGS.num_gen, FLAGS.batch_size_fid, **sampler_args)
        score = None
    seconds = time.perf_counter() - start
    if keep:
        save_outputs(samples)

    record = {
        "checkpoint": str(path),
        "step": step,
        "model": FLAGS.model,
        "use_ema": FLAGS.use_ema,
        "integration_method": method,
        **({"tol": FLAGS.tol} if method == "dopri5" else {"integration_steps": FLAGS.integration_steps}),
        "mean_nfe": mean_nfe,
        "num_gen": FLAGS.num_gen,
        "batch_size_fid": FLAGS.batch_size_fid,
        "seed": FLAGS.seed,
        "fid": score,
        "seconds": round(seconds, 2),
    }
    if scorer is None:
        print(json.dumps(record))
        return
    record.update(fid_stats=str(scorer.stats_path), fid_stats_source=scorer.stats_source,
                  provenance=utils_cifar.provenance(device))
    utils_cifar.append_jsonl(path.parent / "fid.jsonl", record)
    print(f"FID {score:.4f} ({FLAGS.num_gen} samples, {method}, mean NFE {mean_nfe:.1f}, {seconds:.0f} s); "
          f"appended to {path.parent / 'fid.jsonl'}")


if __name__ == "__main__":
    app.run(main)
