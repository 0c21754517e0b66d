"""The published ``samplers.ClassConditionedSampler`` (the locality fork): the published import surface.

Where the names live in ``cfm``:

    ClassConditionedSampler      this file: a thin layer over a dataset that yields (image, label)
      clusters                   cfm.method.clustering.cluster_assignments, with the training
                                 scripts' algorithm and seed (minibatch K-means, random_state=42),
                                 so the same images give the training scripts' clusters
      sample_batch_from_class    the dataset's own items stacked (its transforms applied)
      iteration                  sample_batch_from_class() forever
    dataset_images               the uint8 images the clustering sees (also used by
                                 utils_cifar.visualize_clusters)

The library's sampler (cfm.method.samplers.ClassConditionedSampler) is the training loop's batch
source: device-resident uint8 images, its own seeded generator, checkpointable. This one keeps the
published interface instead: any dataset, torch's global RNG, ``(batch, class_id)`` tuples.
"""

import numpy as np
import torch

from cfm.io.cifar10 import to_uint8
from cfm.config.choices import PUBLISHED_CLUSTER_ALGORITHM
from cfm.method.clustering import KMEANS_MAX_ITER, NUM_CLASSES, cluster_assignments


def dataset_images(dataset):
    """The images the clustering sees, uint8 [N, C, H, W], and the labels int64 [N].

    A torchvision CIFAR10 (``.data`` uint8 [N, H, W, C] and ``.targets``) gives exactly its stored
    pixels, untransformed: the training scripts' images. (A ``.data`` of another rank, e.g. MNIST's
    [N, H, W], is read item by item like any dataset.) Any other dataset is read item by item and
    its image tensors are mapped back to 0..255: uint8 as they are; float with a negative value
    anywhere in the dataset read as [-1, 1] (``(x + 1) * 127.5``, rounded), else as [0, 1]
    (``x * 255``, rounded). A random transform is applied as it draws.
    """
    if hasattr(dataset, "data") and hasattr(dataset, "targets") and np.ndim(dataset.data) == 4:
        images = torch.as_tensor(np.asarray(dataset.data)).permute(0, 3, 1, 2).contiguous()
        return images, torch.as_tensor(np.asarray(dataset.targets), dtype=torch.int64)
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([image for image, _ in items])
    labels = torch.as_tensor([int(label) for _, label in items], dtype=torch.int64)
    if images.is_floating_point():
        # to_uint8 is (x * 127.5 + 128) truncated: round((x + 1) * 127.5) for x in [-1, 1].
        images = to_uint8(images) if images.min() < 0 else to_uint8(images * 2 - 1)
    return images.to(torch.uint8), labels


class ClassConditionedSampler:
    """Batches from one K-means sub-cluster of one class each (published interface).

    Args:
        dataset: yields (image tensor [C, H, W], int label in 0..num_classes-1).
        batch_size: B, images per batch.
        num_classes: classes of the dataset; the clustering is CIFAR-10's, so only 10.
        num_subclasses: K-means clusters per class (1: the cluster is the class).
        kmeans_max_iter: only the published 100 (the clustering's fixed ``KMEANS_MAX_ITER``).
        random_state: the K-means seed (42, as the training scripts).
        verbose: print the number of clusters and their sizes.

    Attributes:
        class_to_indices: cluster id (``class * num_subclasses + sub``) -> list of dataset indices,
            for every non-empty cluster.
        num_classes: ``num_original_classes * num_subclasses``, the range of cluster ids.
        num_original_classes, num_subclasses: as given.
        assignment: int64 [N] the cluster id of every dataset index.
    """

    def __init__(self, dataset, batch_size, num_classes=10, num_subclasses=1, kmeans_max_iter=100,
                 random_state=42, verbose=True):
        if num_classes != NUM_CLASSES:
            raise ValueError(f"num_classes={num_classes} is not supported: the clustering is CIFAR-10's, "
                             f"so pass num_classes={NUM_CLASSES}.")
        if kmeans_max_iter != KMEANS_MAX_ITER:
            raise ValueError(f"kmeans_max_iter={kmeans_max_iter} is not supported: the clustering runs the "
                             f"training scripts' {KMEANS_MAX_ITER} iterations, so pass {KMEANS_MAX_ITER}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_original_classes = num_classes
        self.num_subclasses = num_subclasses
        self.num_classes = num_classes * num_subclasses
        images, labels = dataset_images(dataset)
        self.assignment = cluster_assignments(images, labels, num_subclasses, random_state,
                                              algorithm=PUBLISHED_CLUSTER_ALGORITHM)
        order = torch.argsort(self.assignment, stable=True)
        ids, sizes = torch.unique_consecutive(self.assignment[order], return_counts=True)
        self.class_to_indices = {int(c): part.tolist() for c, part in zip(ids, order.split(sizes.tolist()))}
        self._clusters = sorted(self.class_to_indices)
        if verbose:
            print(f"ClassConditionedSampler: {len(self._clusters)} non-empty clusters of {self.num_classes} "
                  f"({num_classes} classes x {num_subclasses}), sizes {sizes.tolist()}")

    def sample_batch_from_class(self, class_id=None):
        """(batch [B, C, H, W] of the dataset's items from cluster class_id, class_id).

        class_id None: uniform among the non-empty clusters. The B members are distinct when the
        cluster has at least B, otherwise drawn with replacement. Draws on torch's global RNG.
        """
        if class_id is None:
            class_id = self._clusters[int(torch.randint(len(self._clusters), ()))]
        members = self.class_to_indices.get(class_id)
        if not members:
            raise ValueError(f"cluster {class_id} is empty or out of range: pick one of class_to_indices.")
        if len(members) >= self.batch_size:
            picks = torch.randperm(len(members))[: self.batch_size]
        else:
            picks = torch.randint(len(members), (self.batch_size,))
        return torch.stack([self.dataset[members[i]][0] for i in picks.tolist()]), class_id

    def __iter__(self):
        """(batch, class_id) of a random cluster, forever."""
        while True:
            yield self.sample_batch_from_class()
