"""The task function behind run.py: one composed config in, the sweeper's objective out.

Runs the job, prints its summary table, and turns user errors into one line: exit code 2 for a
single run, a penalised trial (with the line logged) inside a multirun so the sweep goes on.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from summ.errors import UserError
from summ.summary import format_summary

log = logging.getLogger("summ")


def run(cfg: DictConfig) -> float | tuple[float, float]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from summ.study import record_trial
    from summ.sweep import apply_trial_defaults, reusable_metrics
    from summ.train import config_hash, objective_value, penalty_value, train

    hc = HydraConfig.get()
    output_dir, multirun, overrides = Path(hc.runtime.output_dir), hc.mode == RunMode.MULTIRUN, list(hc.overrides.task)
    if multirun:
        cfg = apply_trial_defaults(cfg, overrides)
    if cfg.sweep.resume:
        prior = reusable_metrics(output_dir, config_hash(cfg))
        if prior is not None:
            log.info("resume: %s already holds a complete %s result for this config; not measured again",
                     output_dir, prior["status"])
            print(format_summary(prior, output_dir))
            return objective_value(prior, OmegaConf.to_object(cfg))
    try:
        metrics = train(cfg, output_dir)
    except UserError as exc:
        if multirun:
            log.error("job failed: %s", exc)
            return penalty_value(OmegaConf.to_object(cfg))
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if multirun:
        record_trial(hc, overrides, {**metrics, "job_dir": str(output_dir)})
    print(format_summary(metrics, output_dir))
    return objective_value(metrics, OmegaConf.to_object(cfg))
