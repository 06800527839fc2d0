"""One sweep trial, start to end (run_trial): the trial's defaults, a result taken from earlier
work where the same config was measured (sweep.resume, sweep.reuse_from: summ/jobs.py; the Optuna
study: reused_from_study), the config checked and the job run, a failure turned into the penalty,
the trial's record in the study, and the objective.

A trial never exits the process: the sweep goes on to its next cell whatever this one did.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from summ.distributed import is_main_process
from summ.errors import UserError
from summ.jobs import final_result, measured_before, record_refusal
from summ.pipeline import run_job
from summ.run_folder import RunMetrics
from summ.sweeps.objective import objective_value, penalty_value
from summ.sweeps.study import finished_trial_for, record_trial
from summ.training import checkpoint
from summ.validation import validate

log = logging.getLogger(__name__)


def run_trial(
    cfg: DictConfig, hydra_cfg: Any, output_dir: Path, overrides: Sequence[str]
) -> tuple[RunMetrics | None, float | tuple]:
    """(metrics or None, objective) of one multirun job in `output_dir`."""
    cfg = own_checkpoint_only(apply_trial_defaults(cfg, overrides), output_dir)
    try:
        metrics = measured_before(cfg, output_dir, lambda cfg_hash: reused_from_study(hydra_cfg, cfg_hash))
        if metrics is None:
            validate(cfg)  # the config as the trial runs it, once per job (run_job leaves it to its caller)
            # tracker run name, and the sweep that groups it (one experiment / group per sweep folder)
            names = (hydra_cfg.job.override_dirname or output_dir.name, Path(hydra_cfg.sweep.dir).name)
            metrics = run_job(cfg, output_dir, tracking_names=names, reuse_loaded=cfg.sweep.reuse_loaded)
    except UserError as exc:  # the cell's folder says why it has no figures; the sweep goes on
        log.error("job failed: %s", exc)
        record_refusal(output_dir, exc)
        return None, penalty_value(OmegaConf.to_object(cfg))
    if is_main_process():
        record_trial(hydra_cfg, overrides, metrics, output_dir)
    return metrics, objective_value(metrics, OmegaConf.to_object(cfg))


def _overridden(task_overrides: Sequence[str], key: str) -> bool:
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in task_overrides)


def own_checkpoint_only(cfg: DictConfig, output_dir: Path) -> DictConfig:
    """train.resume_from in a resumed sweep (the launch checked it): a cell continues from a
    checkpoint in its own folder (`latest`, or the path when it lies there), else starts afresh."""
    resume_from = cfg.train.resume_from
    if not resume_from:
        return cfg
    own = (
        checkpoint.latest(output_dir) is not None
        if resume_from == "latest"
        else Path(resume_from).expanduser().resolve().is_relative_to(output_dir.resolve())
    )
    if not own:
        cfg = cfg.copy()
        cfg.train.resume_from = None
    return cfg


def apply_trial_defaults(cfg: DictConfig, task_overrides: Sequence[str]) -> DictConfig:
    """A multirun job is a measurement trial: `sweep.trial_samples` measured samples after
    `sweep.trial_warmup_samples` when no window is set (unless trial_samples is null: full
    training), collectives that time out after `sweep.trial_collective_timeout_s` unless
    measure.collective_timeout_s says otherwise, and no evaluation unless `sweep.evaluate` or an
    explicit `eval.enabled=...` on the command line asks for it; weights saved only on request."""
    cfg = cfg.copy()
    with open_dict(cfg):
        if cfg.measure.steps is None and cfg.measure.samples is None and cfg.sweep.trial_samples is not None:
            cfg.measure.samples = cfg.sweep.trial_samples
            if cfg.measure.warmup_samples is None:
                cfg.measure.warmup_samples = cfg.sweep.trial_warmup_samples
        if cfg.measure.collective_timeout_s is None:
            cfg.measure.collective_timeout_s = cfg.sweep.trial_collective_timeout_s
        if not cfg.sweep.evaluate and not _overridden(task_overrides, "eval.enabled"):
            cfg.eval.enabled = False
        if not _overridden(task_overrides, "train.save_model"):  # trials measure; their weights are not kept
            cfg.train.save_model = False
    return cfg


def reused_from_study(hydra_cfg: Any, cfg_hash: str) -> tuple[Path, RunMetrics] | None:
    """(job folder, metrics) of an earlier COMPLETE trial of this job's Optuna study that measured
    the same config, so a study never measures one configuration twice; None outside an Optuna
    sweep with storage, or when no such trial left a readable result."""
    found = finished_trial_for(hydra_cfg, cfg_hash)
    if found is None:
        return None
    number, job_dir = found
    m = final_result(Path(job_dir), cfg_hash)
    if m is None:
        return None
    log.info(
        "trial %s of study %s measured this config already (%s, %s); its result is taken, not measured again",
        number,
        hydra_cfg.sweeper.study_name,
        job_dir,
        m.status,
    )
    return Path(job_dir), replace(m, reused_trial=number)
