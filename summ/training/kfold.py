"""K-fold training (train.k_folds > 1): K members in fold_<k>/, each trained without its fold and
predicting it (out of fold), per-fold figures with mean and standard deviation, and the members'
dev summaries made one by ensemble.strategy (summ/inference/ensemble.py)."""

from __future__ import annotations

import json
import statistics
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from summ.config import Config, config_hash
from summ.data.splits import load_splits
from summ.errors import ConfigError, DataError, Status, UserError
from summ.inference import ensemble
from summ.inference import evaluate as inference
from summ.inference.scoring import pair_rouge_mean
from summ.measure.memory import is_oom, release_memory
from summ.run_folder import (
    DEV_PREDICTIONS_FILE,
    ERROR_LOG,
    OOF_CANDIDATES_FILE,
    RunMetrics,
    read_predictions,
    write_metrics,
    write_text,
)
from summ.training import checkpoint
from summ.training.cleanup import reset_accelerate
from summ.training.loop import run_training
from summ.training.outcome import new_metrics

# a member's cost figures stand for the run: every fold trains the same configuration
COST_FIELDS = (
    "model",
    "data",
    "device",
    "num_processes",
    "batch_size",
    "gradient_accumulation_steps",
    "effective_batch_size",
    "mixed_precision",
    "gradient_checkpointing",
    "quantization",
    "lora",
    "random_init",
    "train",
    "memory",
    "epoch_seconds_projected",
    "mfu",
    "hfu",
)


def train_kfold(cfg: DictConfig, output_dir: Path, tracking_names: tuple | None = None) -> RunMetrics:
    """K members (fold_<k>/) then their ensemble; returns the run's metrics (cost figures are fold 0's)."""
    k = cfg.train.k_folds
    folds: list[RunMetrics] = []
    kept: list | None = [] if cfg.ensemble.strategy == "logit_avg" else None
    run_name, group = tracking_names or (output_dir.name, None)  # each fold a tracker run, grouped by the job
    for fold in range(k):
        sub = cfg.copy()
        sub.train.fold = fold
        obj: Config = OmegaConf.to_object(sub)
        folds.append(
            run_training(
                obj,
                output_dir / f"fold_{fold}",
                new_metrics(obj, config_hash(sub)),
                checkpoint.identity(sub),
                keep=kept,
                tracking_names=(f"{run_name}/fold_{fold}", group or run_name),
            )
        )
        if kept:  # the next fold trains with the device to itself, as a fresh process would
            kept[-1] = (moved(kept[-1][0], "cpu"), *kept[-1][1:])
            release_memory()
    metrics = replace(
        new_metrics(OmegaConf.to_object(cfg), config_hash(cfg)),
        **{name: getattr(folds[0], name) for name in COST_FIELDS},
    )
    failed = [f for f in folds if f.status != Status.ok]
    metrics.status = failed[0].status if failed else Status.ok
    metrics.error = f"fold {folds.index(failed[0])}: {failed[0].error}" if failed else None
    metrics.folds = [
        {
            "fold": i,
            "status": f.status,
            "samples_per_s": f.train.samples_per_s if f.train else None,
            "eval_loss": (f.eval or {}).get("loss"),
            "rouge_mean": (f.eval or {}).get("rouge_mean"),
            "oof_rouge_mean": ((f.eval or {}).get("oof") or {}).get("rouge_mean"),
        }
        for i, f in enumerate(folds)
    ]
    metrics.kfold = {
        "k": k,
        "fold_seed": cfg.train.fold_seed,
        **{
            name: _spread([r[name] for r in metrics.folds])
            for name in ("samples_per_s", "eval_loss", "rouge_mean", "oof_rouge_mean")
        },
    }
    member_preds = [read_predictions(output_dir / f"fold_{i}") for i in range(k)]
    try:
        if not failed and all(member_preds) and cfg.eval.enabled and cfg.eval.generate:
            _ensemble(cfg, output_dir, metrics, [[r["prediction"] for r in p] for p in member_preds], kept)
    except UserError as exc:
        metrics.status, metrics.error, metrics.phase = Status.failed, str(exc), "ensemble"
        write_metrics(output_dir, metrics)
        raise
    except Exception as exc:  # recorded like any job failure, so a sweep goes on
        metrics.phase = "ensemble"
        if is_oom(exc):
            metrics.status, metrics.error = Status.oom, "out of memory during ensemble"
        else:
            metrics.status, metrics.error = Status.failed, f"{type(exc).__name__}: {exc}".splitlines()[0]
            write_text(output_dir, ERROR_LOG, traceback.format_exc())
    finally:
        if kept:
            kept.clear()
            release_memory()
    write_metrics(output_dir, metrics)
    return metrics


def _spread(values: list) -> dict:
    values = [v for v in values if v is not None]
    return {
        "mean": statistics.fmean(values) if values else None,
        "std": statistics.pstdev(values) if len(values) > 1 else 0.0 if values else None,
    }


def _ensemble(cfg: DictConfig, output_dir: Path, metrics: RunMetrics, member_preds: list, kept: list | None) -> None:
    """The K members' dev summaries made one, by the configured strategy."""
    k = cfg.train.k_folds
    obj: Config = OmegaConf.to_object(cfg)
    dev = load_splits(obj.data).dev
    strategy = cfg.ensemble.strategy
    weights = [max(r["rouge_mean"] or 0.0, 1e-6) for r in metrics.folds] if strategy == "weighted" else None
    info: dict[str, Any] = {
        "strategy": str(strategy),
        "members_rouge_mean": [r["rouge_mean"] for r in metrics.folds],
        "weights": weights,
    }
    if strategy == "logit_avg":
        chosen, info["generation_seconds"] = _logit_average(kept, dev, obj)
    else:
        if strategy == "stacking":
            selector, info["stacking"] = _fit_stacking(output_dir, k, obj)
        chosen = []
        for i in range(len(dev)):
            cands = [p[i] for p in member_preds]
            pick = (
                ensemble.stack_select(cands, selector)
                if strategy == "stacking"
                else ensemble.mbr_select(cands, weights)
            )
            chosen.append(cands[pick])
    scores = inference.score(dev, chosen, obj.eval.rouge_tokenizer)
    metrics.eval = {**scores, "loss": metrics.kfold["eval_loss"]["mean"], "ensemble": info}
    inference.save_predictions(output_dir / DEV_PREDICTIONS_FILE, dev, chosen)


def moved(model, device):
    """`model` on `device`: a finished member waits in host memory until the ensemble needs it. A
    bitsandbytes-quantized model cannot move (transformers refuses .to on it): it stays where it is."""
    try:
        return model.to(device)
    except (ValueError, RuntimeError, NotImplementedError):
        return model


def _logit_average(kept: list, dev: list, obj: Config) -> tuple[list[str], float]:
    """Summaries decoded from the members' averaged next-token log-probabilities: every member on
    the device together, only now, after the last fold trained."""
    from accelerate import Accelerator

    reset_accelerate()
    acc = Accelerator(
        cpu=obj.train.cpu or not torch.cuda.is_available(), mixed_precision=str(obj.train.mixed_precision)
    )
    kept = [(moved(m, acc.device), tok, enc) for m, tok, enc in kept]
    (first, tok, enc), rest = kept[0], [m for m, _, _ in kept[1:]]
    if any(t.get_vocab() != tok.get_vocab() for _, t, _ in kept[1:]):
        raise ConfigError("ensemble.strategy=logit_avg needs members that share a tokenizer: use mbr or weighted")
    try:
        return inference.generate(
            acc, first, dev, enc, tok, obj.inference, obj.model.kind, obj.batch.eval_batch_size, co_members=rest
        )
    finally:
        reset_accelerate()


def _fit_stacking(output_dir: Path, k: int, obj: Config) -> tuple[list[float], dict]:
    """Train the stacking selector on every fold's out-of-fold candidates."""
    groups = []
    for fold in range(k):
        for line in (output_dir / f"fold_{fold}" / OOF_CANDIDATES_FILE).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            cands = row["candidates"]
            if len(cands) > 1:
                target = [
                    sum(pair_rouge_mean(c, r, obj.eval.rouge_tokenizer) for r in row["references"])
                    / max(len(row["references"]), 1)
                    for c in cands
                ]
                groups.append((cands, target))
    if not groups:
        raise DataError("stacking found no out-of-fold candidate sets: set inference.num_beams >= 2")
    weights = ensemble.fit_selector(groups)
    return weights, {"train_dialogues": len(groups), "features": dict(zip(ensemble.FEATURES, weights))}
