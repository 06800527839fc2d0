"""Multirun jobs: measurement-trial defaults and resume from a complete metrics.json."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig, open_dict

from summ.train import METRICS_FILE

log = logging.getLogger(__name__)

# Outcomes that re-measuring would not change; "failed" (a crash, a bad cell) is retried.
FINAL_STATUSES = ("ok", "oom", "over_budget", "diverged")


def _overridden(task_overrides: Sequence[str], key: str) -> bool:
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in task_overrides)


def apply_trial_defaults(cfg: DictConfig, task_overrides: Sequence[str]) -> DictConfig:
    """A multirun job is a measurement trial: `sweep.trial_steps` measured steps when
    measure.steps is null (unless trial_steps is null too: full training), and no evaluation unless `sweep.evaluate` or an explicit
    `eval.enabled=...` on the command line asks for it; weights are saved only on request."""
    cfg = cfg.copy()
    with open_dict(cfg):
        if cfg.measure.steps is None and cfg.sweep.trial_steps is not None:
            cfg.measure.steps = cfg.sweep.trial_steps
        if not cfg.sweep.evaluate and not _overridden(task_overrides, "eval.enabled"):
            cfg.eval.enabled = False
        if not _overridden(task_overrides, "train.save_model"):  # trials measure; their weights are not kept
            cfg.train.save_model = False
    return cfg


def reusable_metrics(output_dir: Path, cfg_hash: str) -> Optional[dict]:
    """The job folder's metrics.json if it is complete, final and for the same config."""
    return _final_for(output_dir / METRICS_FILE, cfg_hash)


# What a job leaves in its folder besides Hydra's own files (.hydra/, the log).
RESULT_FILES = ("metrics.json", "train_history.jsonl", "dev_predictions.csv", "error.log", "data_quality.csv",
                "oof_predictions.csv", "oof_candidates.jsonl", "submission.csv")


def set_aside_earlier_result(output_dir: Path, cfg_hash: str) -> Optional[Path]:
    """A job folder that already holds a result this job will not reuse (another config under
    sweep.resume, a failed cell, a sweep run again into the same folder): its result files move to
    superseded_<its config hash>[_n]/ inside the folder, never overwritten. Returns that folder."""
    present = [output_dir / f for f in RESULT_FILES if (output_dir / f).exists()]
    if not present:
        return None
    try:
        old_hash = json.loads((output_dir / METRICS_FILE).read_text(encoding="utf-8")).get("config_hash") or "unknown"
    except (OSError, ValueError, AttributeError):
        old_hash = "unreadable"
    target, n = output_dir / f"superseded_{old_hash}", 1
    while target.exists():
        n += 1
        target = output_dir / f"superseded_{old_hash}_{n}"
    target.mkdir(parents=True)
    for path in present:
        path.replace(target / path.name)
    why = "another config" if old_hash not in (cfg_hash, "unknown", "unreadable") else "an unfinished or failed run"
    log.warning("%s held a result of %s (config %s, this job's %s): moved to %s; this cell is measured again",
                output_dir, why, old_hash, cfg_hash, target)
    return target


def reused_from_sweep(sweep_dir: Path, cfg_hash: str) -> Optional[tuple[Path, dict]]:
    """(job folder, metrics) of a finished cell in another sweep folder with the same config."""
    if not sweep_dir.is_dir():
        from summ.errors import ConfigError

        raise ConfigError(f"sweep.reuse_from={sweep_dir} is not a folder: give a finished sweep's folder")
    for path in sorted(sweep_dir.glob(f"*/{METRICS_FILE}")):
        metrics = _final_for(path, cfg_hash)
        if metrics is not None:
            return path.parent, metrics
    return None


def _final_for(path: Path, cfg_hash: str) -> Optional[dict]:
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s): measuring the cell again", path, exc)
        return None
    if metrics.get("status") in FINAL_STATUSES and metrics.get("config_hash") == cfg_hash:
        return metrics
    return None


def reused_from_study(hydra_cfg, overrides: Sequence[str], cfg_hash: str) -> Optional[tuple[Path, dict]]:
    """(job folder, metrics) of an earlier COMPLETE trial of this job's Optuna study that measured
    the same config (same config hash), so a study never measures one configuration twice; None
    outside an Optuna sweep with storage, or when no such trial left a readable result."""
    from summ.study import finished_trial_for

    found = finished_trial_for(hydra_cfg, cfg_hash)
    if found is None:
        return None
    number, job_dir = found
    metrics = _final_for(Path(job_dir) / METRICS_FILE, cfg_hash)
    if metrics is None:
        return None
    return Path(job_dir), {**metrics, "reused_trial": number}
