"""Training-step throughput of the real loop: one table, a row per configuration.

    python bench/train_step.py --device=cpu --num_channel=32 --num_res_blocks=1 --channel_mult=1,2 \
        --batch_size=8 --steps=3 --warmup_steps=1            # tiny UNet on the CPU, under a minute
    python bench/train_step.py --device=cuda --batch_size=128 --peak_tflops=790 --compile   # paper UNet, H200

Rows: every regularizer of --regularizers (none = plain; local; anchor = the published pairing, two
extra rows per sample; anchor_main = --anchor_pairing=main, one extra row) in every precision of
--precisions (default fp32 and bf16 on CUDA, fp32 on a CPU), each also compiled (--compile_mode)
with --compile, all with pipelined OT, plus the plain rows with inline OT (--ot_pipeline=False);
or exactly the rows of --rows, REGULARIZER:PRECISION[+compile][+inline][+cond], e.g.
``none:bf16,none:bf16+inline,none:bf16+compile,local:bf16+compile``; +cond trains a class-conditioned
net (--condition=class, labels dropped with probability 0.1), e.g. ``none:fp32,none:fp32+cond``
(target: a conditioned step within 1.05x the plain one; on a shared 2-core CPU, tiny UNet, batch 8,
``--rows=none:fp32,none:fp32+cond,none:fp32,none:fp32+cond --steps=20``: plain/conditioned medians
439/432 and 467/437 ms, conditioned/plain 0.96, inside the noise). Regularized rows draw
single-cluster batches (one cluster per class); the forward rows per sample are 1, 3, 3 and 2.

Columns (times in ms, medians over --steps steps after --warmup_steps untimed ones):
    it/s         1000 / the median time of `Trainer.step` (what training runs; synchronised after each step)
    step         that median, and the fastest and slowest step (the spread)
    draw         `Trainer.draw`: batch, noise, OT pairing, regularizer inputs (pipelined: with the
                 `Trainer.prefetch` of the next step, and the wait for its plan)
    fwd          `Trainer.losses`: the forward and the losses
    bwd+update   `Trainer.update`: backward, clip, Adam, schedule, EMA
                 (the three phases are timed in separate, synchronised steps: they show where the
                 time goes, and their sum can exceed the step, whose host and device work overlap)
    peak MiB     the most GPU memory allocated during the row (CUDA only)
    TFLOP/s      FLOPs of a step's forward and backward (counted by torch's FlopCounterMode: 2 per
                 multiply-add; the paper UNet is 12.44 GFLOP per 32x32 forward) / median step time
    % peak       TFLOP/s / --peak_tflops (H200: about 790 dense bf16)
    syncs        with --sync_check on CUDA: host syncs per step (torch.cuda.set_sync_debug_mode "warn")

The table goes to stdout and, with --out, is appended to that file.
"""

import datetime
import os
import statistics
import sys
import time
import warnings

import torch
from absl import app, flags
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataclasses  # noqa: E402

from cfm.cli import training_flags  # noqa: E402  (defines the model, optimisation and fast-path flags used below)
from cfm.config import TrainConfig  # noqa: E402
from cfm.io import cifar10, run_files  # noqa: E402
from cfm.io.distributed import World, resolve_device  # noqa: E402
from cfm.method import nets  # noqa: E402
from cfm.method.flow_matching import make_matcher  # noqa: E402
from cfm.method.regularizers import AnchorRegularizer, LocalRegularizer  # noqa: E402
from cfm.method.samplers import ClassConditionedSampler  # noqa: E402
from cfm.method.unet import UNetModel  # noqa: E402
from cfm.training.conditioning import Conditioning  # noqa: E402
from cfm.training.trainer import Trainer, build_trainer  # noqa: E402

REGULARIZERS = ("none", "local", "anchor", "anchor_main")
flags.DEFINE_integer("steps", 10, "timed steps per row (and per phase)", lower_bound=1)
flags.DEFINE_integer("warmup_steps", 3, "untimed steps first (compiled rows compile here)", lower_bound=1)
flags.DEFINE_integer("num_images", 5000, "synthetic uint8 images on the device", lower_bound=1)
flags.DEFINE_list("regularizers", list(REGULARIZERS), "rows: none, local, anchor, anchor_main")
flags.DEFINE_list("precisions", [], "rows: fp32, bf16 (default: both on CUDA; fp32 on a CPU, whose bf16 "
                  "convolutions are emulated and many times slower)")
flags.DEFINE_list("rows", [], "explicit rows REGULARIZER:PRECISION[+compile][+inline][+cond], instead of the "
                  "product above")
flags.DEFINE_float("peak_tflops", 0.0, "the device's peak TFLOP/s for the '% peak' column (0: no column)", lower_bound=0)
flags.DEFINE_bool("sync_check", False, "CUDA: count host syncs per step (torch.cuda.set_sync_debug_mode)")
flags.DEFINE_string("out", "", "also append the table to this file")
FLAGS = flags.FLAGS


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def times_ms(fn, device, n):
    """ms of each of n calls of fn, each synchronised."""
    times = []
    for _ in range(n):
        sync(device)
        tic = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - tic) * 1e3)
    return times


def parse_rows(device: torch.device) -> list[tuple[str, str, set]]:
    """(regularizer, precision, options) of every row; options: "compile", "inline", "cond"."""
    if not FLAGS.rows:
        compiled = ({"compile"},) if FLAGS.compile else ()
        precisions = FLAGS.precisions or (["fp32", "bf16"] if device.type == "cuda" else ["fp32"])
        return [(r, p, o) for r in FLAGS.regularizers for p in precisions
                for o in [set(), *compiled, *([{"inline"}] if r == "none" else [])]]
    rows = []
    for spec in FLAGS.rows:
        name, _, setting = spec.partition(":")
        precision, *options = setting.split("+")
        if name not in REGULARIZERS or precision not in ("fp32", "bf16") or not set(options) <= {"compile", "inline",
                                                                                                 "cond"}:
            raise app.UsageError(f"--rows entry {spec!r}: write REGULARIZER:PRECISION[+compile][+inline][+cond] with "
                                 f"REGULARIZER one of {', '.join(REGULARIZERS)} and PRECISION fp32 or bf16.")
        rows.append((name, precision, set(options)))
    return rows


def build(name: str, precision: str, options: set, images: torch.Tensor, world: World, base: TrainConfig) -> Trainer:
    """The row's Trainer, built as training builds it from `base` with this row's fast-path settings."""
    execution = dataclasses.replace(base.execution, precision=precision, compile="compile" in options,
                                    ot_pipeline="inline" not in options)
    optim, flow = base.optim, base.flow
    unet_config = nets.unet_arguments(base.unet)
    matcher = make_matcher(flow.model, flow.sigma, flow.ot_pairing)
    labels = torch.arange(len(images)) % 10
    # +cond: as --condition=class trains (the labels with the images, 10 labels and the null one).
    condition = Conditioning("class", 10, 0.1) if "cond" in options else None
    if condition is not None:
        unet_config = {**unet_config, "num_classes": condition.num_classes}
    if name == "none":
        ids = labels.to(images.device) if condition is not None else None
        batches = cifar10.ShuffledBatches(images, optim.batch_size, optim.seed, ids=ids)
        return build_trainer(optim, execution, unet_config, world, matcher, batches, condition=condition)
    batches = ClassConditionedSampler(images, labels, optim.batch_size, num_subclasses=1, seed=optim.seed)
    if name == "local":
        regularizer = LocalRegularizer(1.0, flow.sigma)
    else:
        regularizer = AnchorRegularizer(1.0, flow.sigma, "full", images, batches.assignment, batches.num_clusters,
                                        pairing="main" if name == "anchor_main" else "published")
    return build_trainer(optim, execution, unet_config, world, matcher, batches, regularizer, condition=condition)


def step_flops(trainer: Trainer) -> float:
    """FLOPs of the net's forward and backward over one step's rows (eager, counted once)."""
    inputs = trainer.draw(0)
    with FlopCounterMode(display=False) as counter:
        trainer.net(inputs.t, inputs.x, inputs.y).sum().backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure(trainer: Trainer, device: torch.device, steps) -> dict:
    """Step times (and host syncs per step with --sync_check), then the phase times."""

    def step():  # as the training loop runs it
        trainer.step(next(steps))
        trainer.prefetch()

    for _ in range(FLAGS.warmup_steps):
        step()
    syncs = None
    if FLAGS.sync_check and device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            step_ms = times_ms(step, device, FLAGS.steps)
            torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchronizing" in str(w.message) for w in caught) / FLAGS.steps
    else:
        step_ms = times_ms(step, device, FLAGS.steps)
    phases = {"draw": [], "fwd": [], "bwd+update": []}
    for _ in range(FLAGS.steps):
        sync(device)
        tic = time.perf_counter()
        inputs = trainer.draw(next(steps))
        sync(device)
        drawn = time.perf_counter()
        _, loss, _ = trainer.losses(inputs)
        sync(device)
        forward = time.perf_counter()
        trainer.update(loss)
        sync(device)
        updated = time.perf_counter()
        trainer.prefetch()
        sync(device)
        phases["draw"].append((drawn - tic + time.perf_counter() - updated) * 1e3)
        phases["fwd"].append((forward - drawn) * 1e3)
        phases["bwd+update"].append((updated - forward) * 1e3)
    return {"step": step_ms, **{k: statistics.median(v) for k, v in phases.items()}, "syncs": syncs}


def main(argv):
    del argv
    base = training_flags.train_config()  # the flags of this command, as data
    device = resolve_device(FLAGS.device)
    rows = parse_rows(device)
    world = World(rank=0, size=1, device=device)
    torch.manual_seed(FLAGS.seed)
    images = torch.randint(0, 256, (FLAGS.num_images, 3, 32, 32), dtype=torch.uint8, device=device)
    steps = iter(range(1, 10**9))  # step 0 refreshes the anchor centroids: only the warm-up sees it
    lines = []
    flops = {}
    for name, precision, options in rows:
        trainer = build(name, precision, options, images, world, base)
        if name not in flops:
            flops[name] = step_flops(trainer)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        result = measure(trainer, device, steps)
        median = statistics.median(result["step"])
        tflops = flops[name] / median / 1e9  # FLOP per ms / 1e9 = TFLOP/s
        label = " ".join([name, precision, *sorted(options), *(["channels_last"] if FLAGS.channels_last else [])])
        cells = [label, f"{1e3 / median:.2f}", f"{median:.1f} ({min(result['step']):.1f}-{max(result['step']):.1f})",
                 f"{result['draw']:.1f}", f"{result['fwd']:.1f}", f"{result['bwd+update']:.1f}",
                 f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}" if device.type == "cuda" else "-",
                 f"{tflops:.3g}", f"{100 * tflops / FLAGS.peak_tflops:.1f}" if FLAGS.peak_tflops else "-",
                 f"{result['syncs']:.1f}" if result["syncs"] is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
        del trainer
    params = sum(p.numel() for p in UNetModel(**nets.unet_arguments(base.unet)).parameters())
    header = [
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {run_files.provenance(device)['device']} "
        f"({device}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads",
        f"model={FLAGS.model} ot_pairing={FLAGS.ot_pairing} batch={FLAGS.batch_size} num_channel={FLAGS.num_channel} "
        f"params={params:,} compile_mode={FLAGS.compile_mode} steps={FLAGS.steps} warmup_steps={FLAGS.warmup_steps}",
        "",
        "| row | it/s | step ms (min-max) | draw ms | fwd ms | bwd+update ms | peak MiB | TFLOP/s | % peak | syncs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    table = "\n".join(header + lines) + "\n"
    print("\n" + table)
    if FLAGS.out:
        with open(FLAGS.out, "a") as f:
            f.write(table)


if __name__ == "__main__":
    app.run(main)
