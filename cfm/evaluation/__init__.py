"""Evaluation: sampling, FID, held-out locality, generalization, memorizing field, results, published weights."""
