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


def token_losses(
    logits: torch.Tensor,
    labels: torch.Tensor,
    kind: ModelKind,
    label_smoothing: float = 0.0,
    label_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position cross-entropy [batch, positions] (0 where ignored) and the aligned labels.

    Only the rows of label positions are taken from the logits (and upcast to float32): a causal
    LM's logits are mostly prompt positions, and slicing then upcasting them all would copy the
    whole [batch, positions, vocabulary] tensor (about 1.4 GB at 8 x 700 tokens x 128k).
    `label_tokens`, when the caller knows it (the collator counts it on the host), sizes the row
    selection up front: finding the rows then needs no read-back from the GPU."""
    if kind == ModelKind.causal:  # position t predicts token t+1: shift the labels, not the logits
        labels = torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), IGNORE_INDEX)], dim=1)
    flat = labels.reshape(-1)
    mask = flat != IGNORE_INDEX
    rows = (
        torch.nonzero_static(mask, size=label_tokens)[:, 0]
        if label_tokens is not None
        else mask.nonzero(as_tuple=True)[0]
    )
    picked = logits.reshape(-1, logits.size(-1)).index_select(0, rows).float()
    losses = logits.new_zeros(flat.shape, dtype=torch.float32)
    losses = losses.index_put(
        (rows,), F.cross_entropy(picked, flat[rows], reduction="none", label_smoothing=label_smoothing)
    )
    return losses.view(labels.shape), labels


def summed_token_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    kind: ModelKind,
    label_smoothing: float = 0.0,
    label_tokens: int | None = None,
) -> torch.Tensor:
    """Sum of per-token cross-entropy over the label tokens (-100 ignored)."""
    return token_losses(logits, labels, kind, label_smoothing, label_tokens)[0].sum()


def model_inputs(batch: dict) -> dict:
    """What the model's forward takes: everything but the labels (the loss is computed here) and
    the host-side counts (summ/data/tokenize.py: BatchCounts)."""
    return {k: v for k, v in batch.items() if k not in ("labels", "counts")}
