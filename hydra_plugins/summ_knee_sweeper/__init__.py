"""Adaptive knee sweeper for summ: hydra/sweeper=knee (or preset=knee_search)."""
