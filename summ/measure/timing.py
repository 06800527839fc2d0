"""Time and throughput of training steps.

- A step's time runs from the end of the step before to the end of this one, everything the loop
  does included (data, forward and backward, update, the loss read back, history, checks, tracker
  logging): the measured steps add up to the loop's own wall time, so the stopwatch and the report
  agree. Checkpoints, the memory probe and the machine-load reading (summ/measure/machine.py) fall
  between steps, outside the clock, and only in `train.loop_seconds`.
- The device is synchronised once per step (the loss is read back); micro-steps are timed with
  CUDA events on a GPU, so the host never waits on the device inside a step.
- The first warm-up steps are excluded from every timing figure. ``samples_per_s`` and
  ``tokens_per_s`` divide what the measured steps processed by their seconds; tokens are the
  non-pad tokens the model reads (summ/data/tokenize.py: BatchCounts, counted on the host).
- ``samples_per_s_interval``: the interquartile range of the per-step rates, the noise to read a
  5% knee tolerance against. Where steps hold different numbers of samples (a token budget: three
  long samples or twelve short ones in the same positions), a step's samples/s swings with what it
  holds, not with noise: its rate is then its padded positions/s at the window's samples per position.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from summ.figures import PHASES
from summ.measure.devices import cuda_index


def synchronize(device: torch.device) -> None:
    """Wait until the device has done the work queued on it (no-op on the CPU: its work is done
    when the call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(cuda_index(device))


@dataclass
class StepTimer:
    """Collects per-step and per-micro-step times and what those steps processed."""

    warmup_steps: int
    step_times: list[float] = field(default_factory=list)
    step_samples: list[int] = field(default_factory=list)
    step_positions: list[int] = field(default_factory=list)
    micro_times: list[float] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0
    pad_tokens: int = 0
    micro_steps: int = 0
    steps_seen: int = 0  # optimizer steps including warmup
    max_micro_batch_positions: int = 0  # padded token positions of the largest micro-batch
    phase_seconds: dict[str, float] | None = None  # the measured steps' seconds by phase (StepClock)

    def note_positions(self, positions: int) -> None:
        self.max_micro_batch_positions = max(self.max_micro_batch_positions, positions)

    @property
    def measuring(self) -> bool:
        return self.steps_seen >= self.warmup_steps

    def add_micro(self, seconds: float) -> None:
        if self.measuring:
            self.micro_times.append(seconds)
            self.micro_steps += 1

    def add_step(
        self, seconds: float, samples: int, tokens: int, pad_tokens: int, phases: dict[str, float] | None = None
    ) -> None:
        """One optimizer step, what it processed (all processes together) and its phases."""
        if self.measuring:
            if phases is not None:
                totals = self.phase_seconds or dict.fromkeys(phases, 0.0)
                self.phase_seconds = {k: totals[k] + v for k, v in phases.items()}
            self.step_times.append(seconds)
            self.step_samples.append(samples)
            self.step_positions.append(tokens + pad_tokens)
            self.samples += samples
            self.tokens += tokens
            self.pad_tokens += pad_tokens
        self.steps_seen += 1

    @property
    def measured_steps(self) -> int:
        return len(self.step_times)

    def summary(self) -> dict:
        seconds = sum(self.step_times)
        positions = sum(self.step_positions)
        if len(set(self.step_samples)) > 1 and positions:  # samples per step vary: rates by positions
            work = [p * self.samples / positions for p in self.step_positions]
        else:
            work = self.step_samples
        rates = [n / t for n, t in zip(work, self.step_times) if t > 0]
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
            "positions_per_s": (self.tokens + self.pad_tokens) / seconds if seconds else None,
            "samples_per_s_interval": _quartiles(rates),
            "phase_seconds": self.phase_seconds,
        }


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _quartiles(values: list[float]) -> list[float] | None:
    if not values:
        return None
    return [_percentile(values, 0.25), _percentile(values, 0.75)]


def now() -> float:
    return time.perf_counter()


class StepClock:
    """The clock of the training steps: `start()` opens a span (the loop's start, the first
    measured step, the step after a checkpoint), `lap()` closes a step and opens the next. Both wait
    for the device first: on a GPU the host runs ahead of the work it queues, so a span opened
    without it would bill the step to work of the stretch before (the memory probe's worst-batch
    forward and backward, a warm-up step, a checkpoint's copies), and a step closed without it
    would miss its own. The step's loss is read back before `lap()`, so there the wait finds an
    idle device and costs microseconds.

    Phases (`phases=True`): `mark(phase)` charges the time since the last mark (or the span's
    opening) to `phase`; `lap()` charges the rest to bookkeeping, so a step's phases add up to it.
    On a GPU a mark is a CUDA event, read after `lap()`'s synchronize (no added wait): the phases
    split the device's timeline, the time it waited for the host (data) included."""

    def __init__(self, device: torch.device, phases: bool = False):
        self.device = device
        self.cuda = device.type == "cuda"
        self.phases = phases
        self._opened: float | None = None
        self._marks: list = []  # (phase, time or event) since the span opened
        self.last_phases: dict[str, float] | None = None  # the step that lap() closed

    def _mark_now(self, phase: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append((phase, event))
        else:
            self._marks.append((phase, now()))

    def mark(self, phase: str) -> None:
        if self.phases:
            self._mark_now(phase)

    def start(self) -> float:
        synchronize(self.device)
        self._opened = now()
        self._open_phases()
        return self._opened

    def _open_phases(self) -> None:
        self._marks = []
        if self.phases:
            if self.cuda:
                self._mark_now("")
            else:
                self._marks.append(("", self._opened))

    def lap(self) -> float:
        """Seconds since the span opened (the last start or lap); the next one opens now."""
        if self.phases and self.cuda:
            self._mark_now("bookkeeping")
        synchronize(self.device)
        t = now()
        if self.phases and not self.cuda:
            self._marks.append(("bookkeeping", t))
        self.last_phases = self._phase_split()
        seconds, self._opened = t - self._opened, t
        self._open_phases()
        return seconds

    def _phase_split(self) -> dict[str, float] | None:
        if not self.phases or len(self._marks) < 2:
            return None
        out = dict.fromkeys(PHASES, 0.0)
        for (_, a), (phase, b) in zip(self._marks, self._marks[1:]):
            out[phase] += a.elapsed_time(b) / 1000.0 if self.cuda else b - a
        return out


class MicroTimer:
    """Micro-step times without stalling the device: CUDA events recorded in the stream and read
    after the step's one synchronize; on the CPU the clock, read when the micro-step returns."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: list = []

    def mark(self) -> None:
        """Call before the first micro-step of a step and after each one."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        else:
            self._marks.append(now())

    def times(self) -> list[float]:
        """Seconds of each micro-step marked since the last call (after the step's synchronize)."""
        marks, self._marks = self._marks, []
        if self.cuda:
            return [a.elapsed_time(b) / 1000.0 for a, b in zip(marks, marks[1:])]
        return [b - a for a, b in zip(marks, marks[1:])]
