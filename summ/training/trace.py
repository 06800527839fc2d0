"""The traces people already read, on demand (`measure.profile=true`): one training step recorded
with torch.profiler into the run folder as a Chrome trace (Perfetto, chrome://tracing and
TensorBoard's profiler plugin open `*.pt.trace.json`), and on CUDA a memory snapshot of the same
step (torch.cuda.memory._record_memory_history; drop the pickle on pytorch.org/memory_viz).

The step recorded is the last warm-up step: after the first (cold, and counted by the FLOP
profiler), and never inside the measured window (the profiler slows what it records; the measured
steps' clock opens after it). A run asking for a trace needs two warm-up steps or more.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from summ.errors import ConfigError
from summ.run_folder import PROFILE_DIR

log = logging.getLogger(__name__)


def check_warmup(warmup_steps: int) -> None:
    if warmup_steps < 2:
        raise ConfigError(
            f"measure.profile=true records the last warm-up step, which must not be the first: this run has "
            f"{warmup_steps} warm-up step(s); set measure.warmup_steps=2 or more (or measure.warmup_samples to two "
            f"effective batches or more)"
        )


class StepTrace:
    """Records optimizer step `step` (from 0) of this process into `folder`/profile."""

    def __init__(self, folder: Path, step: int, device: torch.device, process: int):
        self.folder, self.step, self.cuda, self.process = folder / PROFILE_DIR, step, device.type == "cuda", process
        self._profiler = None
        self.files: dict | None = None  # metrics.profile once written

    def step_starts(self, step: int) -> None:
        if step != self.step:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self._profiler = profile(activities=activities, record_shapes=True, profile_memory=True, with_stack=False)
        if self.cuda:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        self._profiler.__enter__()

    def step_ends(self, step: int) -> None:
        """After the step's clock closed (its time is warm-up's): stop and write the files."""
        if step != self.step or self._profiler is None:
            return
        self._profiler.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        trace = self.folder / f"step{step + 1}_process{self.process}.pt.trace.json"
        self._profiler.export_chrome_trace(str(trace))
        snapshot = None
        if self.cuda:
            snapshot = self.folder / f"step{step + 1}_process{self.process}_memory_snapshot.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
        self._profiler = None
        self.files = {"step": step + 1, "trace": str(trace), "memory_snapshot": snapshot and str(snapshot)}
        log.info("measure.profile: step %d recorded in %s%s", step + 1, trace, f" and {snapshot}" if snapshot else "")

    def close(self) -> None:
        """A run that ended inside the recorded step: the profiler and the history are stopped."""
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            self._profiler = None
            if self.cuda:
                torch.cuda.memory._record_memory_history(enabled=None)
