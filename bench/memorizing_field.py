"""Time the memorizing field v* (memorizing_field.py) at the evaluation's default size, on synthetic data.

    python bench/memorizing_field.py --device=cuda                      # the default: 100k images (200k terms)
    python bench/memorizing_field.py --device=cpu --num_train=2000 --num_points=100 --num_times=2 \\
        --sampler_samples=16 --sampler_steps=5                          # CPU check

Synthetic uint8 images of CIFAR-10's shape stand in for the training and held-out sets (the cost is
two dense matmuls per chunk, whatever the pixels). Two rows:
    distance  v* at --num_points points of the held-out path at each of --num_times times (what
              `field_distance` computes besides the net; the net's own cost is that of sampling,
              see bench/sample.py), against a zero net
    sampler   the v*-driven sampler: --sampler_samples samples, --sampler_steps Euler steps
TFLOP/s counts the two matmuls only: 4 x 2N x D FLOPs per point and evaluation (D = 3072).
"""

import os
import sys
import time

import torch
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cfm.evaluation import memorizing_field  # noqa: E402
from cfm.evaluation.sampling import noise  # noqa: E402
from cfm.io import distributed, run_files  # noqa: E402
from cfm.method.flow_matching import make_matcher  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_train", 100_000, "Synthetic training images (twice as many terms with the mirrors).",
                     lower_bound=1)
flags.DEFINE_integer("num_points", 1000, "Points per time for the distance.", lower_bound=1)
flags.DEFINE_integer("num_times", 10, "Times from 0.05 to 0.95 for the distance.", lower_bound=1)
flags.DEFINE_integer("batch_size", 500, "Points per v* evaluation.", lower_bound=1)
flags.DEFINE_integer("chunk_size", 4096, "Training images per chunk.", lower_bound=1)
flags.DEFINE_integer("sampler_samples", 1000, "Samples of the v*-driven sampler (0: skip the row).", lower_bound=0)
flags.DEFINE_integer("sampler_steps", 100, "Euler steps of the v*-driven sampler.", lower_bound=1)
flags.DEFINE_enum("dtype", "float64", ["float64", "float32"], "Precision of v* (float32: TF32 off).")
flags.DEFINE_string("device", "auto", "auto (cuda if available), cpu, cuda, ...")
flags.DEFINE_string("out", "", "Also append the table to this file.")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv):
    del argv
    device = distributed.resolve_device(FLAGS.device)
    g = torch.Generator(device).manual_seed(0)
    train = torch.randint(0, 256, (FLAGS.num_train, 3, 32, 32), generator=g, device=device, dtype=torch.uint8)
    held_out = torch.randint(0, 256, (FLAGS.num_points, 3, 32, 32), generator=g, device=device, dtype=torch.uint8)
    field = memorizing_field.MemorizingField(train, make_matcher("icfm"), device=device, chunk_size=FLAGS.chunk_size,
                               dtype=getattr(torch, FLAGS.dtype))
    flops_per_point = 4 * 2 * FLAGS.num_train * 3 * 32 * 32
    times = [0.05 + 0.9 * k / max(1, FLAGS.num_times - 1) for k in range(FLAGS.num_times)]
    points = memorizing_field.path_points(field.matcher, held_out, times)
    field(0.5, points[0, :FLAGS.batch_size].to(device))  # warm-up: kernels, allocator
    lines = [f"v* over {FLAGS.num_train} images + mirrors on {run_files.provenance(device)['device']} ({device}), "
             f"{FLAGS.dtype}, chunks of {FLAGS.chunk_size}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} CPU threads",
             "", "| row | size | seconds | v* evaluations/s | TFLOP/s |", "|---|---|---|---|---|"]

    def row(name: str, size: str, evaluations: int, run) -> None:
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        seconds = time.perf_counter() - start
        lines.append(f"| {name} | {size} | {seconds:.2f} | {evaluations / seconds:.0f} | "
                     f"{flops_per_point * evaluations / seconds / 1e12:.3f} |")
        print(lines[-1], flush=True)

    print("\n".join(lines))
    zero_net = lambda t, x: torch.zeros_like(x)  # noqa: E731
    row("distance", f"{FLAGS.num_points} points x {FLAGS.num_times} times", FLAGS.num_points * FLAGS.num_times,
        lambda: memorizing_field.field_distance(zero_net, field, points, times, FLAGS.batch_size))
    if FLAGS.sampler_samples:
        x0 = noise(FLAGS.sampler_samples, (3, 32, 32)).to(device)
        row("sampler", f"{FLAGS.sampler_samples} samples x {FLAGS.sampler_steps} Euler steps",
            FLAGS.sampler_samples * FLAGS.sampler_steps,
            lambda: memorizing_field.memorizing_samples(field, x0, steps=FLAGS.sampler_steps))
    if FLAGS.out:
        with open(FLAGS.out, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
