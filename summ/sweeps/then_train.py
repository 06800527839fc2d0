"""sweep.then_train: tune, then train, in one command. When a training sweep or search ends (a grid,
the knee sweeper, Optuna), the knee report's recommended cell is trained for its full schedule
(train.epochs, train.max_steps or train.total_samples; evaluation on, weights saved) into
<sweep folder>/final/, in the sweep's own process, where the model its cells loaded is reused
(sweep.reuse_loaded). The final run's metrics record names the cell (`recommended_cell`) and the
knee report links the run.

The cell's config is the one its job folder recorded, less what made it a measurement trial (the
measured window). An interrupted final run resumes like any run: the same command with
sweep.resume=true hydra.sweep.dir=<the sweep> keeps the finished cells and continues the final run
from its newest checkpoint; a final run already complete for the same config is not trained again.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from summ.config import Config, config_hash
from summ.errors import ConfigError
from summ.files import make_folder
from summ.run_folder import FINAL_DIR, HYDRA_DIR, RUN_LOG, RunMetrics, read_metrics, write_metrics

log = logging.getLogger(__name__)


def final_config(job_dir: Path, final_dir: Path) -> DictConfig:
    """The recommended cell's recorded config as a full training run: no measured window (the
    trial's own or a preset's), evaluation on, weights saved, and a resume from the final run's
    newest checkpoint where an interrupted one left it."""
    from summ.training import checkpoint

    recorded = job_dir / HYDRA_DIR / "config.yaml"
    if not recorded.is_file():
        raise ConfigError(
            f"sweep.then_train: {recorded} is missing, so the recommended cell's config is unknown: train it "
            f"with its command (the overrides in sweep.csv) instead"
        )
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(recorded))
    with open_dict(cfg):
        cfg.measure.samples = cfg.measure.warmup_samples = cfg.measure.steps = None
        cfg.eval.enabled = True
        cfg.train.save_model = True
        cfg.train.resume_from = "latest" if checkpoint.latest(final_dir) is not None else None
    return cfg


@contextlib.contextmanager
def _logging_into(folder: Path):
    """The final run's log in its own run.log, and on the console as a job's lines read: by the
    sweep's end Hydra's file handler (if any) still writes the last job's run.log, and its console
    handler has Hydra's own format ("[HYDRA] ...") back."""
    root = logging.getLogger()
    theirs = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    consoles = [h for h in root.handlers if not isinstance(h, logging.FileHandler)]
    formats = [h.formatter for h in consoles]
    job_format = logging.Formatter(
        "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
    )  # Hydra's default job_logging format
    mine = logging.FileHandler(folder / RUN_LOG, encoding="utf-8")
    mine.setFormatter(job_format)
    for h in theirs:
        root.removeHandler(h)
    for h in consoles:
        h.setFormatter(job_format)
    root.addHandler(mine)
    try:
        yield
    finally:
        root.removeHandler(mine)
        mine.close()
        for h, f in zip(consoles, formats, strict=True):
            h.setFormatter(f)
        for h in theirs:
            root.addHandler(h)


def train_recommended(sweep_dir: Path, job: str, overrides: list[str]) -> RunMetrics:
    """Train the cell of `sweep_dir`/`job` into <sweep_dir>/final; returns its metrics (a complete
    final run for the same config is returned as it is). Refusals raise UserError, as a run's do."""
    from summ.pipeline import run_job
    from summ.validation import validate

    final_dir = sweep_dir / FINAL_DIR
    cfg = final_config(sweep_dir / job, final_dir)
    done = read_metrics(final_dir).record
    if done is not None and done.status == "ok" and done.config_hash == config_hash(cfg):
        log.info("sweep.then_train: %s already holds this cell's trained run; not trained again", final_dir)
        return done
    validate(cfg)
    with _logging_into(make_folder(final_dir)):
        metrics = run_job(
            cfg, final_dir, tracking_names=(FINAL_DIR, sweep_dir.name), reuse_loaded=cfg.sweep.reuse_loaded
        )
    metrics.recommended_cell = {"sweep": str(sweep_dir), "job": job, "overrides": list(overrides)}
    write_metrics(final_dir, metrics)
    return metrics
