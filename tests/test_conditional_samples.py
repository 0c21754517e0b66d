"""A class-conditioned run learns its labels: on the fake CIFAR-10 (conftest: each class its own
brightness), a short --condition=class run samples images whose nearest training image, by the
exact search of compute_generalization.py (`FlipNeighbours`), carries the label the sample was
asked for far more often than chance, and no more often than chance once the label is taken away.
"""

import torch
from scipy.stats import binom

from cfm.config import (
    ClusterConfig,
    ConditionConfig,
    ExecutionConfig,
    FlowConfig,
    MonitorConfig,
    OptimConfig,
    PathsConfig,
    RunConfig,
    TrainConfig,
    UNetConfig,
)
from cfm.evaluation.generalization import FlipNeighbours
from cfm.evaluation.sampling import generate_samples
from cfm.io import checkpoint_io
from cfm.method import nets
from cfm.method.guidance import Guidance, balanced_labels

STEPS = 300
NUM_SAMPLES = 100
NUM_CLASSES = 10
# Chance: a net that ignores its label makes samples that depend on their noise alone, so whether
# sample i's neighbour has label l is independent of the label requested for it. With balanced
# requests (each label for 10 of the 100 samples) the matches are then independent Bernoulli draws
# whose probabilities q(requested label) sum to 100 x 1/10 = 10, whatever the distribution q of the
# neighbours' labels; above that mean their count's tail is at most Binomial(100, 1/10)'s (Hoeffding
# 1956). 30 matches or more then happen with probability binom.sf(29, 100, 0.1) = 2.4e-8: reaching
# THRESHOLD is not luck. The trained net below matches 68 of 100 (the seeds make it the same each run).
THRESHOLD = 0.30
# Width 32 at 32x32 is conftest's tiny UNet; a third level (128 channels at 8x8) costs little more
# and matters here: GroupNorm's 32 groups of one channel each (at width 32) remove the per-channel
# offset a ResBlock adds from the time and label embedding, so the labels reach the net mainly
# through the wider levels, where a group holds several channels.
UNET = UNetConfig(num_channel=32, num_res_blocks=1, channel_mult=(1, 2, 4), num_head_channels=16, dropout=0.0)


def test_chance_bound():
    assert binom.sf(THRESHOLD * NUM_SAMPLES - 1, NUM_SAMPLES, 1 / NUM_CLASSES) < 1e-7


def test_samples_carry_the_requested_label(fake_cifar, tmp_path, one_thread):
    from cfm.training import recipes

    data_dir, images, labels = fake_cifar
    # Batch 4 and lr 2e-3 learn the most in STEPS on 2 shared cores (about a minute); the raw weights
    # still swing from step to step at this rate (this run's final weights match 10 of 100, its EMA
    # 68), so the samples come from the EMA, of a decay that averages over about the last 50 steps.
    recipes.train(TrainConfig(
        flow=FlowConfig(model="icfm"), paths=PathsConfig(output_dir=str(tmp_path), data_dir=str(data_dir)), unet=UNET,
        optim=OptimConfig(total_steps=STEPS, warmup=10, batch_size=4, lr=2e-3, ema_decay=0.98, seed=0),
        execution=ExecutionConfig(precision="fp32"),
        run=RunConfig(save_step=STEPS - 1, log_step=STEPS, grid_size=1, grid_steps=1, wandb_mode="disabled",
                      device="cpu"),
        cluster=ClusterConfig(visualize=False, group_dir=str(tmp_path / "group")),
        recipe=MonitorConfig(monitor_local=False), condition=ConditionConfig(condition="class")))
    ckpt = checkpoint_io.load_checkpoint(next(tmp_path.glob(f"*/*_step_{STEPS - 1}.pt")))
    net = nets.build_net_from_checkpoint(ckpt)  # the EMA weights
    search = FlipNeighbours(torch.from_numpy(images))
    requested = balanced_labels(NUM_SAMPLES, NUM_CLASSES)

    def matched(scale: float) -> float:
        """The fraction of samples, under guidance scale `scale`, whose nearest training image has
        the requested label. Five Euler steps: a class is a brightness level, which they reach."""
        samples, _ = generate_samples(net, NUM_SAMPLES, NUM_SAMPLES, "euler", 5, seed=0,
                                      guidance=Guidance(requested, scale))
        nearest = search.search(samples).index[:, 0]
        return (torch.from_numpy(labels)[nearest] == requested).double().mean().item()

    conditional = matched(1.0)
    assert conditional >= THRESHOLD, f"{conditional:.2f} of the samples have the requested label's neighbour"
    # The same net and noise under the null label (w = 0): the label, not the image distribution,
    # made the matches.
    unconditional = matched(0.0)
    assert unconditional < THRESHOLD, f"{unconditional:.2f} match without the label"
