"""Flow matching on CIFAR-10 (FM, I-CFM, OT-CFM, SI): the published FID-3.5 recipe.

    python train_cifar10.py --model=otcfm --lr=2e-4 --ema_decay=0.9999 --batch_size=128 \
        --total_steps=400001 --save_step=20000 --num_subclasses=25 --visualize=True

Training batches are shuffled across classes. On log steps the local loss of one same-cluster
batch is computed under no_grad and logged as `local_loss` (monitoring only: it never trains);
--monitor_local=False skips it, and with it the K-means clustering it needs.
Writes {output_dir}/{model}/{model}_cifar10_weights_step_{step}.pt, sample grids and
{model}_cifar10_metrics.jsonl.
Every other flag is shared with the other training scripts and defined in cfm/cli/training_flags.py;
the flags become a TrainConfig (cfm/config/), which the library trains (cfm/training/recipes.py).
"""

from absl import app, flags

from cfm.cli import training_flags
from cfm.cli.flag_defs import define
from cfm.config import MonitorConfig
from cfm.training import recipes

define(MonitorConfig, "monitor_local", "log the local loss of a same-cluster batch on log steps (needs the "
       "K-means clusters; False skips the clustering)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    recipes.run(training_flags.train_config(MonitorConfig))


if __name__ == "__main__":
    app.run(main)
