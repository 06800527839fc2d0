"""Peak memory and the budget.

On CUDA the allocator's own peaks, reset at the start of each run. On CPU the kernel's peak
resident set (VmHWM), reset through /proc/self/clear_refs at the start of each run, above the RSS
at that moment, after the previous job's memory was handed back (glibc keeps freed memory, so raw
RSS would carry over between jobs of a sweep). Exact and free of cost; where the kernel refuses
the reset, a thread samples RSS instead (costs a few % on 2 cores).
"""
from __future__ import annotations

import ctypes
import gc
import os
import threading
from typing import Optional

import torch

from summ.errors import OverBudget
from summ.measure.flops import ProfileMicroStep


def release_memory() -> None:
    """Give freed memory back so the next job's peak starts clean."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


_WARMED = False


def _warm_process() -> None:
    """Once per process: start autograd's engine, the optimizer and the thread pools on a
    throw-away model, so the first job of a sweep is not charged for them."""
    global _WARMED
    if _WARMED:
        return
    layer = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(layer.parameters())
    with ProfileMicroStep():
        torch.nn.functional.cross_entropy(layer(torch.randn(8, 64)), torch.zeros(8, dtype=torch.long),
                                          label_smoothing=0.1).backward()
    opt.step()
    big = torch.randn(512, 512, requires_grad=True)  # large enough to start the intra-op thread pool
    (big @ big).relu().softmax(-1).sum().backward()
    _WARMED = True


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    """The kernel's peak resident set of this process since the last reset (VmHWM)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        _hwm_bytes()
        return True
    except OSError:
        return False


def _cpu_capacity_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class MemoryMonitor:
    """Per-run peak memory. Start it before the model loads; read `peak_bytes()` at any time."""

    def __init__(self, device: torch.device, interval_ms: float = 2.0):
        self.device = device
        self.interval_s = interval_ms / 1000.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._kernel_peak = False
        self._peak_rss = 0
        self.baseline = 0

    @property
    def source(self) -> str:
        if self.device.type == "cuda":
            return "cuda_max_memory_allocated"
        return "cpu_peak_rss_above_baseline" if self._kernel_peak else "cpu_sampled_rss_above_baseline"

    def start(self) -> "MemoryMonitor":
        _warm_process()
        release_memory()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = int(torch.cuda.memory_allocated(self.device))  # what earlier jobs still hold
            return self
        self._kernel_peak = _reset_hwm()
        self.baseline = self._peak_rss = _rss_bytes()
        if not self._kernel_peak:
            self._thread = threading.Thread(target=self._sample, name="summ-rss", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            rss = _rss_bytes()
            if rss > self._peak_rss:
                self._peak_rss = rss

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _process_peak(self) -> int:
        if self._kernel_peak:
            self._peak_rss = _hwm_bytes()
        else:
            self._peak_rss = max(self._peak_rss, _rss_bytes())
        return self._peak_rss

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return max(0, int(torch.cuda.max_memory_allocated(self.device)) - self.baseline)
        return max(0, self._process_peak() - self.baseline)

    def reserved_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_reserved(self.device))
        return self._process_peak()  # the whole process's resident peak

    def capacity_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.mem_get_info(self.device)[1])
        return _cpu_capacity_bytes()


class BudgetGuard:
    """Raises OverBudget once the measured peak passes budget x headroom."""

    def __init__(self, monitor: MemoryMonitor, budget_gb: Optional[float], headroom: float):
        self.monitor = monitor
        budget = budget_gb * 2**30 if budget_gb else monitor.capacity_bytes()
        self.budget_bytes = int(budget)
        self.limit_bytes = int(budget * headroom)

    def check(self, peak: Optional[int] = None) -> None:
        peak = self.monitor.peak_bytes() if peak is None else peak
        if peak > self.limit_bytes:
            raise OverBudget(peak, self.limit_bytes)


# What allocators say when they run out, for errors raised without the typed exception (as
# accelerate.utils.memory.should_reduce_batch_size matches them): cuBLAS, cuDNN and bitsandbytes
# surface allocation failures as RuntimeError.
OOM_MESSAGES = ("CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_NOT_SUPPORTED",
                "cuDNN error: CUDNN_STATUS_ALLOC_FAILED", "DefaultCPUAllocator: can't allocate memory",
                "CUDA error: out of memory", "PT_DEVMEM Allocation failed")


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory failure: the typed exceptions first, then the known messages of the
    allocation failures raised as plain RuntimeError."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(exc, RuntimeError) and exc.args and isinstance(exc.args[0], str):
        return any(m in exc.args[0] for m in OOM_MESSAGES)
    return False
