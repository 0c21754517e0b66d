"""Checkpoint -> ODE samples -> FID (clean-fid legacy_tensorflow, 50k samples vs CIFAR-10 train).

    python compute_fid.py --model=otcfm --step=400000 --integration_method=dopri5
    python compute_fid.py --checkpoint=results/otcfm/otcfm_cifar10_weights_step_400000.pt \
        --integration_method=euler --integration_steps=100 --save_samples=samples.npz
    python compute_fid.py --pretrained=otcfm --sweep="euler:1,2,5,10,20,50,100;dopri5:1e-3,1e-5" --straightness=1000
    torchrun --standalone --nproc_per_node=8 compute_fid.py --pretrained=icfm --fid_split=test
    python compute_fid.py --checkpoint=results/otcfm/otcfm_cifar10_weights_step_400000.pt \
        --sweep="dopri5:1e-5;guidance:0,1,1.5,2,3" --per_label_fid --kid     # a class-conditioned run, guided

Works with our checkpoints (they store the UNet's construction arguments), with the published
TorchCFM ones (no arguments stored: the paper UNet with --num_channel channels is rebuilt), and
with the published ones by name (--pretrained, fetched into {data_dir}/weights/, see pretrained.py).
Each result is printed and appended to `fid.jsonl` in the checkpoint's folder, one line per solver
setting (--sweep: FID against NFE, every setting on the same noise). Flag mistakes, unwritable
output paths and missing FID files are reported before any sampling starts (see fid.py for where
the FID files are looked up).

A label-conditioned checkpoint (trained with --condition=class or cluster) is sampled with class-balanced
labels (--label=K: all K) under classifier-free guidance of scale --guidance_scale (1: the conditional
field); a guidance:W1,W2 entry of --sweep scores each solver setting at each scale, on the same noise and
labels. Its records carry condition, guidance_scale and label (an unconditional checkpoint's records keep
their fields). --kid adds KID, --per_label_fid each class's FID against that class's images; both
use the reference split's features, extracted once from the local CIFAR-10 and cached in {data_dir}/fid/
(see cfm/evaluation/feature_metrics.py).

The checkpoint flags (--checkpoint | --model/--input_dir/--step | --pretrained, --use_ema, --num_channel,
--data_dir, --device) are cfm/cli/checkpoint_flags.py's, shared with compute_locality.py and compute_generalization.py.

Under torchrun the samples are split across ranks by whole --batch_size_fid batches (batch k on rank
k mod W; the noise is keyed by sample index), so the samples and the FID are those of one process
with the same seed; rank 0 writes the results (and scores KID and per-label FID on the gathered features). The ranks wait for rank 0's downloads, and for each
other's last batch, in a long-wait group of their own (see cfm/io/distributed.py).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from absl import app, flags

from cfm.cli import checkpoint_flags, guidance_flags
from cfm.cli.flag_defs import define
from cfm.config import CheckpointSpec, FIDConfig
from cfm.evaluation import checkpoints, feature_metrics, fid
from cfm.evaluation.sampling import generate_samples, straightness, write_image_grid
from cfm.evaluation.solvers import SolverSetting, parse_sweep, split_guidance_sweep
from cfm.io import atomic_files, errors, run_files
from cfm.io.distributed import init_world, main_first
from cfm.method.guidance import Guidance

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(checkpoint_flags)  # listed by --helpshort with this script's own
flags.adopt_module_key_flags(guidance_flags)  # --guidance_scale, --label

# The solver and FID-file settings of training's FID (FIDConfig: defaults, bounds, choices), with help of
# this script's own. Deliberately different from training's: --tol is bounded below here (dopri5 cannot
# meet a tolerance of 0; training's flag kept its published form), --seed >= 0 keys each sample's noise,
# and --num_gen is the published evaluation's 50k (training's --fid_num_gen: 10k).
define(FIDConfig, "integration_method", "ODE solver.")
define(FIDConfig, "integration_steps", "Steps of the fixed-step solvers.")
flags.DEFINE_float("tol", 1e-5, "atol = rtol of dopri5.", lower_bound=1e-12)
flags.DEFINE_string("sweep", None, "FID against NFE: solver settings 'SOLVER:V1,V2;...', step counts for the fixed-step "
                    "solvers, tolerances for dopri5 (e.g. euler:1,2,5,10,20,50,100;midpoint:5,10,50;dopri5:1e-3,1e-4,1e-5); "
                    "one fid.jsonl line per setting, all on the same noise. Replaces --integration_method/_steps/--tol. "
                    "Conditional checkpoints: a guidance:W1,W2 entry scores each setting at each guidance scale "
                    "(replaces --guidance_scale; alone, e.g. guidance:1,2,3, it keeps the solver flags).")
flags.DEFINE_integer("straightness", 0, "Also measure the straightness of this many paths on the Euler grid of "
                     "--integration_steps (0 = off).", lower_bound=0)
flags.DEFINE_integer("num_gen", 50000, "Number of generated samples.", lower_bound=1)
define(FIDConfig, "batch_size_fid", "Samples per ODE solve (one system) and per Inception batch.")
flags.DEFINE_integer("seed", 0, "Seed of the noise x0 (sample i is the same whatever the batch size and the number "
                     "of processes).", lower_bound=0)
flags.DEFINE_bool("fid", True, "Compute FID; False only generates (and saves) samples.")
flags.DEFINE_string("save_samples", None, "Write the samples to this .npz (uint8 NHWC under 'arr_0').")
flags.DEFINE_string("grid", None, "Write a PNG grid of the first 64 samples here.")
flags.DEFINE_enum("fid_split", "train", fid.SPLITS, "Reference statistics: CIFAR-10 train (as published) or test.")
define(FIDConfig, "fid_inception_path", "Local inception-2015-12-05.pt (else $FID_INCEPTION_PATH, caches, download).")
define(FIDConfig, "fid_stats_path", "Local reference statistics .npz with mu, sigma (else $FID_STATS_PATH, ...).")
flags.DEFINE_bool("quiet", False, "No progress bars (samples, straightness, download).")
flags.DEFINE_bool("kid", False, "Also KID (torchmetrics: polynomial kernel, 100 subsets of 1000) on the FID's features, "
                  "against the --fid_split images' features (extracted once from the local CIFAR-10, cached in "
                  "{data_dir}/fid/).")
flags.DEFINE_bool("per_label_fid", False, "Conditional checkpoints: also the FID of each class's samples against the "
                  "--fid_split images of that class (cluster labels: per class, over its clusters).")


RESULTS_FILE = "fid.jsonl"


def fail(message: str) -> None:
    """A user-fixable problem: one line on stderr, exit status 1, no traceback."""
    print(f"compute_fid.py: {message}", file=sys.stderr)
    sys.exit(1)


def check_flags(spec: CheckpointSpec) -> tuple[list[SolverSetting], list[float] | None]:
    """The solver settings to score and the guidance scales of --sweep's guidance entry (None without
    one); flag conflicts (`spec`'s too) and unwritable output paths raise UserError (one sentence)
    here, before anything heavy is loaded or sampled."""
    checkpoints.check_spec(spec)
    for flag in ("save_samples", "grid"):
        if FLAGS[flag].value:
            run_files.ensure_writable(FLAGS[flag].value, f"--{flag}")
    if (FLAGS.kid or FLAGS.per_label_fid) and not FLAGS.fid:
        raise errors.UserError("--kid and --per_label_fid score the samples' FID features: drop --fid=False.")
    default = [SolverSetting(FLAGS.integration_method, FLAGS.integration_steps, FLAGS.tol)]
    if FLAGS.sweep is None:
        return default, None
    if not FLAGS.fid:
        raise errors.UserError("--sweep scores every setting with FID: drop --fid=False.")
    if FLAGS.save_samples or FLAGS.grid:
        raise errors.UserError("--save_samples and --grid keep one setting's samples: drop them or --sweep.")
    solvers, scales = split_guidance_sweep(FLAGS.sweep)
    if scales is not None and FLAGS["guidance_scale"].present:
        raise errors.UserError("--sweep's guidance entry replaces --guidance_scale: drop one of them.")
    return (parse_sweep(solvers) if solvers else default), scales


def sampling_guidances(net: torch.nn.Module, ckpt: dict, scales: list[float] | None) -> list[Guidance | None]:
    """How each setting is sampled, one record each: [the flags' Guidance] (--label, else balanced
    labels; [None] for an unconditional net), or that Guidance at each scale of the sweep's guidance
    entry, all on the same labels. UserError (before sampling) for a guidance sweep or
    --per_label_fid of an unconditional net, and for the flags `checkpoints.sampling_guidance` refuses."""
    guidance = checkpoints.sampling_guidance(guidance_flags.guidance_config(), net, FLAGS.num_gen, ckpt)
    if guidance is None and (scales is not None or FLAGS.per_label_fid):
        what = "--sweep's guidance entry" if scales is not None else "--per_label_fid"
        raise errors.UserError(f"{what} needs a label-conditioned checkpoint (trained with --condition=class or "
                               "cluster); this one is unconditional: drop it.")
    return [guidance] if scales is None else [dataclasses.replace(guidance, scale=w) for w in scales]


def feature_scores(features: np.ndarray, reference: feature_metrics.ReferenceFeatures | None,
                   classes: np.ndarray | None) -> dict:
    """The record fields of --kid (kid, kid_std, kid_subsets, kid_subset_size) and --per_label_fid
    ({"class": FID}) of the samples' features [num_gen, D] (sample order, `classes` [num_gen] alike);
    {} when neither is asked for."""
    scores = {}
    if FLAGS.kid:
        scores.update(feature_metrics.kernel_inception_distance(reference.features, features, seed=FLAGS.seed).describe())
    if FLAGS.per_label_fid:
        scores["per_label_fid"] = feature_metrics.per_class_fid(features, classes, reference)
    return scores


def save_outputs(samples: torch.Tensor) -> None:
    """--save_samples (uint8 NHWC npz, the common evaluator format) and --grid (8 per row), each
    written atomically: a full disk after hours of sampling is one sentence (SaveError), never half a file."""
    if FLAGS.save_samples:
        path = Path(FLAGS.save_samples)
        path = path if path.suffix == ".npz" else path.with_name(f"{path.name}.npz")  # as np.savez names it
        array = samples.permute(0, 2, 3, 1).contiguous().numpy()
        with errors.writing(path):
            atomic_files.atomic_write(path, lambda f: np.savez(f, arr_0=array))
        print(f"samples: {path}")
    if FLAGS.grid:
        print(f"grid: {write_image_grid(FLAGS.grid, samples[:64].float() / 255, nrow=8)}")


def main(argv):
    del argv
    scorer = reference = classes = None
    spec = checkpoint_flags.checkpoint_spec()
    try:
        settings, scales = check_flags(spec)
        world = init_world(FLAGS.device)
        with main_first(world, "loading the checkpoint and the FID files"):  # rank 0 downloads and caches; the others find them
            path, ckpt, net = checkpoints.load(spec, world.device, progress=not FLAGS.quiet)
            guidances = sampling_guidances(net, ckpt, scales)
            if FLAGS.per_label_fid:
                classes = feature_metrics.sample_classes(guidances[0].labels, net.num_classes)
            if FLAGS.fid:
                results_path = checkpoints.results_file(path, RESULTS_FILE)
                if FLAGS.kid or FLAGS.per_label_fid:  # offline without CIFAR-10: one sentence, before the heavy work
                    feature_metrics.check_reference_features(FLAGS.data_dir, FLAGS.fid_split)
                scorer = fid.FIDScorer.prepare(FLAGS.fid_inception_path, FLAGS.fid_stats_path, FLAGS.data_dir,
                                               device=world.device, batch_size=FLAGS.batch_size_fid,
                                               split=FLAGS.fid_split)
                if (FLAGS.kid or FLAGS.per_label_fid) and world.is_main:  # only rank 0 scores the gathered features
                    reference = feature_metrics.load_reference_features(scorer.extractor, FLAGS.data_dir,
                                                                        FLAGS.fid_split, FLAGS.batch_size_fid)
    except errors.UserError as err:  # flags, output paths, checkpoint, weights, data, FID files, device
        fail(str(err))
    progress = not FLAGS.quiet
    extra = {"sweep": FLAGS.sweep} if FLAGS.sweep else {}  # the same in every record of this run
    if FLAGS.straightness:
        start = time.perf_counter()
        value = straightness(net, FLAGS.straightness, FLAGS.batch_size_fid, FLAGS.integration_steps, FLAGS.seed,
                             world, progress)
        extra.update(straightness=value, straightness_paths=FLAGS.straightness,
                     straightness_steps=FLAGS.integration_steps,
                     straightness_seconds=round(time.perf_counter() - start, 2))
    keep = bool(FLAGS.save_samples or FLAGS.grid)
    try:  # a full disk or a lost folder while writing the outputs: one sentence
        for setting, guidance in ((s, g) for s in settings for g in guidances):  # every one on the same noise and labels
            start = time.perf_counter()
            kwargs = dict(**dataclasses.asdict(setting), seed=FLAGS.seed, world=world, progress=progress,
                          guidance=guidance)
            if scorer is not None:
                result = scorer.evaluate_net(net, FLAGS.num_gen, FLAGS.batch_size_fid, keep_samples=keep, **kwargs)
                outcome = result and (result.samples, result.mean_nfe, result.fid,
                                      feature_scores(result.features, reference, classes))
            else:
                outcome = (*generate_samples(net, FLAGS.num_gen, FLAGS.batch_size_fid, **kwargs), None, {})
            if not world.is_main:  # rank 0 holds the gathered results and writes them
                continue
            samples, mean_nfe, score, scores = outcome
            seconds = time.perf_counter() - start
            if keep:
                save_outputs(samples)
            record = {
                **checkpoints.record_head(spec, path, ckpt),
                **setting.describe(),
                **checkpoints.guidance_record(ckpt, guidance, FLAGS.label),
                "mean_nfe": mean_nfe,
                "num_gen": FLAGS.num_gen,
                "batch_size_fid": FLAGS.batch_size_fid,
                "world_size": world.size,
                "seed": FLAGS.seed,
                "fid": score,
                **scores,
                "seconds": round(seconds, 2),
                **extra,
            }
            if scorer is None:
                print(json.dumps(record))
                continue
            record.update(fid_split=FLAGS.fid_split, fid_stats=str(scorer.stats_path),
                          fid_stats_source=scorer.stats_source, provenance=run_files.provenance(world.device))
            run_files.append_jsonl(results_path, record)
            straight = f"straightness {extra['straightness']:.4g}, " if FLAGS.straightness else ""
            guided = f"guidance scale {guidance.scale:g}, " if guidance is not None else ""
            kid = f", KID {scores['kid']:.4g}" if FLAGS.kid else ""
            print(f"FID {score:.4f}{kid} ({FLAGS.num_gen} samples, {setting}, {guided}mean NFE {mean_nfe:.1f}, {straight}"
                  f"{seconds:.0f} s); appended to {results_path}")
    except errors.UserError as err:
        fail(str(err))


if __name__ == "__main__":
    app.run(main)
