"""Class- and cluster-conditioned training (--condition) with classifier-free-guidance dropout
(--cond_drop_prob): which label each training row gets, and the checks and records around it.

A conditional net ``v(t, x, y)`` (UNetModel(num_classes=K): a label embedding of K + 1 rows, the
last the null label ``y = K``) learns the conditional field ``v(t, x | y)`` and, through the
labels dropped to the null label, the unconditional one ``v(t, x | null)``: one net for both, as
classifier-free guidance needs (Ho & Salimans 2022; for flows, Zheng et al. 2023, Guided Flows).

Labels travel with their images. The batch source yields each image's id with the image (a
cluster sampler: its K-means cluster ``class * num_subclasses + sub``; shuffled batches: the ids
they were given), and every row of the step's forward is evaluated at some image of the batch as
drawn: a main row at ``x1[sample.index]`` (otcfm re-pairs noise and data and draws the pairs with
replacement), a regularizer's extra row at ``x1[rows]`` (`Regularizer.extra_inputs`). So

    labels  = label(ids)                                 [B], the batch as drawn
    y       = labels[index] ++ labels[rows]              [B + E], main rows then extra rows
    coins   = U(0, 1) < cond_drop_prob                   [B], from the step's shared generator,
                                                         drawn after the pairing and the regularizer
    y[r]    = K (null)  where coins[r % B]               a regularizer's row r is compared with row
                                                         r % B of the other chunk: both drop together

and each rank keeps its rows of y as of t and x (`distributed.own_rows`). The coins come from the
stream every rank shares and the checkpoint keeps: a run is world-size invariant and resumes exactly.
An unconditional run (--condition=none) draws nothing more and builds the same net: bit for bit the
run it was before conditioning existed.

Labels: class, the CIFAR-10 class (10 labels); cluster, the K-means cluster (10 * num_subclasses
labels), the clustering of the cluster sampler for the locality and anchor recipes, and for the
plain recipe's shuffled batches the same cached clustering (--num_subclasses, --cluster_seed,
--cluster_algorithm), stored with the batch stream so a resumed run keeps its labels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from cfm.config import TrainConfig
from cfm.config.settings import value_or_default
from cfm.io import checkpoint_io, cifar10, errors
from cfm.io.distributed import main_first
from cfm.method.clustering import NUM_CLASSES, cluster_assignments, kmeans_cache_dir
from cfm.method.samplers import ClassConditionedSampler


@dataclass(frozen=True)
class Conditioning:
    """A conditional run's labels: `condition` ("class" or "cluster"), `num_classes` K (the null
    label is K), `drop_prob`, the probability that a training label becomes the null label, and
    `label_counts`, the training images of each label (``[K]``; see `counted`)."""

    condition: str
    num_classes: int
    drop_prob: float
    label_counts: tuple[int, ...] | None = None

    def counted(self, source) -> Conditioning:
        """This conditioning with the label of every training image of the batch source counted
        (a cluster sampler's clusters, or the ids shuffled batches were given): the label mix that
        evaluation samples in (`guidance.balanced_labels`), recorded in each checkpoint."""
        ids = source.assignment if isinstance(source, ClassConditionedSampler) else source.ids
        counts = torch.bincount(self.labels(ids.cpu(), source), minlength=self.num_classes)
        return dataclasses.replace(self, label_counts=tuple(counts.tolist()))

    def labels(self, ids: Tensor, source) -> Tensor:
        """Labels ``[B]`` of the ids ``[B]`` a batch source yields: a cluster sampler's cluster ids
        (class: ``id // num_subclasses``), or the labels shuffled batches were given (as they are)."""
        if self.condition == "class" and isinstance(source, ClassConditionedSampler):
            return ids.div(source.num_subclasses, rounding_mode="floor")
        return ids

    def drop(self, labels: Tensor, batch: int, generator: torch.Generator) -> Tensor:
        """``labels`` ``[k B]`` (chunks of B rows) with row r set to the null label K where coin
        ``r % B`` fell below `drop_prob`; B coins are drawn from ``generator`` (on the labels' device)."""
        coins = torch.rand(batch, device=labels.device, generator=generator) < self.drop_prob
        return labels.masked_fill(coins.repeat(labels.shape[0] // batch), self.num_classes)

    def record(self) -> dict:
        """What a checkpoint stores as ckpt["condition"]."""
        record = {"condition": self.condition, "num_classes": self.num_classes, "cond_drop_prob": self.drop_prob}
        return record if self.label_counts is None else {**record, "label_counts": list(self.label_counts)}


def conditioning(config: TrainConfig, ckpt: dict | None) -> Conditioning | None:
    """The run's `Conditioning` (None: unconditional). A resumed checkpoint must have been trained
    with the same --condition (and, for cluster, as many clusters): else a `UserError`."""
    condition, cluster = config.condition.condition, config.cluster
    stored = checkpoint_io.stored_condition(ckpt) or "none"  # as the flag spells it
    if ckpt is not None and stored != condition:
        raise errors.UserError(
            f"the checkpoint was trained with --condition={stored} and this run asks for "
            f"--condition={condition}: resume with --condition={stored}, or start a fresh run.")
    if condition == "none":
        return None
    num_classes = NUM_CLASSES * (value_or_default(cluster, "num_subclasses") if condition == "cluster" else 1)
    if ckpt is not None:
        stored = ckpt["condition"]["num_classes"]
        if cluster.num_subclasses is not None and condition == "cluster" and stored != num_classes:
            raise errors.UserError(
                f"--num_subclasses={cluster.num_subclasses} contradicts the checkpoint's {stored} cluster labels: "
                f"drop the flag to resume on the same clusters.")
        num_classes = stored
    return Conditioning(condition, num_classes, value_or_default(config.condition, "cond_drop_prob"))


def conditioned_unet(unet_config: dict, condition: Conditioning | None) -> dict:
    """`UNetModel`'s construction arguments with the run's labels (`num_classes`); unchanged for an
    unconditional run, so its net and checkpoints are those of before."""
    return unet_config if condition is None else {**unet_config, "num_classes": condition.num_classes}


def shuffled_batches(config: TrainConfig, data) -> cifar10.ShuffledBatches:
    """The plain recipe's shuffled batches yielding each image's label (`data`: loop.DataContext):
    its class, or its cluster in the clustering the cluster flags describe (cached under --data_dir,
    as the cluster sampler's; a resumed run takes the labels stored with its stream, which
    `conditioning` has checked against the checkpoint's)."""
    stored = (data.stored or {}).get("ids")
    if stored is not None:
        ids = stored
    elif config.condition.condition == "class":
        ids = data.labels
    else:
        cluster = config.cluster
        with main_first(data.world, "the K-means clustering"):
            ids = cluster_assignments(data.images, data.labels, value_or_default(cluster, "num_subclasses"),
                                      cluster.cluster_seed, kmeans_cache_dir(data.data_dir), cluster.cluster_algorithm)
    return cifar10.ShuffledBatches(data.images, data.batch_size, data.seed, ids=ids.to(data.images.device))
