"""The device a run measures on, and what else ran on it while the steps were timed.

Timing on a busy machine says little about the configuration: on 2 cores, a 24 s run took 7
minutes beside other jobs, and two runs started together ran 12 times slower each. `LoadWatch`
samples, over the measured steps, how many runnable threads belong to other processes (the
kernel's instantaneous count in /proc/loadavg less this process's own running threads), and
records the 1-minute load average at start and end, the process's CPU time against wall time and,
on CUDA, other processes on the GPU. A run is `busy` when other processes kept at least half a
core's worth of threads runnable over its worst stretch (a quarter of the measured steps, at
least 3: another job that overlapped only the end of the run lowers the headline rate although
the whole run's mean stays low), or shared the GPU.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from summ.measure.devices import cuda_index

BUSY_OTHER_THREADS_PER_CORE = 0.5
STRETCH_SHARE, STRETCH_MIN = 0.25, 3  # the stretch the busy test judges: a quarter of the samples, at least 3


def worst_stretch(samples: list[int]) -> float | None:
    """The highest mean over any run of consecutive samples as long as the stretch (all of them
    when there are fewer)."""
    if not samples:
        return None
    width = min(len(samples), max(STRETCH_MIN, round(STRETCH_SHARE * len(samples))))
    window = sum(samples[:width])
    worst = window
    for i in range(width, len(samples)):
        window += samples[i] - samples[i - width]
        worst = max(worst, window)
    return worst / width


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(cuda_index(device))
    return f"cpu ({cores()} cores)"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _runnable_total() -> int | None:
    """Runnable threads on the machine now (/proc/loadavg's fourth field, before the slash)."""
    try:
        return int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


def _runnable_own() -> int:
    running = 0
    for stat in Path("/proc/self/task").glob("*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "R":
                running += 1
        except (OSError, IndexError):
            pass
    return running


def _load1() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


class LoadWatch:
    """start(), sample() once per measured step, then finish() -> the `machine` record."""

    def __init__(self, device: torch.device):
        self.device = device
        self.others_runnable: list[int] = []  # other runnable threads, once per measured step
        self._wall0: float | None = None

    def start(self) -> LoadWatch:
        self._load_start, self._cpu0, self._wall0 = _load1(), time.process_time(), time.perf_counter()
        return self

    def sample(self) -> None:
        if self._wall0 is None:  # a resumed run starts measuring without the loop's start
            self.start()
        total = _runnable_total()
        if total is not None:
            self.others_runnable.append(max(0, total - _runnable_own()))

    def finish(self) -> dict:
        if self._wall0 is None:
            self.start()
        wall = time.perf_counter() - self._wall0
        others = sum(self.others_runnable) / len(self.others_runnable) if self.others_runnable else None
        worst = worst_stretch(self.others_runnable)
        gpu_others = other_gpu_processes(self.device)
        busy = bool((worst is not None and worst >= BUSY_OTHER_THREADS_PER_CORE * cores()) or gpu_others)
        return {
            "cores": cores(),
            "load_avg_1m_start": self._load_start,
            "load_avg_1m_end": _load1(),
            "other_runnable_threads_mean": others,
            "other_runnable_threads_worst_stretch": worst,
            "cpu_seconds": time.process_time() - self._cpu0,
            "wall_seconds": wall,
            "torch_threads": torch.get_num_threads(),
            "other_gpu_processes": gpu_others,
            "busy": busy,
        }


def other_gpu_processes(device: torch.device) -> int | None:
    """Processes other than this one holding memory on the GPU (NVML through torch), or None where
    it cannot be seen. NVML names processes by the host's PIDs: inside a container (its own PID
    namespace) this process is not among them under its own PID, and every process would look like
    another one. This run holds memory on the GPU when it asks, so where its own PID is missing the
    list cannot be matched, and it is left out (None), not read as busy."""
    if device.type != "cuda":
        return None
    try:
        text = torch.cuda.list_gpu_processes(cuda_index(device))
    except Exception:
        return None
    pids = [line.split()[1] for line in text.splitlines() if line.strip().startswith("process")]
    if str(os.getpid()) not in pids:
        return None
    return sum(1 for pid in pids if pid != str(os.getpid()))
