"""The training and evaluation loss: summed token cross-entropy, divided by the caller.

Summing here and dividing by the label tokens of the whole accumulation window (train) or of
the whole dev set (eval) makes the loss independent of how samples are split into batches,
so (batch, accumulation) = (8,1), (4,2) and (2,4) give the same update.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from summ.config import ModelKind
from summ.data.tokenize import IGNORE_INDEX


def token_losses(logits: torch.Tensor, labels: torch.Tensor, kind: ModelKind,
                 label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position cross-entropy [batch, positions] (0 where ignored) and the aligned labels."""
    if kind == ModelKind.causal:  # position t predicts token t+1
        logits, labels = logits[:, :-1, :], labels[:, 1:]
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="none", label_smoothing=label_smoothing)
    return losses.view(labels.shape), labels


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor, kind: ModelKind,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """Sum of per-token cross-entropy over the label tokens (-100 ignored)."""
    return token_losses(logits, labels, kind, label_smoothing)[0].sum()


def model_inputs(batch: dict) -> dict:
    """What the model's forward takes: everything but the labels (the loss is computed here)."""
    return {k: v for k, v in batch.items() if k != "labels"}
