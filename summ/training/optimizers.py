"""The optimizer a run trains with."""

from __future__ import annotations

import torch


def build_optimizer(decay: list, no_decay: list, tcfg) -> torch.optim.Optimizer:
    """AdamW, weight decay off for biases and norms; the fused kernel (one launch for all
    parameters, as the HF Trainer's default adamw_torch_fused) where every parameter allows it."""
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=tcfg.learning_rate, eps=tcfg.adam_epsilon, fused=fused or None)
