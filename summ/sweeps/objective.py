"""What a sweeper optimises: one figure of a job's metrics, or a penalty where it gave none."""

from __future__ import annotations

import math

from summ.config import Config, Objective
from summ.errors import Status
from summ.run_folder import RunMetrics


def objective_value(metrics: RunMetrics, cfg: Config) -> float | tuple[float, float]:
    """Single objectives are minimised; the configured penalty (finite, worse than any feasible
    value) stands in where the job gave no figure (oom, over_budget, diverged, failed), so Optuna's
    samplers learn to avoid that region instead of crashing. `seconds_per_sample_and_rouge`
    returns (seconds per sample to minimise, ROUGE mean to maximise), with (penalty, 0.0) for a
    job without both figures."""
    train, ev = metrics.train, metrics.eval or {}

    def figure(value) -> float | None:
        return float(value) if metrics.ok and value is not None and math.isfinite(value) else None

    if cfg.objective == Objective["seconds_per_sample_and_rouge"]:
        s, r = figure(train and train.seconds_per_sample), figure(ev.get("rouge_mean"))
        return (s, r) if s is not None and r is not None else (float(cfg.objective_penalty), 0.0)
    value = {
        "train_seconds_per_sample": train and train.seconds_per_sample,
        "train_seconds_per_token": train and train.seconds_per_token,
        "eval_loss": ev.get("loss"),
        "neg_rouge_mean": -ev["rouge_mean"] if ev.get("rouge_mean") is not None else None,
    }[str(cfg.objective)]
    value = figure(value)
    return value if value is not None else float(cfg.objective_penalty)


def penalty_value(cfg: Config) -> float | tuple[float, float]:
    """The objective of a job that produced no figure."""
    return objective_value(RunMetrics(status=Status.failed), cfg)
