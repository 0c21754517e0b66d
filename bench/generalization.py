"""Time of compute_generalization.py's default evaluation on synthetic data of CIFAR-10's shape.

    python bench/generalization.py --device=cuda                     # the defaults: 10k queries vs 50k (+ mirrors)
    python bench/generalization.py --device=cpu --num_queries=256 --num_train=5000 --loss_images=32 \
        --batch_size=16 --num_times=2 --num_channel=32                # a CPU check, under a minute

Two of the script's three parts, on random uint8 images and a random paper UNet (--num_channel wide):
    search     --num_queries queries against --num_train training images and their mirrors
               (generalization.FlipNeighbours, float64, in query batches of --batch_size_fid and
               blocks of --search_chunk); the script runs it twice (samples, then test images).
               TFLOP/s counts the float64 products 2 x 2 x Q x N x 3072 (both orientations).
               The first --check queries are searched on the CPU too: the result must be equal
               (the search is exact, so it does not depend on the device).
    loss gap   loss_fm of the otcfm path on --loss_images training and test images at --num_times
               times, batches of --batch_size (generalization.loss_gap), fp32.
The third, sampling --num_gen images, is bench/sample.py's images/s (dopri5 at batch 1024).
One Markdown table to stdout and, with --out, appended to that file.
"""

import os
import sys
import time

import torch
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cfm.evaluation import generalization  # noqa: E402
from cfm.io import distributed, run_files  # noqa: E402
from cfm.method.flow_matching import make_matcher  # noqa: E402
from cfm.method.unet import PAPER_CONFIG, UNetModel  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("device", "auto", "auto (cuda if available), cpu, cuda, ...")
flags.DEFINE_integer("num_queries", 10000, "Images searched (the script's --num_gen, and again --num_test).",
                     lower_bound=1)
flags.DEFINE_integer("num_train", 50000, "Training images searched against (and their mirrors).", lower_bound=2)
flags.DEFINE_integer("batch_size_fid", 1024, "Queries per search batch.", lower_bound=1)
flags.DEFINE_integer("search_chunk", 10000, "Training images per distance block.", lower_bound=1)
flags.DEFINE_integer("check", 256, "Queries also searched on the CPU, to compare (0 = none).", lower_bound=0)
flags.DEFINE_integer("loss_images", 10000, "Training and test images of the loss gap.", lower_bound=1)
flags.DEFINE_integer("batch_size", 128, "Images per loss batch.", lower_bound=1)
flags.DEFINE_integer("num_times", 10, "Times of the loss gap.", lower_bound=1)
flags.DEFINE_integer("num_channel", 128, "Base width of the paper UNet.", lower_bound=1)
flags.DEFINE_string("out", "", "Also append the table to this file.")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work):
    """(work(), seconds), synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    out = work()
    sync(device)
    return out, time.perf_counter() - start


def main(argv):
    del argv
    device = distributed.resolve_device(FLAGS.device)
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (FLAGS.num_train, 3, 32, 32), dtype=torch.uint8, generator=g)
    queries = torch.randint(0, 256, (FLAGS.num_queries, 3, 32, 32), dtype=torch.uint8, generator=g)
    rows = [f"device: {run_files.provenance(device)['device']} ({device}), torch {torch.__version__}", "",
            "| part | size | seconds | rate | note |", "|---|---|---:|---:|---|"]

    search, setup = timed(device, lambda: generalization.FlipNeighbours(train, device, FLAGS.search_chunk))
    search.search(queries[:8])  # warm-up: kernels, allocator
    found, seconds = timed(device, lambda: search.search_across_ranks(queries, FLAGS.batch_size_fid))
    tflops = 2 * 2 * FLAGS.num_queries * FLAGS.num_train * 3072 / seconds / 1e12
    note = f"set-up {setup:.2f} s"
    if FLAGS.check:
        on_cpu = generalization.FlipNeighbours(train).search(queries[:FLAGS.check])
        equal = all(torch.equal(getattr(on_cpu, name), getattr(found, name)[:FLAGS.check])
                    for name in ("distance", "index", "flipped"))
        note += f"; first {FLAGS.check} equal to the CPU's: {equal}"
    rows.append(f"| search (float64) | {FLAGS.num_queries} x {FLAGS.num_train} (+ mirrors), blocks of "
                f"{FLAGS.search_chunk} | {seconds:.2f} | {FLAGS.num_queries / seconds:.0f} queries/s, "
                f"{tflops:.2f} TFLOP/s | {note} |")

    torch.manual_seed(0)
    net = UNetModel(**dict(PAPER_CONFIG, num_channels=FLAGS.num_channel))
    torch.nn.init.normal_(net.out[-1].weight, std=0.02)  # it starts at zero: v = 0 would be a trivial net
    net = net.to(device).eval().requires_grad_(False)
    test = torch.randint(0, 256, (FLAGS.loss_images, 3, 32, 32), dtype=torch.uint8, generator=g)
    images = generalization.loss_gap_images(train, test, FLAGS.loss_images, seed=0)
    times = generalization.loss_times(FLAGS.num_times)
    generalization.loss_gap(net, make_matcher("otcfm"), *(x[:FLAGS.batch_size] for x in images), times[:1],
                            FLAGS.batch_size, 0, device=device)  # warm-up
    gap, seconds = timed(device, lambda: generalization.loss_gap(net, make_matcher("otcfm"), *images, times,
                                                                 FLAGS.batch_size, 0, device=device))
    forwards = 2 * gap.train.numel() * FLAGS.batch_size
    rows.append(f"| loss gap (otcfm, fp32) | {gap.train.shape[0] * FLAGS.batch_size} x 2 splits x {FLAGS.num_times} "
                f"times, batch {FLAGS.batch_size} | {seconds:.2f} | {forwards / seconds:.0f} images/s | UNet width "
                f"{FLAGS.num_channel}, OT on the CPU |")
    table = "\n".join(rows) + "\n"
    print(table, end="")
    if FLAGS.out:
        with open(FLAGS.out, "a") as f:
            f.write(table)


if __name__ == "__main__":
    app.run(main)
