"""Training-step throughput of the real loop, with a per-phase breakdown.

    python bench/train_step.py --num_channel=32 --device=cpu            # CPU check (tiny UNet)
    python bench/train_step.py --device=cuda --batch_size=128            # paper UNet on a GPU

Prints ms per step of `training.Trainer.step` (what training runs), of a bare
forward+backward+Adam step on a fixed batch (the floor), their ratio (target <= 1.10), and a
breakdown: data, matcher (incl. OT), forward+backward, optimizer (clip + Adam + schedule), EMA.
With --regularizers=none,local,anchor,anchor_main it also times the locality and anchor steps
(single-cluster batches, one cluster per class here; anchor = the published pairing, two extra
rows per sample; anchor_main = --anchor_pairing=main, one extra row) and their ratio to the plain
step (the extra rows alone would give 3x, 3x and 2x).
On CUDA it also prints achieved TFLOP/s (FLOPs counted by torch's FlopCounterMode; the paper
UNet is 12.44 GFLOP per 32x32 forward, a training step ~3x that).
"""

import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import training  # noqa: E402  (defines the model/optimisation flags used below)
import utils_cifar  # noqa: E402
from distributed import World  # noqa: E402
from flow_matching import make_matcher  # noqa: E402
from regularizers import AnchorRegularizer, LocalRegularizer  # noqa: E402
from samplers import ClassConditionedSampler  # noqa: E402

flags.DEFINE_integer("steps", 20, "timed steps per measurement")
flags.DEFINE_integer("warmup_steps", 3, "untimed steps first")
flags.DEFINE_integer("num_images", 5000, "synthetic uint8 images on the device")
flags.DEFINE_list("regularizers", ["none"], "steps to time: none, local, anchor, anchor_main")
FLAGS = flags.FLAGS


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, n):
    """Median ms of n calls of fn (each synchronised)."""
    times = []
    for _ in range(n):
        sync(device)
        tic = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - tic) * 1e3)
    return statistics.median(times)


def main(argv):
    del argv
    device = utils_cifar.resolve_device(FLAGS.device)
    torch.manual_seed(FLAGS.seed)
    images = torch.randint(0, 256, (FLAGS.num_images, 3, 32, 32), dtype=torch.uint8, device=device)
    config = training.unet_config_from_flags(FLAGS)
    world = World(rank=0, size=1, device=device)
    batches = utils_cifar.ShuffledBatches(images, FLAGS.batch_size, FLAGS.seed)
    matcher = make_matcher(FLAGS.model, FLAGS.sigma, FLAGS.ot_pairing)
    # Built as training builds it (same optimizer flavour, EMA, schedule).
    trainer = training.build_trainer(FLAGS, config, world, matcher, batches)
    net, ema, optimizer, scheduler = trainer.net, trainer.ema, trainer.optimizer, trainer.scheduler
    params = sum(p.numel() for p in net.parameters())
    print(f"device={device} model={FLAGS.model} batch={FLAGS.batch_size} num_channel={FLAGS.num_channel} "
          f"params={params:,} threads={torch.get_num_threads()}")

    step = iter(range(10**9))
    for _ in range(FLAGS.warmup_steps):
        trainer.step(next(step))
    loop_ms = timed(lambda: trainer.step(next(step)), device, FLAGS.steps)
    regularized_ms = {}
    labels = torch.arange(FLAGS.num_images) % 10
    for name in FLAGS.regularizers:
        if name == "none":
            continue
        clustered = ClassConditionedSampler(images, labels, FLAGS.batch_size, num_subclasses=1, seed=FLAGS.seed)
        regularizer = {
            "local": lambda: LocalRegularizer(1.0, FLAGS.sigma),
            "anchor": lambda: AnchorRegularizer(1.0, FLAGS.sigma, "full", images, clustered.assignment,
                                                clustered.num_clusters, pairing="published"),
            "anchor_main": lambda: AnchorRegularizer(1.0, FLAGS.sigma, "full", images, clustered.assignment,
                                                     clustered.num_clusters, pairing="main"),
        }[name]()
        regularized = training.build_trainer(FLAGS, config, world, matcher, clustered, regularizer)
        for _ in range(FLAGS.warmup_steps):
            regularized.step(next(step))
        regularized_ms[name] = timed(lambda: regularized.step(next(step)), device, FLAGS.steps)

    x1, _ = batches.next_batch()
    sample = matcher.sample(torch.randn_like(x1), x1)

    def bare():
        optimizer.zero_grad(set_to_none=True)
        F.mse_loss(net(sample.t, sample.xt), sample.ut).backward()
        optimizer.step()

    for _ in range(FLAGS.warmup_steps):
        bare()
    bare_ms = timed(bare, device, FLAGS.steps)

    def forward_backward():
        optimizer.zero_grad(set_to_none=True)
        F.mse_loss(net(sample.t, sample.xt), sample.ut).backward()

    def optimizer_phase():
        torch.nn.utils.clip_grad_norm_(net.parameters(), FLAGS.grad_clip)
        optimizer.step()
        scheduler.step()

    phases = {
        "data": lambda: batches.next_batch(),
        "matcher": lambda: matcher.sample(torch.randn_like(x1), x1),
        "forward+backward": forward_backward,
        "optimizer": optimizer_phase,
        "ema": lambda: utils_cifar.ema_update(trainer.ema_params, trainer.params, FLAGS.ema_decay),
    }
    breakdown = {name: timed(fn, device, FLAGS.steps) for name, fn in phases.items()}

    print(f"loop step      {loop_ms:9.2f} ms  ({1e3 / loop_ms:.2f} steps/s)")
    print(f"bare fwd+bwd+Adam {bare_ms:6.2f} ms")
    print(f"loop / bare    {loop_ms / bare_ms:9.3f}  (target <= 1.10)")
    for name, ms in breakdown.items():
        print(f"  {name:16s} {ms:8.2f} ms")
    print(f"  {'sum of phases':16s} {sum(breakdown.values()):8.2f} ms")
    rows = {"local": 3, "anchor": 3, "anchor_main": 2}  # forward rows per sample, main term included
    for name, ms in regularized_ms.items():
        print(f"{name:11s} step {ms:9.2f} ms  = {ms / loop_ms:.2f}x plain ({rows[name]}x the rows)")

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(sample.t[:1], sample.xt[:1])
    forward_gflop = counter.get_total_flops() / 1e9
    print(f"forward FLOPs  {forward_gflop:9.3f} GFLOP per image (paper UNet: 12.44)")
    if device.type == "cuda":
        tflops = 3 * forward_gflop * FLAGS.batch_size / loop_ms  # GFLOP/ms == TFLOP/s
        print(f"achieved       {tflops:9.1f} TFLOP/s (training = 3x forward FLOPs)")


if __name__ == "__main__":
    app.run(main)
