"""Flow matching with the anchor regularizer against K-means cluster centroids.

    python train_cifar10_anchor.py --model=otcfm --batch_size=128 --total_steps=400001 \
        --save_step=20000 --lambda_anchor=1.0 --lambda_name=1e0 --centroid_update_freq=1000 \
        --anchor_loss_type=full --num_subclasses=25 --visualize=True

loss = loss_fm + lambda_anchor * anchor loss, e = the centroid of the batch's cluster:
    full:   mean (v(x_t, t) - v(e_t, t) + e - x1)^2      simple: mean (v(x_t, t) - v(e_t, t))^2
(see regularizers.AnchorRegularizer). Writes
{output_dir}/{model}_anchor_{anchor_loss_type}/{model}_cifar10_anchor_{lambda_name}_weights_step_{step}.pt.
"""

import sys

from absl import app, flags

from cfm.method.regularizers import ANCHOR_LOSS_TYPES, ANCHOR_PAIRINGS, STRAIGHT_LINE_MODELS, AnchorRegularizer
from cfm.training import loop

flags.DEFINE_float("lambda_anchor", 1.0, "weight of the anchor loss")
flags.DEFINE_string("lambda_name", "1e0", "lambda as written in run and file names, e.g. 1e0, 1e-1")
flags.DEFINE_integer("centroid_update_freq", 1000, "recompute the cluster centroids every this many steps",
                     lower_bound=1)
flags.DEFINE_integer("centroid_samples", 500, "members averaged per centroid (0 = all)", lower_bound=0)
flags.DEFINE_enum("anchor_loss_type", "full", list(ANCHOR_LOSS_TYPES), "anchor loss: full or simple")
flags.DEFINE_enum("anchor_pairing", "published", list(ANCHOR_PAIRINGS),
                  "published: x_t from the batch and noise as drawn (two extra rows per sample); main: the main "
                  "term's re-paired x_t and prediction (one extra row; icfm/otcfm only)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if FLAGS.anchor_pairing == "main" and FLAGS.model not in STRAIGHT_LINE_MODELS:
        sys.exit(f"error: --anchor_pairing=main reuses the main term's straight-line x_t, which --model={FLAGS.model} "
                 f"does not train on: use --anchor_pairing=published or --model=icfm/otcfm.")
    spec = loop.RunSpec(
        run_dir=f"{FLAGS.model}_anchor_{FLAGS.anchor_loss_type}",
        file_prefix=f"{FLAGS.model}_cifar10_anchor_{FLAGS.lambda_name}",
        make_batches=lambda data: loop.cluster_sampler(FLAGS, data),
        make_regularizer=lambda batches: AnchorRegularizer(
            weight=FLAGS.lambda_anchor, sigma=FLAGS.sigma, loss_type=FLAGS.anchor_loss_type,
            images=batches.images, assignment=batches.assignment, num_clusters=batches.num_clusters,
            update_freq=FLAGS.centroid_update_freq, centroid_samples=FLAGS.centroid_samples,
            pairing=FLAGS.anchor_pairing, seed=FLAGS.seed,
        ),
    )
    loop.run(FLAGS, spec)


if __name__ == "__main__":
    app.run(main)
