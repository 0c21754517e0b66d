"""Checkpoint -> does it copy training images, and does it fit them better than unseen ones? (see generalization.py)

    python compute_generalization.py --model=otcfm --step=400000
    python compute_generalization.py --checkpoint=results/otcfm_local_1e0/otcfm_cifar10_local_1e0_weights_step_400000.pt
    python compute_generalization.py --pretrained=otcfm --samples=samples.npz    # compute_fid.py --save_samples
    python compute_generalization.py --checkpoint=... --quick                     # about a minute on a CPU, tiny UNet
    torchrun --standalone --nproc_per_node=8 compute_generalization.py --pretrained=icfm

Sections of one record (each a dict under its name):
    memorization       --num_gen samples (generated as compute_fid.py generates them, same --seed, same
                       solver flags; or the images of --samples), each searched exactly for its two
                       nearest training images, flips included: the fraction memorized (d1 < d2 / 3),
                       ratio quantiles, mean nearest distance; a PNG grid of the most memorized (--grid)
    memorization_test  the same numbers for the first --num_test test images: the real-data baseline
    loss_gap           loss_fm on --loss_images training images and as many test images at --num_times
                       times with the same noise, on the checkpoint's own path: per time and overall
                       (train, test, gap = test - train), with standard errors over batches
    memorizing_field   the distance of the net's field to the memorizing field v* (memorizing_field.py) on
                       test-image paths and on its own trajectories, at --field_times times, and the
                       memorization of --field_samples samples of the v*-driven sampler (--field=False: off)

A label-conditioned checkpoint (--condition=class or cluster) is sampled as compute_fid.py samples it:
class-balanced labels, or --label, at --guidance_scale (a --samples file is taken to hold compute_fid.py's
samples of the same --label: sample i with label i of that order). Its record adds `condition`,
`guidance_scale` and `label` (null: balanced), and per class (a cluster label counts for its class) the
fraction memorized with its 95% Wilson interval and how often the nearest training image is of the
requested class, for the samples and, as the baseline, for the test images (their own class). The loss gap
evaluates the net with each image's class (class labels) or the null label (cluster labels: test images
have no training cluster); the distance to v* with the null label, v* being the unconditional memorizing
field. `net_label` in those sections says which.

The record starts with the head of fid.jsonl and locality.jsonl (checkpoint, step, model, use_ema;
checkpoints.record_head) and is appended to `generalization.jsonl` beside the checkpoint. The same
--seed gives every checkpoint the same sample noise, training subset, loss noise and times, so
records pair by seed. Under torchrun the samples, searches and loss batches are split across ranks by
whole batches (batch k on rank k mod W) and gathered in order: the numbers are one process's; rank 0
writes. The checkpoint flags are cfm/cli/checkpoint_flags.py's, shared with compute_fid.py and compute_locality.py.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from absl import app, flags

from cfm.cli import checkpoint_flags, guidance_flags
from cfm.cli.flag_defs import define
from cfm.config import CheckpointSpec, FIDConfig
from cfm.evaluation import checkpoints, generalization, generalization_results, memorizing_field, results
from cfm.evaluation.sampling import gather_batches, generate_samples, noise, write_image_grid
from cfm.evaluation.solvers import SolverSetting
from cfm.io import checkpoint_io, cifar10, errors, run_files
from cfm.io.cifar10 import to_uint8
from cfm.io.distributed import World, init_world, main_first
from cfm.method.flow_matching import FlowMatcher
from cfm.method.guidance import Guidance, label_classes

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(checkpoint_flags)  # listed by --helpshort with this script's own
flags.adopt_module_key_flags(guidance_flags)  # --guidance_scale, --label: conditional checkpoints, as compute_fid.py

flags.DEFINE_integer("num_gen", 10000, "Generated samples to search (ignored with --samples).", lower_bound=1)
# The sampling settings of training's FID (FIDConfig: defaults, bounds, choices), with help of this
# script's own; --tol, --seed and --num_gen as compute_fid.py's (see there why they differ from training's).
define(FIDConfig, "batch_size_fid", "Samples per ODE solve (as compute_fid.py), and queries per "
       "nearest-neighbour search.")
define(FIDConfig, "integration_method", "ODE solver of the samples.")
define(FIDConfig, "integration_steps", "Steps of the fixed-step solvers.")
flags.DEFINE_float("tol", 1e-5, "atol = rtol of dopri5.", lower_bound=1e-12)
flags.DEFINE_integer("seed", 0, "Seed of the sample noise (as compute_fid.py's), the training subset, and the loss "
                     "gap's noise and draws: the same seed scores every checkpoint on the same numbers.", lower_bound=0)
flags.DEFINE_string("samples", None, "Search the images of this .npz (compute_fid.py --save_samples: uint8 NHWC under "
                    "'arr_0') instead of generating --num_gen.")
flags.DEFINE_integer("num_test", 10000, "Test images searched as the real-data baseline (the first of the split).",
                     lower_bound=1)
flags.DEFINE_integer("search_chunk", 10000, "Training images per distance block of the search (memory: 24 bytes x "
                     "queries x this).", lower_bound=1)
flags.DEFINE_string("grid", None, "PNG of the most memorized samples over their nearest and second-nearest training "
                    "images (default: {checkpoint name}_memorized.png beside the checkpoint).")
flags.DEFINE_integer("grid_size", 16, "Samples in the grid (its columns).", lower_bound=1)
flags.DEFINE_integer("loss_images", 10000, "Training images (a seeded subset) and test images of the loss gap; whole "
                     "--batch_size batches of them are used.", lower_bound=1)
flags.DEFINE_integer("batch_size", 128, "Images per loss batch (otcfm pairs noise and images within a batch, as in "
                     "training).", lower_bound=1)
flags.DEFINE_integer("num_times", 10, "Times of the loss gap: (k + 1/2) / num_times, k = 0 .. num_times - 1.",
                     lower_bound=1)
flags.DEFINE_bool("field", True, "Measure the distance to the memorizing field v* (memorizing_field.py) and the "
                  "v*-driven sampler.")
flags.DEFINE_integer("field_points", 1000, "Points per time on each set (test-image paths, the net's own "
                     "trajectories) where the net is compared with v*.", lower_bound=1)
flags.DEFINE_integer("field_times", 10, "Times of the distance to v*: (k + 1/2) / field_times (as the loss gap's).",
                     lower_bound=1)
flags.DEFINE_integer("field_steps", 100, "Euler steps over [0, 1] of the net's trajectories and of the v*-driven "
                     "sampler.", lower_bound=1)
flags.DEFINE_integer("field_samples", 1000, "Samples of the v*-driven sampler (0: skip it).", lower_bound=0)
flags.DEFINE_float("field_delta", 1e-3, "The v*-driven sampler stops at t = 1 - field_delta (v* is undefined at 1).",
                   lower_bound=1e-6, upper_bound=0.5)
flags.DEFINE_integer("field_chunk", 4096, "Training images per chunk of the v* sums.", lower_bound=1)
flags.DEFINE_enum("field_dtype", "float64", ["float64", "float32"], "dtype of the v* sums (float32 runs with TF32 off).")
flags.DEFINE_bool("quick", False, "A small size that runs in about a minute on a CPU with a tiny UNet: the values of "
                  "QUICK for every flag of it not given.")
flags.DEFINE_bool("quiet", False, "No progress bars.")

RESULTS_FILE = "generalization.jsonl"
# --quick: fewer samples, test images and loss images, and 10 Euler steps instead of dopri5.
QUICK = {"num_gen": 64, "num_test": 64, "loss_images": 64, "batch_size": 16, "num_times": 5,
         "integration_method": "euler", "integration_steps": 10,
         "field_points": 16, "field_times": 3, "field_steps": 10, "field_samples": 16}


@dataclasses.dataclass
class Evaluation:
    """What the sections share, loaded once: the checkpoint's spec, the net and its path, both splits
    (uint8 [N, 3, 32, 32], CPU) and their classes (int64 [N]), the search over the training images
    and their mirrors (on the device), the world; for a conditional net, its condition ("class" or
    "cluster") and the labels and scale of its samples."""

    spec: CheckpointSpec
    net: torch.nn.Module
    matcher: FlowMatcher
    train: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor
    test_labels: torch.Tensor
    search: generalization.FlipNeighbours
    world: World
    grid: Path
    samples: torch.Tensor | None  # --samples (uint8 NCHW), else None: generated
    condition: str | None = None  # None: an unconditional net
    guidance: Guidance | None = None

    def sample_classes(self, num: int) -> torch.Tensor:
        """int64 [num]: the CIFAR-10 class of the label samples 0..num-1 were drawn with."""
        return label_classes(self.guidance.labels[:num], self.net.num_classes)


def apply_quick() -> None:
    """--quick: QUICK's value for each of its flags the command line does not set."""
    if FLAGS.quick:
        for name, value in QUICK.items():
            if not FLAGS[name].present:
                FLAGS[name].value = value


def read_samples(path: str) -> torch.Tensor:
    """The images of a compute_fid.py samples file: uint8 NHWC [N, 32, 32, 3] under 'arr_0' -> NCHW.
    A missing or foreign file is a UserError."""
    try:
        with np.load(path) as npz:
            images = npz["arr_0"]
    except (OSError, ValueError, KeyError) as err:
        raise errors.UserError(f"cannot read --samples={path} ({type(err).__name__}: {err}): pass a .npz "
                                    f"written by compute_fid.py --save_samples.") from err
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3) or len(images) < 1:
        raise errors.UserError(f"--samples={path} holds {images.dtype} {images.shape} under 'arr_0', not uint8 "
                                    f"images [N, 32, 32, 3] as compute_fid.py --save_samples writes.")
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def check_sizes(train: torch.Tensor, test: torch.Tensor) -> None:
    """UserError for counts the splits cannot serve (before any sampling)."""
    if FLAGS.num_test > len(test):
        raise errors.UserError(f"--num_test={FLAGS.num_test} but the test split holds {len(test)} images: "
                                    f"pass at most {len(test)}.")
    most = min(len(train), len(test))
    if not FLAGS.batch_size <= FLAGS.loss_images <= most:
        raise errors.UserError(f"--loss_images={FLAGS.loss_images} must lie between --batch_size="
                                    f"{FLAGS.batch_size} and the {most} images both splits hold.")


def prepare() -> tuple[Path, dict, Path, Evaluation]:
    """Flags, checkpoint, results folder, grid path, data and samples file, checked before any heavy
    work (each a UserError); returns (checkpoint path, checkpoint, results file, Evaluation)."""
    apply_quick()
    spec = checkpoint_flags.checkpoint_spec()
    checkpoints.check_spec(spec)
    samples = read_samples(FLAGS.samples) if FLAGS.samples else None
    world = init_world(FLAGS.device)
    with main_first(world, "loading the checkpoint and CIFAR-10"):  # rank 0 downloads; the others find them
        path, ckpt, net = checkpoints.load(spec, world.device, progress=not FLAGS.quiet)
        matcher = checkpoints.checkpoint_path_matcher(spec, ckpt)
        results_path = checkpoints.results_file(path, RESULTS_FILE)
        grid = Path(FLAGS.grid) if FLAGS.grid else path.parent / f"{path.stem}_memorized.png"
        run_files.ensure_writable(grid, "--grid")
        # A conditional net's samples: sample i with label i of compute_fid.py's (balanced, or --label), so
        # that a --samples file compute_fid.py wrote with the same --label carries the labels assumed here.
        guidance = checkpoints.sampling_guidance(guidance_flags.guidance_config(), net,
                                                 FLAGS.num_gen if samples is None else len(samples), ckpt)
        train, train_labels = cifar10.load_cifar10(FLAGS.data_dir, train=True)
        test, test_labels = cifar10.load_cifar10(FLAGS.data_dir, train=False)
    check_sizes(train, test)
    search = generalization.FlipNeighbours(train, world.device, FLAGS.search_chunk)
    return path, ckpt, results_path, Evaluation(spec, net, matcher, train, test, train_labels, test_labels, search,
                                                world, grid, samples, checkpoint_io.stored_condition(ckpt), guidance)


def memorization(ev: Evaluation) -> dict | None:
    """Generated samples (or --samples) -> their neighbours' numbers; the grid of the most memorized."""
    progress = not FLAGS.quiet
    if ev.samples is not None:
        samples, found = ev.samples, ev.search.search_across_ranks(ev.samples, FLAGS.batch_size_fid, ev.world, progress)
        source = {"samples": FLAGS.samples}
    else:
        setting = SolverSetting(FLAGS.integration_method, FLAGS.integration_steps, FLAGS.tol)
        found = []  # this rank's batches, searched on the device as they are sampled

        def search(images: torch.Tensor) -> None:
            found.append(ev.search.search(images))

        samples, mean_nfe = generate_samples(ev.net, FLAGS.num_gen, FLAGS.batch_size_fid, **dataclasses.asdict(setting),
                                             seed=FLAGS.seed, on_batch=search, world=ev.world, progress=progress,
                                             guidance=ev.guidance)
        found = gather_batches(found, ev.world)
        found = None if found is None else generalization.Neighbours.cat(found)
        source = {"samples": "generated", **setting.describe(), "mean_nfe": mean_nfe,
                  "batch_size_fid": FLAGS.batch_size_fid}
    if not ev.world.is_main:
        return None
    grid = generalization.most_memorized_grid(samples, found, ev.train, min(FLAGS.grid_size, len(samples)))
    write_image_grid(ev.grid, grid.float() / 255, nrow=len(grid) // 3)
    summary = {**source, **generalization.memorization_summary(found), "grid": str(ev.grid)}
    if ev.guidance is not None:  # per class of the requested labels
        summary.update(generalization.per_class_memorization(found, ev.sample_classes(len(samples)), ev.train_labels))
    return summary


def memorization_test(ev: Evaluation) -> dict | None:
    """The first --num_test test images: what real unseen images score (they copy nothing the net saw);
    for a conditional net also per class, the baseline of its samples' per-class numbers."""
    found = ev.search.search_across_ranks(ev.test[:FLAGS.num_test], FLAGS.batch_size_fid, ev.world, not FLAGS.quiet)
    if found is None:
        return None
    summary = generalization.memorization_summary(found)
    if ev.guidance is not None:
        summary.update(generalization.per_class_memorization(found, ev.test_labels[:FLAGS.num_test], ev.train_labels))
    return summary


def loss_gap(ev: Evaluation) -> dict | None:
    """loss_fm on the seeded training subset and the test images, per time and overall. A class-conditioned
    net is evaluated with each image's class, a cluster-conditioned one with the null label (test images
    have no training cluster; see generalization.py)."""
    train, test = generalization.loss_gap_indices(len(ev.train), len(ev.test), FLAGS.loss_images, FLAGS.seed)
    labels = (ev.train_labels[train], ev.test_labels[test]) if ev.condition == "class" else None
    gap = generalization.loss_gap(ev.net, ev.matcher, ev.train[train], ev.test[test],
                                  generalization.loss_times(FLAGS.num_times), FLAGS.batch_size, FLAGS.seed, ev.world,
                                  ev.world.device, progress=not FLAGS.quiet, labels=labels)
    if gap is None:
        return None
    net_label = {} if ev.condition is None else {"net_label": "class" if labels is not None else "null"}
    return {"images": gap.train.shape[0] * FLAGS.batch_size, "batch_size": FLAGS.batch_size, **net_label,
            **gap.summary()}


def memorizing_field_section(ev: Evaluation) -> dict | None:
    """How far the net is from the memorizing field v* (the exact minimizer of its loss over the
    training images and their mirrors) along t, on the test images' paths and on the net's own
    trajectories; and how many of the v*-driven sampler's samples the memorization criterion counts."""
    if not FLAGS.field:
        return None
    dtype = torch.float64 if FLAGS.field_dtype == "float64" else torch.float32
    field = memorizing_field.MemorizingField(ev.train, ev.matcher, ev.world, ev.world.device, FLAGS.field_chunk, dtype)
    times = generalization.loss_times(FLAGS.field_times).tolist()
    num = min(FLAGS.field_points, len(ev.test))
    on_sets = {
        "test_paths": memorizing_field.path_points(ev.matcher, ev.test[:num], times, FLAGS.seed),
        "trajectories": memorizing_field.model_trajectory_points(
            ev.net, num, times, FLAGS.batch_size_fid, "euler", FLAGS.field_steps, FLAGS.seed, ev.world),
    }
    # v* is the unconditional memorizing field (all training images, no label): a conditional net is
    # compared with it through its null-label field, net(t, x), on that field's own trajectories.
    net_label = {} if ev.condition is None else {"net_label": "null"}
    out = {**field.describe(), **net_label, "times": times, "points": num}
    for name, points in on_sets.items():
        distance = memorizing_field.field_distance(ev.net, field, points, times, FLAGS.batch_size)
        out[name] = {"distance": distance.per_time, "overall": distance.overall}
    if FLAGS.field_samples:  # every rank integrates the same noise (v* sums over every rank's images)
        x0 = noise(FLAGS.field_samples, seed=FLAGS.seed)
        samples = memorizing_field.memorizing_samples(field, x0, FLAGS.field_delta, "euler", FLAGS.field_steps)
        found = ev.search.search(to_uint8(samples.float()).cpu()) if ev.world.is_main else None
        out["sampler"] = None if found is None else {
            "num": FLAGS.field_samples, "steps": FLAGS.field_steps, "delta": FLAGS.field_delta,
            **generalization.memorization_summary(found)}
    return out if ev.world.is_main else None


# The record's sections, in order: name -> section(evaluation) -> dict on rank 0, None elsewhere.
SECTIONS: dict[str, Callable[[Evaluation], dict | None]] = {
    "memorization": memorization,
    "memorization_test": memorization_test,
    "loss_gap": loss_gap,
    "memorizing_field": memorizing_field_section,
}


def summary(record: dict) -> str:
    """One line: the headline numbers of each section."""
    mem, test, gap = record["memorization"], record["memorization_test"], record["loss_gap"]
    return (f"memorized {generalization_results.format_memorized(mem)} of {mem['num']} samples (test images: "
            f"{generalization_results.format_memorized(test)}), median ratio "
            f"{mem['ratio_quantiles']['0.5']:.3f} (test {test['ratio_quantiles']['0.5']:.3f}), nearest distance "
            f"{mem['nearest_distance']:.2f} (test {test['nearest_distance']:.2f}); loss_fm train "
            f"{results.format_mean_error(gap['loss_train'], gap['loss_train_se'])}, test "
            f"{results.format_mean_error(gap['loss_test'], gap['loss_test_se'])}, gap "
            f"{results.format_mean_error(gap['loss_gap'], gap['loss_gap_se'])}{class_summary(record)}"
            f"{field_summary(record)} (seed {record['seed']}, {record['seconds']:.0f} s)")


def class_summary(record: dict) -> str:
    """"; nearest training image of the requested class ..." for a conditional checkpoint ("" otherwise)."""
    if "condition" not in record:
        return ""
    mem, test = record["memorization"], record["memorization_test"]
    return (f"; nearest training image of the requested class for {100 * mem['nearest_class_fraction']:.3g}% of "
            f"the samples (test images, of their own: {100 * test['nearest_class_fraction']:.3g}%)")


def field_summary(record: dict) -> str:
    """"; distance to v* ..." for the summary line ("" when it was not measured)."""
    field = record.get("memorizing_field")
    if field is None:
        return ""
    sampler = field.get("sampler")
    memorized = f"; v* sampler memorized {generalization_results.format_memorized(sampler)}" if sampler else ""
    reference = ("" if field["vstar_is_minimizer"] else
                 f" (icfm's v*, a reference: {record['model']} couples noise and data, so it is not the minimizer)")
    return (f"; distance to v*{reference} {field['test_paths']['overall']:.3f} on test paths, "
            f"{field['trajectories']['overall']:.3f} on its trajectories{memorized}")


def evaluate() -> None:
    """Score the checkpoint on every section and append its record (rank 0)."""
    path, ckpt, results_path, ev = prepare()
    start = time.perf_counter()
    sections = {}
    for name, section in SECTIONS.items():
        begun = time.perf_counter()
        sections[name] = section(ev)
        if sections[name] is not None:
            sections[name]["seconds"] = round(time.perf_counter() - begun, 2)
    if not ev.world.is_main:
        return
    conditional = {} if ev.guidance is None else {
        "condition": ev.condition, "guidance_scale": ev.guidance.scale, "label": guidance_flags.guidance_config().label}
    record = {**checkpoints.record_head(ev.spec, path, ckpt, ev.matcher), **conditional, "seed": FLAGS.seed,
              "world_size": ev.world.size, **sections, "seconds": round(time.perf_counter() - start, 2),
              "provenance": run_files.provenance(ev.world.device)}
    run_files.append_jsonl(results_path, record)
    print(f"{summary(record)}; grid {ev.grid}; appended to {results_path}")


def main(argv):
    del argv
    try:
        evaluate()
    except errors.UserError as err:  # flags, checkpoint, weights, results folder, data, samples file, device
        sys.exit(f"compute_generalization.py: {err}")


if __name__ == "__main__":
    app.run(main)
