"""What a training run evaluates after training (metrics.eval): eval loss, dev summaries and their
ROUGE, the quantized model against the trained one, TTA, and a K-fold member's out-of-fold
predictions. The primitives (loss, generation, scoring) are summ/inference/evaluate.py's."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from summ import failpoints
from summ.config import Config
from summ.inference import evaluate as inference
from summ.inference import tta
from summ.inference.ensemble import mbr_select
from summ.inference.predict import generate_measured, quantized_eval
from summ.measure.timing import now
from summ.run_folder import DEV_PREDICTIONS_FILE, MODEL_DIR, OOF_CANDIDATES_FILE, OOF_PREDICTIONS_FILE, write_text
from summ.training.setup import Setup


def evaluate_trained(cfg: Config, run: Setup, output_dir: Path, backend: Callable, where: failpoints.Where) -> dict:
    """metrics.eval of a trained model (`backend()`: the generation backend TTA may use; `where`:
    the failpoints' filter for evaluation's first forward)."""
    acc, dev = run.accelerator, run.data.splits.dev
    with failpoints.inside_forward(lambda: acc.unwrap_model(run.model), "eval", where):
        result: dict[str, Any] = {"loss": inference.eval_loss(acc, run.model, run.dev_loader, run.kind)}
    if cfg.eval.generate:
        preds, speed = generate_measured(acc, run.model, dev, run.encoder, run.tokenizer, cfg, run.kind)
        result.update(inference.score(dev, preds, cfg.eval.rouge_tokenizer), **speed)
        if cfg.inference.quantization != "none":  # the saved weights, quantized, against this model
            result["quantized"] = quantized_eval(acc, cfg, output_dir / MODEL_DIR, dev, result)
        final = preds
        if cfg.tta.num_aug > 0 and cfg.tta.methods:
            final, result["tta"] = _tta(cfg, run, preds, backend())
        if cfg.eval.save_predictions and acc.is_main_process:
            inference.save_predictions(output_dir / DEV_PREDICTIONS_FILE, dev, final)
    else:
        result.update(rouge1=None, rouge2=None, rougeL=None, rouge_sum=None, rouge_mean=None)
    result.setdefault("n", len(dev))
    if run.data.oof and cfg.eval.generate:
        result["oof"] = _out_of_fold(cfg, run, output_dir)
    return result


def _out_of_fold(cfg: Config, run: Setup, output_dir: Path) -> dict:
    """A K-fold member's summaries of its held-out fold (and, for stacking, its top beams)."""
    acc, held_out = run.accelerator, run.data.oof
    n = cfg.ensemble.stacking_candidates if cfg.ensemble.strategy == "stacking" else 1
    oof = inference.generate(
        acc,
        run.model,
        held_out,
        run.encoder,
        run.tokenizer,
        cfg.inference,
        run.kind,
        cfg.batch.eval_batch_size,
        num_candidates=n,
    )[0]
    oof_preds = [c[0] for c in oof] if n > 1 else oof
    if acc.is_main_process:
        inference.save_predictions(output_dir / OOF_PREDICTIONS_FILE, held_out, oof_preds)
        if n > 1:  # what the stacking selector trains on
            write_text(
                output_dir,
                OOF_CANDIDATES_FILE,
                "".join(
                    json.dumps({"fname": s.fname, "references": s.summaries, "candidates": c}, ensure_ascii=False)
                    + "\n"
                    for s, c in zip(held_out, oof)
                ),
            )
    return inference.score(held_out, oof_preds, cfg.eval.rouge_tokenizer)


def _tta(cfg: Config, run: Setup, preds: list[str], backend) -> tuple[list[str], dict]:
    """Summaries of perturbed copies of each dev dialogue, reduced to one by MBR."""
    dev = run.data.splits.dev
    methods, skipped = tta.usable_methods(cfg.tta, backend)
    start = now()
    copies = tta.perturb(dev, cfg.tta, methods, run.tokenizer.mask_token, backend)
    candidates = [[p] for p in preds]
    for copy in copies:
        more, _ = inference.generate(
            run.accelerator,
            run.model,
            copy,
            run.encoder,
            run.tokenizer,
            cfg.inference,
            run.kind,
            cfg.batch.eval_batch_size,
        )
        for c, p in zip(candidates, more):
            c.append(p)
    chosen = [c[mbr_select(c)] for c in candidates]
    extra = now() - start
    scores = inference.score(dev, chosen, cfg.eval.rouge_tokenizer)
    return chosen, {
        **scores,
        "methods": [str(m) for m in methods],
        "skipped": skipped,
        "num_aug": cfg.tta.num_aug,
        "extra_seconds": extra,
        "extra_ms_per_sample": 1000 * extra / max(len(preds), 1),
        "picked_original": sum(c[0] == x for c, x in zip(candidates, chosen)),
    }
