"""How long a training run is and which of its optimizer steps are measured.

- The measured window: in samples (measure.samples, measure.warmup_samples) every cell of a sweep
  measures the same samples whatever its micro-batch, accumulation or grouping (the sampler draws
  them: summ/data/sampler.py); in optimizer steps (measure.steps) for a single run.
- The epoch plan: one full epoch's optimizer steps and exact padded positions, in the order a full
  run draws them (the epoch projection's input: summ/training/instruments.py).
- The settings that change what the figures mean (metrics.caveats).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from summ.config import Config
from summ.data.sampler import EpochSampler, Window
from summ.data.tokenize import Collator, TokenizedDataset


class EpochPlan(NamedTuple):
    """One full epoch of this run's batch shape, whatever window the run measures."""

    optimizer_steps: int
    padded_positions: int


@dataclass(frozen=True)
class Schedule:
    """The run's optimizer steps: how many, how many of them warm-up, and a full epoch's plan."""

    total_steps: int
    warmup_steps: int
    epoch: EpochPlan


def window(cfg: Config, effective_batch: int) -> Window | None:
    """The measured window in samples, each part rounded up to whole optimizer steps; None when
    the run is not measured in samples (measure.samples null)."""
    m = cfg.measure
    if m.samples is None:
        return None
    warmup = m.warmup_samples if m.warmup_samples is not None else m.warmup_steps * effective_batch
    return Window(
        warmup=math.ceil(warmup / effective_batch) * effective_batch,
        measured=math.ceil(m.samples / effective_batch) * effective_batch,
    )


def schedule_length(cfg: Config, updates_per_epoch: int, effective_batch: int) -> int:
    """Optimizer steps the run takes, by the first rule that applies: a window in samples
    (warm-up and measured steps), a window in steps (measure.warmup_steps + measure.steps),
    train.total_samples, train.max_steps, then train.epochs."""
    w = window(cfg, effective_batch)
    if w is not None:
        return (w.warmup + w.measured) // effective_batch
    if cfg.measure.steps:
        return cfg.measure.warmup_steps + cfg.measure.steps
    if cfg.train.total_samples:
        return max(1, round(cfg.train.total_samples / effective_batch))
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return cfg.train.epochs * updates_per_epoch


def warmup_steps(cfg: Config, effective_batch: int) -> int:
    w = window(cfg, effective_batch)
    return w.warmup // effective_batch if w is not None else cfg.measure.warmup_steps


def epoch_plan(
    dataset: TokenizedDataset, collator: Collator, cfg: Config, batch_size: int, accumulation: int, processes: int
) -> EpochPlan:
    """One full epoch in the order a full run draws it (length grouping included)."""
    order = EpochSampler(
        dataset.lengths(), seed=cfg.train.seed, group_by_length=cfg.data.group_by_length, batch_size=batch_size
    ).order(0)
    inputs, labels = dataset.lengths(), dataset.label_lengths()
    batches = len(order) // batch_size
    positions = sum(
        collator.positions(
            [inputs[j] for j in order[b * batch_size : (b + 1) * batch_size]],
            [labels[j] for j in order[b * batch_size : (b + 1) * batch_size]],
        )
        for b in range(batches)
    )
    return EpochPlan(batches // (accumulation * processes), positions)


def caveats(cfg: Config, effective_batch: int, train_set_size: int) -> list[str]:
    """The settings that change what this run's figures mean, in words (metrics.caveats; the
    reports repeat them)."""
    eff, found = effective_batch, []
    if not cfg.measure.memory_probe:
        found.append(
            "measure.memory_probe=false: peak memory is that of the batches measured, not of the "
            "epoch's widest batch"
            + (
                f", so the memory budget ({cfg.measure.memory_budget_gb:g} GiB) "
                f"is judged without it: a cell under budget here can run out in a full epoch"
                if cfg.measure.memory_budget_gb
                else ""
            )
        )
    w = window(cfg, eff)
    if w is not None and w.warmup + w.measured > train_set_size:
        found.append(
            f"the measured window (measure.samples: {w.measured} samples after {w.warmup} of warm-up) "
            f"is larger than the {train_set_size} training samples: samples repeat, up to "
            f"{math.ceil(w.measured / train_set_size)} times in the measured steps"
        )
    elif w is None and cfg.measure.steps and (cfg.measure.warmup_steps + cfg.measure.steps) * eff > train_set_size:
        drawn = (cfg.measure.warmup_steps + cfg.measure.steps) * eff
        found.append(
            f"the measured steps (measure.warmup_steps + measure.steps, {drawn} samples) draw more than "
            f"the {train_set_size} training samples: samples repeat, up to "
            f"{math.ceil(drawn / train_set_size)} times"
        )
    if (w is not None or cfg.measure.steps) and (cfg.train.max_steps or cfg.train.total_samples):
        found.append(
            f"{'train.max_steps' if cfg.train.max_steps else 'train.total_samples'} is not used: the "
            f"measured window ({'measure.samples' if w is not None else 'measure.steps'}) sets this "
            f"run's length"
        )
    return found
