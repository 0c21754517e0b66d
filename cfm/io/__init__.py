"""The bottom layer: files (CIFAR-10, checkpoints, run files, atomic writes), errors, distributed primitives."""
