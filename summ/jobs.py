"""What a job takes from results already measured, and what it leaves when it is refused: a single
run (summ/single_run.py) and a sweep's trial (summ/sweeps/trials.py) both use it, so it imports
nothing of summ.sweeps (setup.cfg: "a single run imports no sweep module").

- measured_before: a finished result for this exact config, from the folder itself (sweep.resume),
  from a cell of another sweep (sweep.reuse_from, copied in), or from an earlier trial of the same
  study (a lookup the trial passes in); else the folder is cleared for a new measurement.
- record_refusal: the metrics of a run refused before it started.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig

from summ.config import config_hash
from summ.distributed import is_main_process
from summ.errors import EXIT_USER_ERROR, FINAL_STATUSES, ConfigError, Status, UserError
from summ.run_folder import METRICS_FILE, RunMetrics, job_dirs, read_metrics, set_aside, write_metrics

log = logging.getLogger(__name__)

# (job folder, its metrics) of a finished cell with the config hash it is given, or None
EarlierResult = Callable[[str], tuple[Path, RunMetrics] | None]


def measured_before(cfg: DictConfig, output_dir: Path, earlier_trial: EarlierResult | None = None) -> RunMetrics | None:
    """A finished result for this exact config: the folder's own (sweep.resume), a cell of another
    sweep (sweep.reuse_from, copied into the folder), or what `earlier_trial` finds (a sweep's
    trial: an earlier trial of its Optuna study). None: measure it (after moving aside any other
    result the folder holds). A single run honours the first two."""
    cfg_hash = config_hash(cfg)
    if cfg.sweep.resume:
        prior = final_result(output_dir, cfg_hash)
        if prior is not None:
            log.info(
                "resume: %s already holds a complete %s result for this config; not measured again",
                output_dir,
                prior.status,
            )
            return prior
    found = None
    if cfg.sweep.reuse_from:
        found = reused_from_sweep(Path(cfg.sweep.reuse_from), cfg_hash)
        if found is not None:
            log.info(
                "sweep.reuse_from: %s measured this config already (%s); its result is taken", found[0], found[1].status
            )
    if found is None and earlier_trial is not None:
        found = earlier_trial(cfg_hash)
    if found is None:
        set_aside(output_dir, cfg_hash, resuming=bool(cfg.train.resume_from))
        return None
    source, prior = found
    prior = replace(prior, reused_from=str(source))
    write_metrics(output_dir, prior)
    return prior


def final_result(folder: Path, cfg_hash: str) -> RunMetrics | None:
    """The folder's metrics if they are complete, final (re-measuring would not change them;
    "failed" is measured again) and for the same config."""
    found = read_metrics(folder)
    if found.problem and found.problem != "missing":
        log.warning("%s: %s is %s: measuring the cell again", folder, METRICS_FILE, found.problem)
    m = found.record
    return m if m is not None and m.status in FINAL_STATUSES and m.config_hash == cfg_hash else None


def reused_from_sweep(sweep_dir: Path, cfg_hash: str) -> tuple[Path, RunMetrics] | None:
    """(job folder, metrics) of a finished cell in another sweep folder with the same config."""
    if not sweep_dir.is_dir():
        raise ConfigError(f"sweep.reuse_from={sweep_dir} is not a folder: give a finished sweep's folder")
    for d in job_dirs(sweep_dir):
        m = final_result(d, cfg_hash)
        if m is not None:
            return d, m
    return None


def record_refusal(output_dir: Path, exc: UserError) -> None:
    """The metrics of a run refused before it started (whatever happened, the folder says why)."""
    if is_main_process() and read_metrics(output_dir).problem == "missing":
        try:
            write_metrics(
                output_dir,
                RunMetrics(status=Status.failed, error=str(exc), user_error=exc.exit_status == EXIT_USER_ERROR),
            )
        except UserError:  # the folder cannot take it either (a full disk): the log line says why
            pass
