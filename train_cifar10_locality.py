"""Flow matching with the locality regularizer on single-cluster batches.

    python train_cifar10_locality.py --model=otcfm --batch_size=128 --total_steps=400001 \
        --save_step=20000 --lambda_local=1.0 --lambda_name=1e0 --num_subclasses=25 --visualize=True

loss = loss_fm + lambda_local * mean (v(u_t, t) - v(s_t, t) + s - u)^2, with u the batch (one
K-means cluster) and s a permutation of it (see regularizers.LocalRegularizer).
Writes {output_dir}/{model}_local_{lambda_name}/{model}_cifar10_local_{lambda_name}_weights_step_{step}.pt.
"""

from absl import app, flags

from cfm.method.regularizers import LocalRegularizer
from cfm.training import loop

flags.DEFINE_float("lambda_local", 1.0, "weight of the local loss")
flags.DEFINE_string("lambda_name", "1e0", "lambda as written in run and file names, e.g. 1e0, 1e-1")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    spec = loop.RunSpec(
        run_dir=f"{FLAGS.model}_local_{FLAGS.lambda_name}",
        file_prefix=f"{FLAGS.model}_cifar10_local_{FLAGS.lambda_name}",
        make_batches=lambda data: loop.cluster_sampler(FLAGS, data),
        make_regularizer=lambda batches: LocalRegularizer(weight=FLAGS.lambda_local, sigma=FLAGS.sigma),
    )
    loop.run(FLAGS, spec)


if __name__ == "__main__":
    app.run(main)
