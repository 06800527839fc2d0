"""Evaluation at the end of a training run: eval loss, dev summaries and their ROUGE, the
quantized model against the trained one, TTA, and a K-fold member's out-of-fold predictions."""
from __future__ import annotations

import json
from typing import Any

from summ import failpoints
from summ.inference import evaluate as inference
from summ.inference import tta
from summ.inference.ensemble import mbr_select
from summ.inference.predict import generate_measured, quantized_eval
from summ.measure.timing import now
from summ.run_folder import (DEV_PREDICTIONS_FILE, MODEL_DIR, OOF_CANDIDATES_FILE, OOF_PREDICTIONS_FILE,
                             write_text)


def evaluate(job) -> None:
    """Fill job.metrics.eval (summ/training/loop.py's Job, after training)."""
    cfg, acc, m = job.cfg, job.accelerator, job.metrics
    if not cfg.eval.enabled or not job.splits.dev:
        return
    m.phase = "eval"
    job.measurement.end_observed_stretch()  # evaluation's memory is its own: never judged against the training budget
    with failpoints.inside_forward(lambda: acc.unwrap_model(job.model), "eval", job.where(job.total_updates)):
        result: dict[str, Any] = {"loss": inference.eval_loss(acc, job.model, job.dev_loader, job.kind)}
    if cfg.eval.generate:
        preds, speed = generate_measured(acc, job.model, job.splits.dev, job.encoder, job.tokenizer, cfg, job.kind)
        result.update(inference.score(job.splits.dev, preds, cfg.eval.rouge_tokenizer), **speed)
        if cfg.inference.quantization != "none":  # the saved weights, quantized, against this model
            result["quantized"] = quantized_eval(acc, cfg, job.output_dir / MODEL_DIR, job.splits.dev, result)
        final = preds
        if cfg.tta.num_aug > 0 and cfg.tta.methods:
            final, result["tta"] = _tta(job, preds)
        if cfg.eval.save_predictions and acc.is_main_process:
            inference.save_predictions(job.output_dir / DEV_PREDICTIONS_FILE, job.splits.dev, final)
    else:
        result.update(rouge1=None, rouge2=None, rougeL=None, rouge_sum=None, rouge_mean=None)
    result.setdefault("n", len(job.splits.dev))
    if job.oof and cfg.eval.generate:
        result["oof"] = _out_of_fold(job)
    m.eval = result
    job.measurement.end_eval()


def _out_of_fold(job) -> dict:
    """A K-fold member's summaries of its held-out fold (and, for stacking, its top beams)."""
    cfg, acc = job.cfg, job.accelerator
    n = cfg.ensemble.stacking_candidates if cfg.ensemble.strategy == "stacking" else 1
    oof = inference.generate(acc, job.model, job.oof, job.encoder, job.tokenizer, cfg.inference, job.kind,
                             cfg.batch.eval_batch_size, num_candidates=n)[0]
    oof_preds = [c[0] for c in oof] if n > 1 else oof
    if acc.is_main_process:
        inference.save_predictions(job.output_dir / OOF_PREDICTIONS_FILE, job.oof, oof_preds)
        if n > 1:  # what the stacking selector trains on
            write_text(job.output_dir, OOF_CANDIDATES_FILE, "".join(
                json.dumps({"fname": s.fname, "references": s.summaries, "candidates": c}, ensure_ascii=False) + "\n"
                for s, c in zip(job.oof, oof)))
    return inference.score(job.oof, oof_preds, cfg.eval.rouge_tokenizer)


def _tta(job, preds: list[str]) -> tuple[list[str], dict]:
    """Summaries of perturbed copies of each dev dialogue, reduced to one by MBR."""
    cfg = job.cfg
    methods, skipped = tta.usable_methods(cfg.tta, job.backend())
    start = now()
    copies = tta.perturb(job.splits.dev, cfg.tta, methods, job.tokenizer.mask_token, job.backend())
    candidates = [[p] for p in preds]
    for copy in copies:
        more, _ = inference.generate(job.accelerator, job.model, copy, job.encoder, job.tokenizer, cfg.inference,
                                     job.kind, cfg.batch.eval_batch_size)
        for c, p in zip(candidates, more):
            c.append(p)
    chosen = [c[mbr_select(c)] for c in candidates]
    extra = now() - start
    scores = inference.score(job.splits.dev, chosen, cfg.eval.rouge_tokenizer)
    return chosen, {**scores, "methods": [str(m) for m in methods], "skipped": skipped, "num_aug": cfg.tta.num_aug,
                    "extra_seconds": extra, "extra_ms_per_sample": 1000 * extra / max(len(preds), 1),
                    "picked_original": sum(c[0] == x for c, x in zip(candidates, chosen))}
