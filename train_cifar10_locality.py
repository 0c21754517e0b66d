"""Flow matching with the locality regularizer on single-cluster batches.

    python train_cifar10_locality.py --model=otcfm --batch_size=128 --total_steps=400001 \
        --save_step=20000 --lambda_local=1.0 --lambda_name=1e0 --num_subclasses=25 --visualize=True

loss = loss_fm + lambda_local * mean (v(u_t, t) - v(s_t, t) + s - u)^2, with u the batch (one
K-means cluster) and s a permutation of it (see regularizers.LocalRegularizer).
Writes {output_dir}/{model}_local_{lambda_name}/{model}_cifar10_local_{lambda_name}_weights_step_{step}.pt.
"""

from absl import app

from cfm.cli import training_flags
from cfm.cli.flag_defs import LAMBDA_NAME_HELP, define
from cfm.config import LocalConfig
from cfm.training import recipes

define(LocalConfig, "lambda_local", "weight of the local loss")
define(LocalConfig, "lambda_name", LAMBDA_NAME_HELP)


def main(argv):
    del argv
    recipes.run(training_flags.train_config(LocalConfig))


if __name__ == "__main__":
    app.run(main)
