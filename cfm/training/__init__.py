"""Training: the one loop every training script runs, and what keeps a run safe (lock, signals, checks)."""
