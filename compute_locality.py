"""Checkpoint -> local and anchor losses on held-out single-cluster batches (see locality.py).

    python compute_locality.py --model=otcfm --step=400000
    python compute_locality.py --checkpoint=results/otcfm_local_1e0/otcfm_cifar10_local_1e0_weights_step_400000.pt
    python compute_locality.py --pretrained=otcfm --split=train --num_batches=20

Clusters the --split of CIFAR-10 per class as training clusters the train set (--num_subclasses,
--cluster_algorithm, --cluster_seed; cached the same way), draws --num_batches single-cluster
batches with their noise and times from --seed, and reports for the EMA (or raw) net `local_loss`,
`anchor_loss_full`, `anchor_loss_simple` and `loss_fm` (on the checkpoint's own path: its stored
--model and --sigma, else --model), each as mean and standard error over batches. The same seed,
split and clustering give every checkpoint the same batches, noise and times, so runs compare on
the same numbers. One record per evaluation is appended to `locality.jsonl` beside the checkpoint.
The checkpoint flags are cfm/cli/checkpoint_flags.py's, shared with compute_fid.py and compute_generalization.py.

A label-conditioned checkpoint is evaluated with the labels its training gave these rows where the
split has them: a class-conditioned net gets each batch's class (the split is clustered per class, so
a batch is of one class; the regularizers of a conditioned run evaluate their rows with their images'
labels, dropped to the null label 10% of the time). A cluster-conditioned net gets the null label
(its unconditional field): the split's K-means clusters are not the clusters it was trained on, and a
test image has none of those. Its record adds `condition` and `net_label` ("class" or "null").
"""

from __future__ import annotations

import sys
import time

from absl import app, flags

from cfm.cli import checkpoint_flags
from cfm.cli.flag_defs import define
from cfm.config import ClusterConfig
from cfm.evaluation import checkpoints, locality, results
from cfm.io import checkpoint_io, cifar10, distributed, errors, run_files
from cfm.method.clustering import kmeans_cache_dir

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(checkpoint_flags)  # listed by --helpshort with this script's own

flags.DEFINE_enum("split", "test", ["test", "train"], "CIFAR-10 split to cluster and score on (test: held out).")
flags.DEFINE_integer("num_batches", 100, "Single-cluster batches to average over.", lower_bound=1)
flags.DEFINE_integer("batch_size", 128, "Images per batch (a smaller cluster repeats images, as in training).",
                     lower_bound=1)
# The clustering of training (ClusterConfig's defaults, bounds and choices), with help of its own.
define(ClusterConfig, "num_subclasses", "K-means sub-clusters per class, as training's.")
define(ClusterConfig, "cluster_algorithm", "Per-class clustering, as training's.")
define(ClusterConfig, "cluster_seed", "K-means random_state, as training's.")
flags.DEFINE_integer("seed", 0, "Seed of the batches, noise and times: the same seed gives every checkpoint the same "
                     "numbers to be scored on.", lower_bound=0)
flags.DEFINE_bool("quiet", False, "No progress bar.")

RESULTS_FILE = "locality.jsonl"


def summary(record: dict) -> str:
    """One line: every term as mean ± standard error, and the setting."""
    terms = ", ".join(f"{name} {results.format_mean_error(record[name], record[f'{name}_se'])}"
                      for name in locality.TERMS)
    return (f"{terms} ({record['split']} split, num_batches {record['num_batches']}, "
            f"batch_size {record['batch_size']}, seed {record['seed']}, {record['seconds']:.0f} s)")


def evaluate() -> None:
    """Score the checkpoint and append its record; user errors (flags, checkpoint, weights, results
    folder, data, device) raise UserError, all before the clustering and the batches."""
    spec = checkpoint_flags.checkpoint_spec()
    checkpoints.check_spec(spec)
    device = distributed.resolve_device(FLAGS.device)
    path, ckpt, net = checkpoints.load(spec, device, progress=not FLAGS.quiet)
    matcher = checkpoints.checkpoint_path_matcher(spec, ckpt)
    results_path = checkpoints.results_file(path, RESULTS_FILE)
    images, labels = cifar10.load_cifar10(FLAGS.data_dir, train=FLAGS.split == "train")
    start = time.perf_counter()
    batches = locality.HeldOutBatches(images, labels, FLAGS.batch_size, FLAGS.num_subclasses, FLAGS.seed, matcher,
                                      cluster_seed=FLAGS.cluster_seed, algorithm=FLAGS.cluster_algorithm,
                                      cache_dir=kmeans_cache_dir(FLAGS.data_dir))
    # A class-conditioned net with each batch's class (as its training labelled those rows); a
    # cluster-conditioned one with the null label: the split's clusters are not its training clusters.
    condition = checkpoint_io.stored_condition(ckpt)
    net_label = "class" if condition == "class" else "null"
    labels = {} if condition is None else {"condition": condition, "net_label": net_label}
    values = locality.evaluate(net, batches, FLAGS.num_batches, device, progress=not FLAGS.quiet,
                               class_labels=condition == "class")
    record = {
        **checkpoints.record_head(spec, path, ckpt, matcher),  # model, sigma: the path loss_fm was scored on
        **labels,
        "split": FLAGS.split,
        "num_batches": FLAGS.num_batches,
        "batch_size": FLAGS.batch_size,
        "num_subclasses": FLAGS.num_subclasses,
        "cluster_algorithm": FLAGS.cluster_algorithm,
        "cluster_seed": FLAGS.cluster_seed,
        "seed": FLAGS.seed,
    }
    for name in locality.TERMS:
        record[name], record[f"{name}_se"] = locality.mean_and_error(values[name])
    record.update(seconds=round(time.perf_counter() - start, 2), provenance=run_files.provenance(device))
    run_files.append_jsonl(results_path, record)
    print(f"{summary(record)}; appended to {results_path}")


def main(argv):
    del argv
    try:
        evaluate()
    except errors.UserError as err:
        sys.exit(f"compute_locality.py: {err}")


if __name__ == "__main__":
    app.run(main)
