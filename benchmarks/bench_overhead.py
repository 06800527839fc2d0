"""Harness overhead: summ's training loop against a minimal plain PyTorch loop.

Same model init (seed), same batches in the same order (same sampler and collator), same
AdamW (fused) and parameter groups, same schedule, same loss; no Accelerate, no measurement in the
bare loop (common.bare_loop, the one reference every benchmark uses). Both count samples/s over the
same measured steps (warm-up excluded). Target: ratio >= 0.97.

    python benchmarks/bench_overhead.py [--rounds 9] [--steps 30]
"""

from __future__ import annotations

import torch
from common import DUEL_OVERRIDES, bare_loop, duel, same_inputs

OVERRIDES = [*DUEL_OVERRIDES]


def bare(steps: int) -> dict:
    """The reference loop on what summ's run of `steps` measured steps trains on (measure.steps:
    the epoch's order, no sample window)."""
    inputs = same_inputs(OVERRIDES + [f"measure.steps={steps}"])
    cfg = inputs.cfg
    res = bare_loop(inputs, torch.device("cpu"), cfg.batch.batch_size, steps, cfg.measure.warmup_steps, windowed=False)
    return {"samples_per_s": res["samples_per_s"], "final_loss": res["final_loss"]}


def main() -> None:
    duel(__doc__, "bare", "bare PyTorch loop", "bare", bare, OVERRIDES, "", ">= 0.97")


if __name__ == "__main__":
    main()
