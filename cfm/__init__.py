"""CIFAR-10 flow matching: the library behind the entry scripts at the repository root.

Four layers; imports point one way, from the top down (tests/test_layout.py checks it):

    training/    the one training loop: Trainer and its step, run orchestration and resume,
                 checkpoint writer and logger, run lock, up-front checks, fast path, OT pipeline
    evaluation/  ODE solvers and sampling, FID, held-out locality, generalization and the
                 memorizing field, results tables, published weights, the evaluation scripts' flags
    method/      flow matchers and OT, regularizers, K-means clusters and single-cluster batches,
                 the UNet, building a net from a checkpoint
    io/          CIFAR-10 files and batches, checkpoint files, run files, atomic writes, errors,
                 distributed primitives

A new regularizer goes in method/regularizers.py, a new solver in evaluation/solvers.py, a new
metric in evaluation/. Importing a package runs no code of its own.
"""
