"""The three recipes of the training scripts, picked by `TrainConfig.recipe`, and the calls that
train one: `train(config)` (a notebook: errors raise) and `run(config)` (the scripts: errors are one
sentence and an exit status).

    MonitorConfig  train_cifar10.py           loss_fm on shuffled batches; the local loss of a
                                              same-cluster batch logged on log steps (monitor_local)
    LocalConfig    train_cifar10_locality.py  + lambda_local * local loss, same-cluster batches
    AnchorConfig   train_cifar10_anchor.py    + lambda_anchor * anchor loss against cluster centroids

Run folders and file names are the published ones: {model}, {model}_local_{lambda_name},
{model}_anchor_{anchor_loss_type}, with prefixes {model}_cifar10[_local|_anchor_{lambda_name}].
"""

from __future__ import annotations

from cfm.config import AnchorConfig, LocalConfig, TrainConfig
from cfm.method.regularizers import AnchorRegularizer, LocalRegularizer
from cfm.training import conditioning, loop


def run_spec(config: TrainConfig) -> loop.RunSpec:
    """What `config.recipe` trains and where it writes (see the module docstring)."""
    model, sigma, recipe, cluster = config.flow.model, config.flow.sigma, config.recipe, config.cluster
    if isinstance(recipe, LocalConfig):
        return loop.RunSpec(
            run_dir=f"{model}_local_{recipe.lambda_name}",
            file_prefix=f"{model}_cifar10_local_{recipe.lambda_name}",
            make_batches=lambda data: loop.cluster_sampler(cluster, data),
            make_regularizer=lambda batches: LocalRegularizer(weight=recipe.lambda_local, sigma=sigma),
        )
    if isinstance(recipe, AnchorConfig):
        return loop.RunSpec(
            run_dir=f"{model}_anchor_{recipe.anchor_loss_type}",
            file_prefix=f"{model}_cifar10_anchor_{recipe.lambda_name}",
            make_batches=lambda data: loop.cluster_sampler(cluster, data),
            make_regularizer=lambda batches: AnchorRegularizer(
                weight=recipe.lambda_anchor, sigma=sigma, loss_type=recipe.anchor_loss_type,
                images=batches.images, assignment=batches.assignment, num_clusters=batches.num_clusters,
                update_freq=recipe.centroid_update_freq, centroid_samples=recipe.centroid_samples,
                pairing=recipe.anchor_pairing, seed=config.optim.seed,
            ),
        )

    def monitor(data):  # the published plain script logs the local loss, weight 0: it never trains
        return loop.cluster_sampler(cluster, data), LocalRegularizer(weight=0.0, sigma=sigma)

    def labelled(data):  # a conditioned plain run: shuffled batches that carry each image's label
        return conditioning.shuffled_batches(config, data)

    conditioned = config.condition.condition != "none"
    return loop.RunSpec(run_dir=model, file_prefix=f"{model}_cifar10", make_batches=labelled if conditioned else None,
                        make_monitor=monitor if recipe.monitor_local else None)


def train(config: TrainConfig) -> loop.Outcome:
    """Train `config`'s recipe; a user error raises `errors.UserError` (one sentence)."""
    return loop.train(config, run_spec(config))


def run(config: TrainConfig) -> None:
    """The scripts' entry: `train`, with user errors as one sentence and a non-zero exit (loop.run)."""
    loop.run(config, run_spec(config))
