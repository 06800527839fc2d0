"""Sweeps: one trial's protocol, the objective, Optuna studies, the knee search and Hydra's callbacks."""
