"""Data-parallel training under torchrun, one or many nodes: the published DDP command.

    torchrun --standalone --nnodes=1 --nproc_per_node=NUM_GPUS train_cifar10_ddp.py --model=otcfm \
        --lr=2e-4 --ema_decay=0.9999 --batch_size=128 --total_steps=400001 --save_step=20000 \
        --parallel=True --master_addr=MASTER_ADDR --master_port=MASTER_PORT

It trains what train_cifar10.py trains, with the same loop (which runs under torchrun as it is):
every rank draws the global batch (--batch_size) from streams shared by all ranks and trains on its
own batch_size / world_size rows, so the result does not depend on the number of processes; rank 0
writes files and logs. --master_addr/--master_port only fill MASTER_ADDR/MASTER_PORT when the
launcher did not set them.
"""

import os

from absl import app, logging

import train_cifar10  # noqa: F401 -- defines --monitor_local, as the plain script it trains like
from cfm.cli import training_flags
from cfm.cli.flag_defs import define
from cfm.config import LaunchConfig, MonitorConfig
from cfm.training import recipes

define(LaunchConfig, "parallel", "data-parallel training (the world comes from torchrun)")
define(LaunchConfig, "master_addr", "rendezvous address when torchrun sets none")
define(LaunchConfig, "master_port", "rendezvous port when torchrun sets none")


def main(argv):
    del argv
    config = training_flags.train_config(MonitorConfig, launch=True)
    os.environ.setdefault("MASTER_ADDR", config.launch.master_addr)
    os.environ.setdefault("MASTER_PORT", config.launch.master_port)
    if config.launch.parallel and "WORLD_SIZE" not in os.environ:
        logging.warning("not launched by torchrun: training in one process (see the command in this file).")
    recipes.run(config)


if __name__ == "__main__":
    app.run(main)
