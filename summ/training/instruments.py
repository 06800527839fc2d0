"""The training loop's instruments, kept out of the loop (summ/training/loop.py calls them at four
points of a step: it starts, a micro-step is done, it ends, a checkpoint was written between steps).

- `MemoryStretches`: memory by stretch. The steps as observed, the worst-case probe (one micro-batch
  at the training set's widest input and label: summ/training/probe.py), and evaluation, which never
  counts against the training budget. `peak_bytes` is the worst of observed and probe: what the
  budget, the reports and the sweepers use.
- `Timing`: the step timer, the step clock, the micro-step timer, the FLOP profile and the machine's
  load, and the figures they make (metrics.train, the epoch projection, MFU and HFU).
- `StepInstruments`: one optimizer step's bookkeeping, from its start to its history row: the
  timers, the processes' agreement on peak, stop signal and failure (summ/training/processes.py),
  the budget check, the history, the tracker and the progress shown.
A step's time runs from the end of the step before to the end of this one (summ/measure/timing.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from summ.config import Config
from summ.data.tokenize import BatchCounts
from summ.errors import Diverged
from summ.figures import MemoryFigures, TrainFigures
from summ.measure import flops, machine, timing
from summ.measure.components import ComponentCount
from summ.measure.memory import BudgetGuard, MemoryMonitor
from summ.training import processes
from summ.training.schedule import EpochPlan, Schedule
from summ.training.trace import StepTrace

log = logging.getLogger(__name__)


class MemoryStretches:
    """A run's memory by stretch (observed steps, probe, evaluation), from the monitor's segments."""

    def __init__(self, cfg: Config, device: torch.device, probe_skipped: str | None = None):
        self.monitor = MemoryMonitor(
            device, cfg.measure.rss_interval_ms, cpu_live_memory=cfg.measure.cpu_live_memory
        ).start()
        self.guard = BudgetGuard(self.monitor, cfg.measure.memory_budget_gb, cfg.measure.headroom)
        if cfg.measure.memory_budget_gb:  # a big card runs out where the planned one would
            self.monitor.cap(self.guard.budget_bytes)
        self.budget_source = "measure.memory_budget_gb" if cfg.measure.memory_budget_gb else "device capacity"
        self.observed_peak = 0  # the largest of the stretches run so far, the probe aside
        self.probe_peak: int | None = None
        self.probe_positions: int | None = None  # the probe micro-batch's padded positions
        self.eval_peak: int | None = None
        self.probe_skipped = probe_skipped  # why the probe cannot run under this launcher (launchers.py)
        self.count: ComponentCount | None = None  # the training peak by part, once training starts

    def count_components(self, model: torch.nn.Module, optimizer) -> None:
        """From the loop's start: the parts of the peak counted from the tensors (hooks, removed at stop())."""
        self.count = ComponentCount(model, optimizer, self.monitor.device)

    def stop(self) -> None:
        self.monitor.stop()
        if self.count is not None:
            self.count.remove()

    def worst_peak(self, current: int) -> int:
        """What the budget is checked against: the worst of the probe and every stretch so far."""
        return max(current, self.observed_peak, self.probe_peak or 0)

    def end_observed_stretch(self) -> None:
        self.observed_peak = max(self.observed_peak, self.monitor.segment())

    def end_probe(self) -> int:
        """The probe micro-batch's peak; the probe's figure is the worst of its micro-batches."""
        peak = self.monitor.segment()
        self.probe_peak = max(self.probe_peak or 0, peak)
        return peak

    def end_compile(self, resident: tuple[int, int] | None) -> None:
        """The compile warm-up's stretch (summ/training/compiled.py): not a training figure. On the
        CPU, what the compiler keeps resident from `resident` (MemoryMonitor.resident_marks) on is
        left out of later peaks, as code pages are: its graphs and guards are not the run's tensors."""
        self.monitor.segment()
        self.monitor.leave_out_growth(resident)

    def end_eval(self) -> None:
        self.eval_peak = self.monitor.segment()

    def figures(self, process_peaks: list[int] | None) -> MemoryFigures:
        """metrics.memory. `process_peaks`: every process's worst peak (several processes)."""
        self.monitor.settle()
        observed = max(self.observed_peak, self.monitor.peak_bytes() if self.eval_peak is None else 0)
        mine = max(observed, self.probe_peak or 0)
        peak = max(process_peaks) if process_peaks else mine  # the largest process's: what must fit on each device
        capacity = self.monitor.capacity_bytes()
        retries, ooms = self.monitor.pressure()
        reserved = self.monitor.reserved_peak_bytes()
        components = None
        if self.count is not None:  # this process's peak by part
            components = self.count.figures(mine, reserved, self.monitor.context_bytes)
            components.eval_peak_bytes = self.eval_peak
        return MemoryFigures(
            peak_bytes=peak,
            observed_peak_bytes=observed,
            probe_peak_bytes=self.probe_peak,
            eval_peak_bytes=self.eval_peak,
            reserved_peak_bytes=reserved,
            peak_bytes_per_process=process_peaks,
            weights_bytes=self.monitor.weights_bytes or None,
            context_bytes=self.monitor.context_bytes,
            alloc_retries=retries,
            num_ooms=ooms,
            capacity_bytes=capacity,
            fraction=peak / capacity if capacity else None,
            source=self.monitor.source,
            probe_skipped=self.probe_skipped,
            probe_positions=self.probe_positions,
            budget_bytes=self.guard.budget_bytes,
            limit_bytes=self.guard.limit_bytes,
            budget_source=self.budget_source,
            components=components,
        )


@dataclass
class TrainResult:
    """What the measured steps give the metrics record: metrics.train and the run-level figures."""

    train: TrainFigures
    epoch_seconds_projected: float | None
    mfu: float | None
    hfu: float | None


class Timing:
    """The loop's clocks and counters, built with the run's final warm-up."""

    def __init__(self, warmup_steps: int, device: torch.device, phases: bool = True):
        self.device = device
        self.timer = timing.StepTimer(warmup_steps=warmup_steps)
        self.clock = timing.StepClock(device, phases=phases)  # the loop marks each phase's end
        self.micro = timing.MicroTimer(device)
        self.profile: flops.MicroStepProfile | None = None
        self.load = machine.LoadWatch(device)
        self.loop_seconds: float | None = None
        self.probe_seconds: float | None = None
        self.step_positions: list[int] = []  # padded positions of each measured step
        self.compile_watch = None  # train.compile: its CompileWatch (summ/training/compiled.py)
        self.compiles_before_measured: int | None = None

    def profiled(self, model, batch: dict):
        """Around the first warm-up micro-step: the FLOP counter (it slows the step: never a timed one)."""
        if self.profile is not None or self.timer.measuring:
            return contextlib.nullcontext()
        return _Profiling(self, model, batch["counts"])

    def train_figures(
        self, cfg: Config, final_loss: float | None, total_steps: int, processes: int, epoch: EpochPlan | None
    ) -> TrainResult:
        t = TrainFigures(
            **self.timer.summary(),
            final_loss=final_loss,
            total_optimizer_steps=total_steps,
            loop_seconds=self.loop_seconds,
            probe_seconds=self.probe_seconds,
        )
        if self.compile_watch is not None:
            t.compile_seconds = self.compile_watch.seconds
            before = self.compiles_before_measured
            t.recompiles = None if before is None else self.compile_watch.compiles - before
        t.samples_per_s_per_process = t.samples_per_s / processes if t.samples_per_s else None
        t.tokens_per_s_per_process = t.tokens_per_s / processes if t.tokens_per_s else None
        if self.profile is not None:
            t.flops_per_token = self.profile.flops_per_token
            t.hardware_flops_per_position = self.profile.hardware_flops_per_position
            t.activation_bytes_first_micro_batch = self.profile.activation_bytes
        projected = None
        if epoch is not None:
            t.epoch_positions = epoch.padded_positions
            projected = self.projected_seconds(*epoch)
        precision = flops.compute_precision(
            str(cfg.train.mixed_precision), str(cfg.model.quantization), str(cfg.model.dtype)
        )
        peak = flops.peak_flops(self.device, precision, cfg.measure.peak_tflops)
        mfu = hfu = None
        if peak and t.flops_per_token and t.tokens_per_s:
            mfu = t.flops_per_token * t.tokens_per_s / (peak * processes)
        if peak and t.hardware_flops_per_position and t.positions_per_s:
            hfu = t.hardware_flops_per_position * t.positions_per_s / (peak * processes)
        return TrainResult(t, projected, mfu, hfu)

    def projected_seconds(self, epoch_steps: int, epoch_positions: int) -> float | None:
        """One epoch at the measured cost: seconds = a x steps + b x padded positions, fitted by
        least squares over the measured steps (a step's fixed cost, a position's cost); where the
        fit is not physical (a negative part) or the steps are too alike to separate the two, the
        measured positions/s alone."""
        times, positions = self.timer.step_times, self.step_positions
        if not times or not sum(positions):
            return None
        rate = sum(positions) / sum(times)
        n = len(times)
        mean_p, mean_t = sum(positions) / n, sum(times) / n
        sxx = sum((p - mean_p) ** 2 for p in positions)
        if n >= 3 and sxx > 0:
            b = sum((p - mean_p) * (t - mean_t) for p, t in zip(positions, times)) / sxx
            a = mean_t - b * mean_p
            if a >= 0 and b > 0:
                return a * epoch_steps + b * epoch_positions
        return epoch_positions / rate


class _Profiling:
    """flops.ProfileMicroStep whose profile, once the micro-step succeeds, is the run's."""

    def __init__(self, timing_: Timing, model, counts: BatchCounts):
        self.timing = timing_
        self.profiler = flops.ProfileMicroStep(model, positions=counts.tokens + counts.pad_tokens)

    def __enter__(self):
        return self.profiler.__enter__()

    def __exit__(self, *exc_info):
        suppressed = self.profiler.__exit__(*exc_info)
        if exc_info[0] is None:
            self.timing.profile = self.profiler.profile
        return suppressed


class Progress:
    """A bar on a terminal (one per machine), else a progress line in the log every few steps."""

    def __init__(self, accelerator, total_steps: int, start_step: int, log_every: int, started: float):
        from tqdm.auto import tqdm

        # disable=None: shown on a terminal only (logs and CI stay readable)
        self.bar = tqdm(
            total=total_steps,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            leave=False,
            disable=None if accelerator.is_local_main_process else True,
        )
        self.bar.update(start_step)
        self.lines = self.bar.disable and accelerator.is_main_process
        self.total, self.start_step, self.every, self.started = total_steps, start_step, log_every, started

    def step_done(self, step: int, loss: float, samples_per_s: float) -> None:
        self.bar.update(1)
        if (step + 1) % self.every == 0 or step == 0:
            self.bar.set_postfix(loss=f"{loss:.3f}", samples_s=f"{samples_per_s:.1f}")
            if self.lines:
                eta = (timing.now() - self.started) / (step + 1 - self.start_step) * (self.total - step - 1)
                log.info(
                    "step %d/%d | loss %.4f | %.1f samples/s | ETA %s",
                    step + 1,
                    self.total,
                    loss,
                    samples_per_s,
                    _duration(eta),
                )


class StepInstruments:
    """One optimizer step's instruments, from `step_starts` to the history row `step_ends` returns."""

    def __init__(
        self,
        accelerator,
        timing_: Timing,
        memory: MemoryStretches,
        plan: Schedule,
        start_step: int,
        cfg: Config,
        folder: Path,
    ):
        """`folder`: the run folder (measure.profile's trace goes there)."""
        self.accelerator, self.timing, self.memory = accelerator, timing_, memory
        total_steps, log_every = plan.total_steps, cfg.train.log_every_steps
        self.trace = None  # measure.profile: one warm-up step recorded (summ/training/trace.py)
        if cfg.measure.profile:
            self.trace = StepTrace(folder, plan.warmup_steps - 1, accelerator.device, accelerator.process_index)
        self.measuring = False
        self.started = timing_.clock.start()  # the loop's time, and the first step's
        self.progress = Progress(accelerator, total_steps, start_step, log_every, self.started)

    def measured_steps_start(self) -> None:
        """Between warm-up and the measured steps, after the probe's work is done on the device."""
        self.timing.load.start()
        if self.timing.compile_watch is not None:
            self.timing.compiles_before_measured = self.timing.compile_watch.compiles
        self.timing.clock.start()

    def step_starts(self, step: int) -> None:
        """Before the step's data: what ran since the last step closed was its bookkeeping."""
        self.measuring = self.timing.timer.measuring
        self.timing.clock.mark("bookkeeping")
        if self.trace is not None:
            self.trace.step_starts(step)

    def data_ready(self) -> None:
        self.timing.clock.mark("data")
        self.timing.micro.mark()

    def micro_step_done(self) -> None:
        self.timing.micro.mark()

    def step_ends(
        self,
        step: int,
        epoch: int,
        loss: float,
        lr: float,
        counts: BatchCounts,
        micro_batches: list[dict],
        signum: int,
        failed: processes.Failure | None,
    ) -> tuple[dict, int]:
        """After the update and the loss's one read-back: the step's checks (divergence, the processes'
        agreement, the budget) and figures. Returns the history row and the stop signal agreed on."""
        t, acc = self.timing, self.accelerator
        for seconds in t.micro.times():
            t.timer.add_micro(seconds)
        peak = self.memory.monitor.peak_bytes()
        if not math.isfinite(loss):
            raise Diverged(f"loss became {loss} at optimizer step {step + 1}")
        peak_all, signum = processes.agree(
            acc, self.memory.worst_peak(peak), signum, failed, f"optimizer step {step + 1}"
        )
        t.clock.mark("collectives")
        self.memory.guard.check(peak_all)
        if self.measuring:
            t.step_positions.append(counts.tokens + counts.pad_tokens)
        step_seconds = t.clock.lap()
        if self.trace is not None:  # its files written after the step's clock closed
            self.trace.step_ends(step)
        if self.measuring:  # what else runs on the machine, read between steps: not in a step's time
            t.load.sample()
            t.clock.start()
        phases = t.clock.last_phases
        t.timer.add_step(step_seconds, counts.samples, counts.tokens, counts.pad_tokens, phases)
        t.timer.note_positions(max(b["counts"].tokens + b["counts"].pad_tokens for b in micro_batches))
        if self.memory.count is not None:
            self.memory.count.saw_label_rows(max(b["counts"].label_tokens for b in micro_batches))
        row = {
            "step": step + 1,
            "epoch": epoch,
            "loss": loss,
            "lr": lr,
            "step_time_s": step_seconds,
            "samples_per_s": counts.samples / step_seconds,
            "tokens_per_s": counts.tokens / step_seconds,
            "peak_mem_bytes": peak,
        }
        self.progress.step_done(step, loss, counts.samples / step_seconds)
        return row, signum

    def between_steps(self) -> None:
        """After a checkpoint: in the loop's time, not a step's."""
        self.timing.clock.start()

    def loop_ends(self) -> None:
        if self.trace is not None:
            self.trace.close()
        if self.memory.count is not None:  # training's counts: evaluation's forwards are not its logits
            self.memory.count.remove()
        self.progress.bar.close()
        self.timing.loop_seconds = timing.now() - self.started


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
