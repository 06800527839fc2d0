"""One job, whichever kind: training (summ/training/loop.py), K-fold training with an ensemble
(summ/training/kfold.py), or summaries without training, from a trained run (mode=predict) or a
hosted model (model.kind=api; summ/inference/predict.py). Returns the job's metrics, also in
the run folder whatever happened (summ/run_folder.py); a UserError is raised after that write."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from summ.config import Config, ModelKind, config_hash
from summ.validation import unused_settings, validate
from summ.files import make_folder
from summ.inference.predict import run_predict
from summ.reports.plots import save_run_plots
from summ.run_folder import RunMetrics, read_history
from summ.training.kfold import train_kfold
from summ.training.loop import run_training
from summ.training.outcome import new_metrics, recorded

log = logging.getLogger(__name__)

# what a checkpoint must match to be resumed: the config, less where and how it is saved
CHECKPOINT_FREE = ("train.resume_from", "train.save_every_steps", "train.keep_checkpoints", "tracking",
                   "save_visualizations")


def checkpoint_identity(cfg: DictConfig) -> str:
    return config_hash(cfg, leave_out=CHECKPOINT_FREE)


def run_job(cfg: DictConfig, output_dir: str | os.PathLike, keep: Optional[list] = None,
            tracking_names: Optional[tuple[str, Optional[str]]] = None, reuse_loaded: bool = False) -> RunMetrics:
    """Run the job `cfg` describes in `output_dir`. `keep`, a list, receives the trained model (K-fold
    logit averaging); `tracking_names`: (run name, sweep group) for the experiment tracker;
    `reuse_loaded`: a sweep's cell, sharing data and model with the process's other cells."""
    validate(cfg)
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
        return train_kfold(cfg, output_dir, checkpoint_identity, tracking_names)
    metrics = run_training(obj, output_dir, new_metrics(obj, config_hash(cfg)), checkpoint_identity(cfg), keep,
                           tracking_names, reuse_loaded)
    if obj.save_visualizations and metrics.train is not None:
        _save_plots(obj, output_dir)
    return metrics


def _save_plots(cfg: Config, output_dir: Path) -> None:
    try:
        save_run_plots(read_history(output_dir), output_dir, cfg.measure.warmup_steps, title=cfg.model.name)
    except Exception as exc:  # a figure must never cost the run its metrics
        log.warning("save_visualizations: the plots failed (%s); rebuild them with python -m summ.reports.plots %s",
                    exc, output_dir)
