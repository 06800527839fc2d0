"""Harness overhead: summ's training loop against a minimal plain PyTorch loop.

Same model init (seed), same batches in the same order (same sampler and collator), same
AdamW (fused) and parameter groups, same schedule, same loss; no Accelerate, no measurement in the bare loop.
Both count samples/s over the same measured steps (warm-up excluded). Target: ratio >= 0.97.

    python benchmarks/bench_overhead.py [--rounds 9] [--steps 30]
"""
from __future__ import annotations

import math

import torch

from common import duel, same_inputs

OVERRIDES = ["data=synthetic", "data.synthetic_train_size=2000", "batch.batch_size=16", "eval.enabled=false",
             "measure.warmup_steps=3"]


def bare(steps: int) -> dict:
    from transformers import get_scheduler

    from summ.data.sampler import EpochSampler
    from summ.data.tokenize import Collator
    from summ.measure.timing import now
    from summ.modeling.loss import model_inputs, summed_token_loss

    cfg, tok, ds, loaded = same_inputs(OVERRIDES, steps)
    model = loaded.model.train()
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch.batch_size, drop_last=True,
                                         sampler=EpochSampler(ds.lengths(), seed=cfg.train.seed),
                                         collate_fn=Collator(tok.pad_token_id, cfg.model.kind,
                                                               loaded.decoder_start_token_id))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.train.weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=cfg.train.learning_rate, eps=cfg.train.adam_epsilon, fused=True)
    total = cfg.measure.warmup_steps + steps
    sched = get_scheduler("linear", opt, num_warmup_steps=math.ceil(cfg.train.warmup_ratio * total),
                          num_training_steps=total)
    it = iter(loader)
    samples, seconds, loss = 0, 0.0, None
    for step in range(total):
        start = now()
        batch = next(it)
        n = int((batch["labels"] != -100).sum())
        logits = model(**model_inputs(batch)).logits
        loss = summed_token_loss(logits, batch["labels"], cfg.model.kind) / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if step >= cfg.measure.warmup_steps:
            seconds += now() - start
            samples += batch["input_ids"].size(0)
    return {"samples_per_s": samples / seconds, "final_loss": loss_value}


def main() -> None:
    duel(__doc__, "bare", "bare PyTorch loop", "bare", bare, OVERRIDES, "", ">= 0.97")


if __name__ == "__main__":
    main()
