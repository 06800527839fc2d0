"""Padding: pad-to-max against dynamic padding against length-grouped batches.

Competition-shaped synthetic data (12,457 dialogues, encoder max length 512, decoder max 100),
tiny BART, micro-batch 16. For each strategy: the fraction of padded positions over one full
epoch of batches (exact, from the sampler and collator), and samples/s from summ's loop.
Target: length-grouped >= 1.3x pad-to-max.

    python benchmarks/bench_padding.py [--rounds 3] [--steps 20]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from common import alternate, compose, machine, median, table

BASE = ["data=synthetic", "batch.batch_size=16", "eval.enabled=false", "measure.warmup_steps=3"]
STRATEGIES = {
    "pad to max length": ["data.padding=max_length"],
    "dynamic (longest in batch)": ["data.padding=longest"],
    "length-grouped + dynamic": ["data.padding=longest", "data.group_by_length=true"],
}


def epoch_pad_fraction(overrides: list[str]) -> float:
    """Padded share of all positions over one epoch of training batches (no model needed)."""
    from omegaconf import OmegaConf

    from summ.data.sampler import EpochSampler
    from summ.data.splits import load_splits
    from summ.data.tokenize import Collator, Encoder, TokenizedDataset, batch_token_counts
    from summ.modeling import models

    cfg = OmegaConf.to_object(compose(BASE + overrides))
    tok = models.load_tokenizer(cfg.model)
    enc = Encoder(tok, cfg.model.kind, cfg.model.prompt_template, cfg.data.encoder_max_len, cfg.data.decoder_max_len)
    ds = TokenizedDataset(load_splits(cfg.data).train, enc)
    widths = enc.max_widths() if cfg.data.padding == "max_length" else (None, None)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=cfg.batch.batch_size,
        drop_last=True,
        sampler=EpochSampler(
            ds.lengths(), seed=cfg.train.seed, group_by_length=cfg.data.group_by_length, batch_size=cfg.batch.batch_size
        ),
        collate_fn=Collator(tok.pad_token_id, cfg.model.kind, tok.eos_token_id, *widths),
    )
    real = pad = 0
    for batch in loader:
        r, p = batch_token_counts(batch)
        real, pad = real + r, pad + p
    return pad / (real + pad)


def run(overrides: list[str], steps: int) -> dict:
    from summ.pipeline import run_job

    with tempfile.TemporaryDirectory() as tmp:
        m = run_job(compose(BASE + overrides + [f"measure.steps={steps}"]), tmp).to_dict()
    return {"samples_per_s": m["train"]["samples_per_s"], "pad_fraction": m["train"]["pad_fraction"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    print(
        f"machine: {machine()}\ntiny_bart, 12,457 synthetic dialogues, micro-batch 16, {args.steps} measured steps, "
        f"{args.rounds} rounds interleaved after one warm-up round"
    )
    epoch_pad = {name: epoch_pad_fraction(o) for name, o in STRATEGIES.items()}
    res = alternate({name: (lambda o=o: run(o, args.steps)) for name, o in STRATEGIES.items()}, args.rounds)
    base = median(res["pad to max length"], "samples_per_s")
    rows = [
        [
            name,
            f"{epoch_pad[name]:.1%}",
            f"{median(r, 'samples_per_s'):.1f}",
            f"{median(r, 'samples_per_s') / base:.2f}x",
        ]
        for name, r in res.items()
    ]
    print()
    print(table(rows, ["strategy", "padded positions (1 epoch)", "median samples/s", "vs pad-to-max"]))
    grouped = median(res["length-grouped + dynamic"], "samples_per_s") / base
    print(f"\nlength-grouped / pad-to-max = {grouped:.2f}x (target >= 1.3x)")


if __name__ == "__main__":
    main()
