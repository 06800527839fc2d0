"""One job, whichever kind: training (summ/training/loop.py), K-fold training with an ensemble
(summ/training/kfold.py), or summaries without training, from a trained run (mode=predict) or a
hosted model (model.kind=api; summ/inference/predict.py). Returns the job's metrics, also in
the run folder whatever happened (summ/run_folder.py); a UserError is raised after that write."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from summ.config import Config, ModelKind, config_hash
from summ.files import make_folder
from summ.inference.predict import run_predict
from summ.reports.plots import save_run_plots
from summ.run_folder import RunMetrics, read_history
from summ.training import checkpoint
from summ.training.kfold import train_kfold
from summ.training.loop import run_training
from summ.training.outcome import new_metrics, recorded
from summ.validation import unused_settings

log = logging.getLogger(__name__)


def run_job(
    cfg: DictConfig,
    output_dir: str | os.PathLike,
    keep: list | None = None,
    tracking_names: tuple[str, str | None] | None = None,
    reuse_loaded: bool = False,
) -> RunMetrics:
    """Run the job `cfg` describes in `output_dir`. `keep`, a list, receives the trained model (K-fold
    logit averaging); `tracking_names`: (run name, sweep group) for the experiment tracker;
    `reuse_loaded`: a sweep's cell, sharing data and model with the process's other cells. `cfg` was
    validated once where its job was first read (summ/single_run.py, summ/sweeps/trials.py)."""
    for text in unused_settings(cfg):
        log.warning("%s", text)
    obj: Config = OmegaConf.to_object(cfg)
    output_dir = make_folder(output_dir)  # a folder that cannot be made fails now, not after training
    if obj.mode == "predict" or obj.model.kind == ModelKind.api:
        metrics = new_metrics(obj, config_hash(cfg))
        with recorded(metrics, output_dir):
            run_predict(obj, output_dir, metrics)
        return metrics
    if obj.train.k_folds > 1 and obj.train.fold is None:
        return train_kfold(cfg, output_dir, tracking_names)
    metrics = run_training(
        obj,
        output_dir,
        new_metrics(obj, config_hash(cfg)),
        checkpoint.identity(cfg),
        keep,
        tracking_names,
        reuse_loaded,
    )
    if obj.save_visualizations and metrics.train is not None:
        _save_plots(obj, output_dir)
    return metrics


def _save_plots(cfg: Config, output_dir: Path) -> None:
    try:
        save_run_plots(read_history(output_dir), output_dir, cfg.measure.warmup_steps, title=cfg.model.name)
    except Exception as exc:  # a figure must never cost the run its metrics
        log.warning(
            "save_visualizations: the plots failed (%s); rebuild them with python -m summ.reports.plots %s",
            exc,
            output_dir,
        )
