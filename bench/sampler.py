"""Cost of the K-means sub-cluster sampler on data of CIFAR-10's shape: data hashing (the cache
key), per-class K-means (the published MiniBatchKMeans and exact Lloyd), and the time of one
single-cluster batch.

    python bench/sampler.py --num_images=50000 --num_subclasses=25 --batch_size=128 --device=cpu

The synthetic images are smooth random fields (4x4 noise upsampled to 32x32, plus pixel noise),
closer to natural images than i.i.d. pixels, which K-means splits in a handful of iterations.
"""

import os
import statistics
import sys
import time

import torch
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cfm.method.clustering import CLUSTER_ALGORITHMS, cluster_assignments, data_digest  # noqa: E402
from cfm.method.samplers import ClassConditionedSampler  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_images", 50000, "Synthetic images (10 classes of num_images / 10).")
flags.DEFINE_integer("num_subclasses", 25, "K-means clusters per class.")
flags.DEFINE_integer("batch_size", 128, "Images per batch.")
flags.DEFINE_string("device", "cpu", "Device holding the data and building the batches.")
flags.DEFINE_integer("num_batches", 2000, "Timed batches (after 100 warm-up batches).")
flags.DEFINE_enum("data", "smooth", ["smooth", "noise"], "Synthetic image kind.")
flags.DEFINE_integer("seed", 0, "Data, clustering and sampling seed.")
flags.DEFINE_list("cluster_algorithms", list(CLUSTER_ALGORITHMS), "Clustering algorithms to time (minibatch, lloyd).")


def synthetic_cifar(num_images: int, kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N,3,32,32] and labels [N] (i % 10), built in chunks to bound memory."""
    g = torch.Generator().manual_seed(seed)
    chunks = []
    for start in range(0, num_images, 5000):
        n = min(5000, num_images - start)
        if kind == "noise":
            chunks.append(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g))
            continue
        low = torch.rand(n, 3, 4, 4, generator=g) * 255
        field = torch.nn.functional.interpolate(low, size=32, mode="bilinear", align_corners=False)
        chunks.append((field + 20 * torch.randn(field.shape, generator=g)).clamp(0, 255).to(torch.uint8))
    return torch.cat(chunks), torch.arange(num_images) % 10


def main(argv):
    del argv
    device = torch.device(FLAGS.device)
    images, labels = synthetic_cifar(FLAGS.num_images, FLAGS.data, FLAGS.seed)
    images, labels = images.to(device), labels.to(device)
    print(f"data: {tuple(images.shape)} uint8 ({FLAGS.data}) on {device}; cpu_count={os.cpu_count()}, "
          f"torch threads={torch.get_num_threads()}")

    start = time.perf_counter()
    digest = data_digest(images, labels)
    print(f"hashing (sha256 of {images.numel() / 1e6:.0f} MB, incl. copy to host): "
          f"{time.perf_counter() - start:.3f} s  [{digest}]")

    for algorithm in FLAGS.cluster_algorithms:
        start = time.perf_counter()
        assignment = cluster_assignments(images, labels, FLAGS.num_subclasses, FLAGS.seed, algorithm=algorithm)
        print(f"clustering, {algorithm} (10 classes x K={FLAGS.num_subclasses}): {time.perf_counter() - start:.2f} s")
    sizes = torch.bincount(assignment, minlength=10 * FLAGS.num_subclasses).float()
    print(f"cluster sizes: min {sizes.min():.0f}, median {sizes.median():.0f}, max {sizes.max():.0f}")

    sampler = ClassConditionedSampler(
        images, labels, FLAGS.batch_size, FLAGS.num_subclasses, seed=FLAGS.seed, assignment=assignment
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(100):
        sampler.next_batch()
    sync()
    times = []
    for _ in range(FLAGS.num_batches):
        start = time.perf_counter()
        sampler.next_batch()
        sync()  # per-batch latency, kernels included
        times.append(time.perf_counter() - start)
    ms = sorted(1e3 * t for t in times)
    print(f"single-cluster batch of {FLAGS.batch_size}: median {statistics.median(ms):.3f} ms, "
          f"p90 {ms[int(0.9 * len(ms))]:.3f} ms, mean {statistics.fmean(ms):.3f} ms over {len(ms)} batches")
    # Without the per-batch sync: the host-side cost a training step pays (kernels queue behind).
    start = time.perf_counter()
    for _ in range(FLAGS.num_batches):
        sampler.next_batch()
    sync()
    print(f"pipelined: {1e3 * (time.perf_counter() - start) / FLAGS.num_batches:.3f} ms per batch")


if __name__ == "__main__":
    app.run(main)
