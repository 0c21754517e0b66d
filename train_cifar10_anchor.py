"""Flow matching with the anchor regularizer against K-means cluster centroids.

    python train_cifar10_anchor.py --model=otcfm --batch_size=128 --total_steps=400001 \
        --save_step=20000 --lambda_anchor=1.0 --lambda_name=1e0 --centroid_update_freq=1000 \
        --anchor_loss_type=full --num_subclasses=25 --visualize=True

loss = loss_fm + lambda_anchor * anchor loss, e = the centroid of the batch's cluster:
    full:   mean (v(x_t, t) - v(e_t, t) + e - x1)^2      simple: mean (v(x_t, t) - v(e_t, t))^2
(see regularizers.AnchorRegularizer). Writes
{output_dir}/{model}_anchor_{anchor_loss_type}/{model}_cifar10_anchor_{lambda_name}_weights_step_{step}.pt.
"""

from absl import app

from cfm.cli import training_flags
from cfm.cli.flag_defs import LAMBDA_NAME_HELP, define
from cfm.config import AnchorConfig
from cfm.training import recipes

define(AnchorConfig, "lambda_anchor", "weight of the anchor loss")
define(AnchorConfig, "lambda_name", LAMBDA_NAME_HELP)
define(AnchorConfig, "centroid_update_freq", "recompute the cluster centroids every this many steps")
define(AnchorConfig, "centroid_samples", "members averaged per centroid (0 = all)")
define(AnchorConfig, "anchor_loss_type", "anchor loss: full or simple")
define(AnchorConfig, "anchor_pairing",
       "published: x_t from the batch and noise as drawn (two extra rows per sample); main: the main "
       "term's re-paired x_t and prediction (one extra row; icfm/otcfm only)")


def main(argv):
    del argv
    recipes.run(training_flags.train_config(AnchorConfig))


if __name__ == "__main__":
    app.run(main)
