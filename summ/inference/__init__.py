"""Inference: evaluation and generation, predict, ROUGE, TTA, ensembles, generation backends and the
Solar API."""
