"""Measurement: the one definition of every reported cost figure.

- Step and micro-step times are read after a device synchronize; the first
  ``measure.warmup_steps`` optimizer steps are excluded from every timing figure.
- ``samples_per_s`` and ``tokens_per_s`` divide what the measured steps processed by the
  measured seconds; tokens are non-pad tokens the model reads (see ``batch_token_counts``).
- Peak memory: on CUDA the allocator's own peaks, reset at the start of each run. On CPU the
  kernel's peak resident set (VmHWM), reset through /proc/self/clear_refs at the start of each
  run, above the RSS at that moment, after the previous job's memory was handed back (glibc
  keeps freed memory, so raw RSS would carry over between jobs of a sweep). Exact and free of
  cost; where the kernel refuses the reset, a thread samples RSS instead (costs a few % on 2 cores).
- MFU: FLOPs counted by torch's FlopCounterMode on one warm-up micro-batch (forward and
  backward, matmuls and attention, recompute from checkpointing included) per padded position,
  times padded positions/s,
  over the device's peak FLOP/s for the precision in use. Approximate: ops that the counter
  does not know (bitsandbytes 4-bit matmuls) are missing, so QLoRA MFU reads low.
"""
from __future__ import annotations

import ctypes
import gc
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from summ.errors import OverBudget

# Dense peak TFLOP/s by device-name fragment: (fp32 without tensor cores, bf16/fp16 tensor cores).
# Vendor data sheets; the SXM figure where a card comes in several forms. First match wins.
PEAK_TFLOPS = (
    ("H200", (67.0, 989.0)),
    ("H100", (67.0, 989.0)),
    ("A100", (19.5, 312.0)),
    ("L40S", (91.6, 362.0)),
    ("L4", (30.3, 121.0)),
    ("A10G", (31.2, 70.0)),
    ("A10", (31.2, 125.0)),
    ("RTX 4090", (82.6, 165.0)),
    ("RTX 3090", (35.6, 71.0)),
    ("V100", (15.7, 125.0)),
    ("T4", (8.1, 65.0)),
)


def peak_flops(device: torch.device, precision: str, configured_tflops: Optional[float]) -> Optional[float]:
    """FLOP/s the device can do at best, or None where unknown (then MFU is null)."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, (fp32, half) in PEAK_TFLOPS:
        if fragment in name:
            return (half if precision in ("bf16", "fp16") else fp32) * 1e12
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_token_counts(batch: dict) -> tuple[int, int]:
    """(tokens, pad_tokens) the model reads in one batch: encoder or prompt+summary positions,
    plus decoder positions for seq2seq; pad positions counted separately to show padding waste."""
    mask = batch["attention_mask"]
    real, total = int(mask.sum()), mask.numel()
    if "decoder_input_ids" in batch:
        labels = batch["labels"]
        real_dec = int((labels != -100).sum())
        real, total = real + real_dec, total + labels.numel()
    return real, total - real


def label_token_count(batch: dict) -> int:
    """Target tokens in a batch: the divisor of the summed token loss."""
    return int((batch["labels"] != -100).sum())


# --------------------------------------------------------------------------- memory


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


# --------------------------------------------------------------------------- activations and FLOPs


@dataclass
class MicroStepProfile:
    """Exact, device-independent figures for one micro-batch."""

    flops: int = 0
    activation_bytes: int = 0  # tensors saved for backward, each storage counted once
    tokens: int = 0


class ProfileMicroStep:
    """Context manager: counts FLOPs and saved-activation bytes of the forward+backward inside it."""

    def __init__(self) -> None:
        self.profile = MicroStepProfile()
        self._storages: set[int] = set()

    def _pack(self, t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in self._storages:
                self._storages.add(key)
                self.profile.activation_bytes += storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
            pass
        return t

    def __enter__(self) -> "ProfileMicroStep":
        from torch.utils.flop_counter import FlopCounterMode

        self._flops = FlopCounterMode(display=False)
        self._saved = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._flops.__enter__()
        self._saved.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._saved.__exit__(*exc)
        self._flops.__exit__(*exc)
        self.profile.flops = int(self._flops.get_total_flops())


# --------------------------------------------------------------------------- timing


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
