"""Time and throughput of training steps.

- Step and micro-step times are read after a device synchronize; the first
  ``measure.warmup_steps`` optimizer steps are excluded from every timing figure.
- ``samples_per_s`` and ``tokens_per_s`` divide what the measured steps processed by the
  measured seconds; tokens are non-pad tokens the model reads (summ/data/tokenize.py: batch_token_counts).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepTimer:
    """Collects per-step and per-micro-step times and what those steps processed."""

    warmup_steps: int
    step_times: list[float] = field(default_factory=list)
    micro_times: list[float] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0
    pad_tokens: int = 0
    micro_steps: int = 0
    steps_seen: int = 0  # optimizer steps including warmup
    max_micro_batch_positions: int = 0  # padded token positions of the largest micro-batch

    def note_positions(self, positions: int) -> None:
        self.max_micro_batch_positions = max(self.max_micro_batch_positions, positions)

    @property
    def measuring(self) -> bool:
        return self.steps_seen >= self.warmup_steps

    def add_micro(self, seconds: float) -> None:
        if self.measuring:
            self.micro_times.append(seconds)
            self.micro_steps += 1

    def add_step(self, seconds: float, samples: int, tokens: int, pad_tokens: int) -> None:
        """One optimizer step and what it processed (all processes together)."""
        if self.measuring:
            self.step_times.append(seconds)
            self.samples += samples
            self.tokens += tokens
            self.pad_tokens += pad_tokens
        self.steps_seen += 1

    @property
    def measured_steps(self) -> int:
        return len(self.step_times)

    def summary(self) -> dict:
        seconds = sum(self.step_times)
        return {
            "optimizer_steps": self.measured_steps,
            "micro_steps": self.micro_steps,
            "warmup_optimizer_steps": min(self.warmup_steps, self.steps_seen),
            "samples": self.samples,
            "tokens": self.tokens,
            "pad_tokens": self.pad_tokens,
            "pad_fraction": self.pad_tokens / (self.tokens + self.pad_tokens) if self.tokens else None,
            "seconds": seconds,
            "samples_per_s": self.samples / seconds if seconds else None,
            "tokens_per_s": self.tokens / seconds if seconds else None,
            "seconds_per_sample": seconds / self.samples if self.samples else None,
            "seconds_per_token": seconds / self.tokens if self.tokens else None,
            "step_time_s_median": statistics.median(self.step_times) if self.step_times else None,
            "step_time_s_p90": _percentile(self.step_times, 0.9),
            "micro_step_time_s_median": statistics.median(self.micro_times) if self.micro_times else None,
            "max_micro_batch_positions": self.max_micro_batch_positions,
        }


def _percentile(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def now() -> float:
    return time.perf_counter()
