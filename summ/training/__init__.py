"""Training: one run (data prepared, the loop, evaluation), its outcome, K-fold, checkpoints, trackers."""
