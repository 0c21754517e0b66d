"""Single-cluster batches: each CIFAR-10 class split into K-means sub-clusters, one cluster per batch.

The locality experiments need every batch to hold semantically close images. Each of the 10
classes is split into `num_subclasses` K-means clusters (clustering.py); cluster
`class * num_subclasses + sub` is the flattened id. Every batch is drawn from one cluster.

`ClassConditionedSampler` follows the batch-source protocol of the training loop (as
`cifar10.ShuffledBatches` does):

    next_batch() -> (x1 [B,3,32,32] float32 in [-1, 1], cluster id [B] int64)
    state_dict() / load_state_dict(state)   # tensors and python scalars only

Sampling rule, per batch:
  1. choose a cluster c: uniformly among non-empty clusters (`cluster_weighting="uniform"`, the
     published behaviour) or with probability |c| / N (`"size"`);
  2. take the next B entries of c's current pass, a random permutation of its members. A pass
     with fewer than B entries left is dropped and a fresh one drawn, so a batch never repeats an
     image when |c| >= B, and every member is equally likely to be used. A cluster smaller than the
     batch (|c| < B) gets a fresh pass for every batch: ceil(B / |c|) independent permutations
     concatenated and cut to B, so each member appears floor(B / |c|) or ceil(B / |c|) times;
  3. flip each image left-right with probability 1/2 (one coin per pass entry, drawn with the pass).

All randomness comes from one CPU `torch.Generator` seeded with `seed`, so the stream is the same
whatever device holds the data. Under torchrun every rank draws the same global batch (one
cluster) and trains on its own block of it (see `distributed.py`). The sampler keeps
the images and their mirror images as one uint8 table [2N,3,32,32] on the data device (300 MB for
CIFAR-10), so a flip is part of the index (i + N) and a batch is one `index_select` plus the
conversion to [-1, 1]: no per-image Python and no host sync (the generator only picks the cluster
id on the CPU). A pass is sent to the device when it is drawn, asynchronously.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor

from cfm.io.cifar10 import to_model_range
from cfm.method.clustering import CIFAR10_CLASSES, NUM_CLASSES, _check_data, check_assignment, cluster_assignments

# --------------------------------------------------------------------------------------------
# Cluster assignment
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------


class ClassConditionedSampler:
    """Batches of `batch_size` images from one K-means sub-cluster each (see the module docstring).

    Args:
        images: uint8 [N,3,32,32] on the training device (batches are built there).
        labels: int [N], classes 0..9 (any device).
        batch_size: B, images per batch (the global batch under torchrun).
        num_subclasses: K-means clusters per class (1: batches from one class).
        seed: the sampling seed (and the clustering seed unless `cluster_seed` is given).
        cluster_weighting: "uniform" over non-empty clusters (published) or "size" (prop. to size).
        cache_dir: where `cluster_assignments` caches the clustering (e.g. the data directory).
        assignment: a stored assignment [N] (e.g. from a checkpoint) used instead of clustering.
        cluster_seed: K-means `random_state` (default: `seed`).
        algorithm: "minibatch" (published) or "lloyd", see `cluster_assignments`.

    Attributes:
        images: the uint8 images as given (the sampler also keeps a flipped copy of them).
        num_clusters: 10 * num_subclasses, the range of cluster ids (some may be empty).
        assignment: int64 [N] cluster id of every image, on the CPU.
        cluster_sizes: int64 [num_clusters] members per cluster, on the CPU.
        generator: the CPU generator all sampling randomness comes from.
    """

    single_cluster = True  # a batch's ids are its one cluster's (trainer.BatchSource)

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        num_subclasses: int = 25,
        seed: int = 0,
        cluster_weighting: str = "uniform",
        cache_dir: str | os.PathLike | None = None,
        assignment: Tensor | None = None,
        cluster_seed: int | None = None,
        algorithm: str = "minibatch",
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if cluster_weighting not in ("uniform", "size"):
            raise ValueError(f"cluster_weighting must be 'uniform' or 'size', got {cluster_weighting!r}.")
        _check_data(images, labels, num_subclasses)
        if assignment is None:
            cluster_seed = seed if cluster_seed is None else cluster_seed
            assignment = cluster_assignments(images, labels, num_subclasses, cluster_seed, cache_dir, algorithm)
        else:
            assignment = check_assignment(assignment, labels, num_subclasses)
        if len(assignment) == 0:
            raise ValueError("the data set is empty: there is nothing to sample.")

        self.images = images
        # [2N,3,32,32]: rows N.. are the mirror images, so index i + N means "image i, flipped".
        self._table = torch.cat([images, images.flip(-1)])
        self.batch_size = batch_size
        self.num_subclasses = num_subclasses
        self.cluster_weighting = cluster_weighting
        self.num_clusters = NUM_CLASSES * num_subclasses
        self.assignment = assignment
        self.cluster_sizes = torch.bincount(assignment, minlength=self.num_clusters)
        # Members grouped by cluster, on the data device: cluster c is
        # _members[_offsets[c] : _offsets[c + 1]] (image indices in increasing order).
        self._members = torch.argsort(assignment, stable=True).to(images.device)
        self._num_images = len(images)
        self._offsets = [0] + torch.cumsum(self.cluster_sizes, 0).tolist()
        self._sizes = self.cluster_sizes.tolist()
        self._nonempty = torch.nonzero(self.cluster_sizes).squeeze(1)
        self._weights = (
            torch.ones(len(self._nonempty), dtype=torch.float64)
            if cluster_weighting == "uniform"
            else self.cluster_sizes[self._nonempty].to(torch.float64)
        )
        self.generator = torch.Generator().manual_seed(seed)
        # Current pass of each cluster (rows of _table, flips included, on the data device) and the
        # position of the next batch in it. An empty pass means "not drawn yet".
        self._passes = [torch.empty(0, dtype=torch.int64, device=images.device)] * self.num_clusters
        self._positions = [0] * self.num_clusters

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """x1 [B,3,32,32] float32 in [-1, 1] (flipped at random) and its cluster id [B] int64."""
        cluster = self._draw_cluster()
        start = self._positions[cluster]
        if start + self.batch_size > len(self._passes[cluster]):
            self._new_pass(cluster)
            start = 0
        stop = start + self.batch_size
        self._positions[cluster] = stop
        # index_select, not x[index]: the advanced-indexing path is ~20x slower on CPU here.
        x = self._table.index_select(0, self._passes[cluster][start:stop])
        ids = torch.full((self.batch_size,), cluster, dtype=torch.int64, device=x.device)
        return to_model_range(x), ids

    def _draw_cluster(self) -> int:
        # CPU tensors only: .item() here is not a device sync.
        return int(self._nonempty[torch.multinomial(self._weights, 1, generator=self.generator)])

    def _new_pass(self, cluster: int) -> None:
        """Draw cluster's next pass: a permutation of its members (ceil(B/n) of them if n < B),
        each entry flipped (+N) with probability 1/2."""
        size = self._sizes[cluster]
        copies = math.ceil(self.batch_size / size)  # > 1 only for clusters smaller than a batch
        # argsort of float64 uniforms = independent uniform permutations, one per row (ties have
        # probability ~n^2 / 2^53).
        order = torch.rand(copies, size, dtype=torch.float64, generator=self.generator).argsort(dim=1).flatten()
        flip = (torch.rand(len(order), generator=self.generator) < 0.5).to(torch.int64)
        # One host-to-device copy, non_blocking: from pageable memory it is staged at once, with no
        # wait on the queued GPU work (a blocking copy would synchronize the stream every new pass).
        order, flip = torch.stack([order + self._offsets[cluster], flip]).to(self._table.device, non_blocking=True)
        self._passes[cluster] = self._members[order] + self._num_images * flip
        self._positions[cluster] = 0

    def state_dict(self) -> dict:
        """Everything that fixes the rest of the stream: generator, passes, positions, assignment.

        Tensors (on the CPU) and python scalars only, so `torch.load(weights_only=True)` reads it.
        Copies the passes to the host: call it on save steps only. Under torchrun every rank holds
        the same state.
        """
        return {
            "version": 2,
            "generator": self.generator.get_state(),
            "assignment": self.assignment.clone(),
            "num_subclasses": self.num_subclasses,
            "batch_size": self.batch_size,
            "cluster_weighting": self.cluster_weighting,
            "pass_lengths": [len(p) for p in self._passes],
            "passes": torch.cat(self._passes).cpu(),  # rows of the image + mirror table
            "positions": list(self._positions),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` left off. The sampler must be built with the same
        assignment (`assignment=state["assignment"]`), batch size and weighting."""
        if state.get("version") != 2:
            raise ValueError(f"unknown sampler state version {state.get('version')!r}: expected 2.")
        for key in ("num_subclasses", "batch_size", "cluster_weighting"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this sampler has {getattr(self, key)!r}: "
                    f"build the sampler with the {key} of the run being resumed."
                )
        if not torch.equal(state["assignment"], self.assignment):
            raise ValueError(
                "sampler state was saved with another cluster assignment: build the sampler with "
                "assignment=state['assignment']."
            )
        lengths = list(state["pass_lengths"])
        if len(lengths) != self.num_clusters or len(state["positions"]) != self.num_clusters:
            raise ValueError(f"sampler state holds {len(lengths)} clusters, expected {self.num_clusters}.")
        self.generator.set_state(state["generator"])
        self._passes = list(torch.split(state["passes"].to(self._table.device), lengths))
        self._positions = [int(p) for p in state["positions"]]


# --------------------------------------------------------------------------------------------
# Visualization
# --------------------------------------------------------------------------------------------


def cluster_file_name(cluster: int, num_subclasses: int) -> str:
    """`class_{id:03d}_orig_{class}_sub_{sub:02d}.png`, or `class_{id:03d}.png` when K == 1."""
    if num_subclasses == 1:
        return f"class_{cluster:03d}.png"
    return f"class_{cluster:03d}_orig_{cluster // num_subclasses}_sub_{cluster % num_subclasses:02d}.png"


def save_cluster_grids(
    images: Tensor,
    labels: Tensor,
    assignment: Tensor,
    num_subclasses: int,
    out_dir: str | os.PathLike = "./group",
    max_per_cluster: int = 64,
    nrow: int = 8,
) -> None:
    """Write one PNG grid (`nrow` images per row) of the first `max_per_cluster` members of every non-empty
    cluster, and `README.txt` with the cluster count, each cluster's size and the class names.

    Pixels are written unchanged (uint8 / 255, which `save_image` maps back exactly).
    """
    # Imported here: only the visualization needs torchvision.
    from torchvision.utils import save_image

    assignment = check_assignment(assignment, labels, num_subclasses)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = torch.bincount(assignment, minlength=NUM_CLASSES * num_subclasses).tolist()
    order = torch.argsort(assignment, stable=True)
    lines = [
        f"{sum(s > 0 for s in sizes)} non-empty clusters of {len(sizes)} "
        f"({NUM_CLASSES} classes x {num_subclasses} K-means sub-clusters), {len(assignment)} images.",
        "classes: " + ", ".join(f"{i}={name}" for i, name in enumerate(CIFAR10_CLASSES)),
        "",
        "cluster\tclass\tclass_name\tsub\tsize\tfile",
    ]
    start = 0
    for cluster, size in enumerate(sizes):
        members, start = order[start : start + size], start + size
        cls, sub = divmod(cluster, num_subclasses)
        name = cluster_file_name(cluster, num_subclasses) if size else "-"
        lines.append(f"{cluster}\t{cls}\t{CIFAR10_CLASSES[cls]}\t{sub}\t{size}\t{name}")
        if size:
            grid = images[members[:max_per_cluster].to(images.device)].float().div(255)
            save_image(grid, out_dir / name, nrow=nrow)
    (out_dir / "README.txt").write_text("\n".join(lines) + "\n")
