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
from summ.data.sampler import EpochSampler, TokenBatches, Window
from summ.data.tokenize import Collator, TokenizedDataset
from summ.errors import ConfigError


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
    samples_per_step: float  # the effective batch; with a token budget, the mean over a full epoch


def window(cfg: Config, effective_batch: int, whole_steps: bool = True) -> Window | None:
    """The measured window in samples, each part rounded up to whole optimizer steps (a token
    budget's window is exact: its micro-batches are made whole steps instead); None when the run
    is not measured in samples (measure.samples null)."""
    m = cfg.measure
    if m.samples is None:
        return None
    warmup = m.warmup_samples if m.warmup_samples is not None else m.warmup_steps * effective_batch
    if not whole_steps:
        return Window(warmup=warmup, measured=m.samples)
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


def token_batches(
    cfg: Config, dataset: TokenizedDataset, collator: Collator, max_tokens: int, per_step: int, windowed: bool
) -> TokenBatches:
    """batch.max_tokens's batch sampler: over the measured window (`windowed`, where the run has one)
    or full epochs. A budget below the longest training sample's padded positions is refused."""
    lengths, labels = dataset.lengths(), dataset.label_lengths()
    batches = TokenBatches(
        EpochSampler(lengths, seed=cfg.train.seed), labels, collator.budget_positions, max_tokens, per_step
    )
    longest = max(map(batches.sample_cost, range(len(lengths))))
    if longest > max_tokens:
        raise ConfigError(
            f"batch.max_tokens={max_tokens} is below the longest training sample ({longest} padded positions, "
            f"input and labels): raise it to at least {longest}, or lower data.encoder_max_len"
        )
    if windowed:  # a warm-up given in steps: steps of the micro-batch a typical sample fills
        batches.sampler.window = window(cfg, per_step * batches.typical_batch(), whole_steps=False)
    return batches


def token_schedule(
    cfg: Config, dataset: TokenizedDataset, collator: Collator, max_tokens: int, per_step: int
) -> Schedule:
    """A token budget's schedule: a window's steps are its micro-batches over `per_step`; otherwise
    the run's length rules (schedule_length) with a full epoch's mean samples per step."""
    epoch = token_batches(cfg, dataset, collator, max_tokens, per_step, windowed=False).batches(0)
    inputs, labels = dataset.lengths(), dataset.label_lengths()
    positions = sum(collator.positions([inputs[j] for j in b], [labels[j] for j in b]) for b in epoch)
    plan = EpochPlan(len(epoch) // per_step, positions)
    if plan.optimizer_steps == 0:
        raise ConfigError(
            f"the training set ({len(dataset)} samples) fills fewer micro-batches than one optimizer step "
            f"takes ({per_step}): lower the accumulation or batch.max_tokens, or raise data.max_train_samples"
        )
    mean = sum(map(len, epoch)) / plan.optimizer_steps
    windowed = token_batches(cfg, dataset, collator, max_tokens, per_step, windowed=True)
    if windowed.sampler.window is not None:
        warm, measured = (len(part) // per_step for part in windowed.part_batches(0))
        return Schedule(warm + measured, warm, plan, mean)
    total = schedule_length(cfg, plan.optimizer_steps, max(1, round(mean)))
    return Schedule(total, cfg.measure.warmup_steps, plan, mean)


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
