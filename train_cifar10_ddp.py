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

from absl import app, flags, logging

import train_cifar10

flags.DEFINE_bool("parallel", True, "data-parallel training (the world comes from torchrun)")
flags.DEFINE_string("master_addr", "localhost", "rendezvous address when torchrun sets none")
flags.DEFINE_string("master_port", "12355", "rendezvous port when torchrun sets none")
FLAGS = flags.FLAGS


def main(argv):
    os.environ.setdefault("MASTER_ADDR", FLAGS.master_addr)
    os.environ.setdefault("MASTER_PORT", FLAGS.master_port)
    if FLAGS.parallel and "WORLD_SIZE" not in os.environ:
        logging.warning("not launched by torchrun: training in one process (see the command in this file).")
    train_cifar10.main(argv)


if __name__ == "__main__":
    app.run(main)
