"""Peak memory and the budget.

On CUDA the allocator's own peaks, reset at the start of each run and of each stretch. On CPU the
kernel's peak resident set (VmHWM), reset through /proc/self/clear_refs, above the RSS at the
run's start, after the previous job's memory was handed back. glibc keeps freed memory in its
heap, where it fragments: over an epoch the resident set crept 20-40% above what a few steps
showed. So by default (measure.cpu_live_memory) allocations from 64 KiB up are served by mmap
(mallopt): a freed tensor goes back to the kernel and the resident peak tracks live tensors, as
CUDA's statistics do. The price is a page fault per fresh page: 1.4x slower training on 4 KiB
pages, about 7% on the 2 MiB pages torch takes for tensors from 2 MiB up where
THP_MEM_ALLOC_ENABLE is set (summ/__init__.py; huge_pages_in_force; BENCHMARKS.md §10). torch advises
huge pages on a tensor's own page-aligned bytes, so the 2 MiB pages lie wholly inside tensors and
add nothing to the peak. `measure.cpu_live_memory=false` keeps glibc's own thresholds (fast;
the peak then includes heap glibc kept, and creeps over an epoch). GPU runs are unaffected: their
tensors are not on this heap. Where the kernel refuses the reset, a thread samples RSS instead
(costs a few % on 2 cores).
Executable code paged in during the run (a kernel's first use: about 4 MB in a process's first
run, none in the runs after it) is host memory no batch setting changes and a GPU's figure would
not hold: it is left out of the CPU peaks (read from /proc/self/smaps at each stretch's end).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import re
import threading

import torch

from summ.errors import AgreedFailure, OverBudget
from summ.measure.devices import cuda_index
from summ.measure.flops import ProfileMicroStep
from summ.run_folder import GIB

log = logging.getLogger(__name__)


def release_memory(collect: bool = True) -> None:
    """Give freed memory back so the next job's peak starts clean. `collect=False` skips the
    cycle collector (a full collection walks every object: a quarter of a second beside a
    sweep's kept data) where only the allocators need to hand memory back."""
    if collect:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_heap()


def trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


_WARMED = False
_WARNED_SMALL_PAGES = False  # the 4 KiB-pages warning is said once per process
_LIVE: bool | None = None  # the allocator setting in force in this process (None: glibc's own)


def tensors_off_the_heap() -> bool | None:
    """The CPU allocator setting in force in this process: True, freed tensors go back to the
    kernel (measure.cpu_live_memory); False or None, glibc's own heap."""
    return _LIVE


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def _tensors_off_the_heap(live: bool) -> None:
    """glibc: `live`, allocations from 64 KiB up by mmap, freed ones returned at once (see the
    docstring); not `live`, the largest thresholds glibc's own would grow to (32 MiB, on the heap)."""
    global _LIVE
    if _LIVE == live or (_LIVE is None and not live):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024 if live else 32 * 2**20)
        libc.mallopt(_M_TRIM_THRESHOLD, 256 * 1024 if live else 64 * 2**20)
        _LIVE = live
    except (OSError, AttributeError):  # not glibc
        pass


_HUGE_PAGES: bool | None = None


def huge_pages_in_force() -> bool:
    """Whether torch's CPU allocator puts large tensors on transparent huge pages in this process
    (THP_MEM_ALLOC_ENABLE, set in summ/__init__.py, read by torch once at its first allocation; the
    kernel's THP not `never`). Seen from outside: torch then page-aligns every allocation from
    2 MiB up (and advises huge pages on it), where it otherwise asks for 64 bytes' alignment. Three
    4 MiB tensors, never touched (nothing resident), all page-aligned: only by chance otherwise
    (1 in 64 each on the heap, never from mmap, which puts a chunk's header first)."""
    global _HUGE_PAGES
    if _HUGE_PAGES is None:
        probes = [torch.empty(4 * 2**20, dtype=torch.uint8) for _ in range(3)]
        page = os.sysconf("SC_PAGE_SIZE")
        _HUGE_PAGES = kernel_allows_huge_pages() and all(t.data_ptr() % page == 0 for t in probes)
    return _HUGE_PAGES


def kernel_allows_huge_pages() -> bool:
    """The kernel's transparent huge pages are not `never` (False where it does not say)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as fh:
            return "[never]" not in fh.read()
    except OSError:
        return False


def _warm_process() -> None:
    """Once per process: autograd's engine, the optimizer and the thread pools started on a
    throw-away model, so the first job of a sweep is not charged for them."""
    global _WARMED
    if _WARMED:
        return
    layer = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(layer.parameters())
    with ProfileMicroStep():
        torch.nn.functional.cross_entropy(
            layer(torch.randn(8, 64)), torch.zeros(8, dtype=torch.long), label_smoothing=0.1
        ).backward()
    opt.step()
    big = torch.randn(512, 512, requires_grad=True)  # large enough to start the intra-op thread pool
    (big @ big).relu().softmax(-1).sum().backward()
    _WARMED = True


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


_EXECUTABLE_RSS = re.compile(rb"^[0-9a-f]+-[0-9a-f]+ ..x. [^\n]*\n(?:[A-Z][^\n]*\n)*?Rss:\s+(\d+)", re.M)


def _code_bytes() -> int:
    """Resident bytes of executable mappings (code pages); 0 where /proc/self/smaps is missing.
    About 20 ms: read at a stretch's end, not per step."""
    try:
        with open("/proc/self/smaps", "rb") as fh:
            return sum(int(kb) for kb in _EXECUTABLE_RSS.findall(fh.read())) * 1024
    except OSError:
        return 0


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
    """Per-run peak memory, above the memory the process held when the run started. Start it before
    the model loads; read `peak_bytes()` at any time. `segment()` ends a stretch of the run (the
    probe, the measured steps, evaluation): it returns that stretch's peak and starts the next.

    `weights_bytes`: memory the run counts as its own though it was already resident at start (a
    model kept loaded across a sweep's cells): added to every peak, so a cell reads as in a fresh
    process."""

    def __init__(
        self, device: torch.device, interval_ms: float = 2.0, weights_bytes: int = 0, cpu_live_memory: bool = True
    ):
        self.device = device
        self.cuda = device.type == "cuda"
        self.index = cuda_index(device) if self.cuda else None  # what every torch.cuda call below is given
        self.cpu_live_memory = cpu_live_memory  # CPU: freed tensors handed back at once (see the docstring)
        self.interval_s = interval_ms / 1000.0
        self.weights_bytes = weights_bytes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._kernel_peak = False
        self._peak_rss = 0
        self.baseline = self.baseline_reserved = 0
        self._code0 = self._code_growth = 0  # CPU: code pages resident at start, and paged in since
        self._left_out = 0  # CPU: resident bytes that are not the run's (a compiler's state: leave_out_growth)
        self.context_bytes: int | None = None
        self._stats0: dict = {}
        self.capped = False  # the CUDA allocator held to the budget (set_per_process_memory_fraction)

    @property
    def source(self) -> str:
        if self.cuda:
            return "cuda_max_memory_allocated"
        source = "cpu_peak_rss_above_baseline" if self._kernel_peak else "cpu_sampled_rss_above_baseline"
        return source if self.cpu_live_memory else source + "_heap_kept"

    def start(self) -> MemoryMonitor:
        if not self.cuda:
            _tensors_off_the_heap(self.cpu_live_memory)
            global _WARNED_SMALL_PAGES
            if self.cpu_live_memory and not huge_pages_in_force() and not _WARNED_SMALL_PAGES:
                _WARNED_SMALL_PAGES = True
                log.warning(
                    "CPU memory accounting on 4 KiB pages: training runs about 1.4x slower than on the heap "
                    "(torch allocated before summ was imported, or THP_MEM_ALLOC_ENABLE=0, or the kernel's "
                    "transparent huge pages are off); import summ before torch, or set measure.cpu_live_memory=false"
                )
        _warm_process()
        release_memory()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.index)
            self.baseline = int(torch.cuda.memory_allocated(self.index))  # what earlier jobs still hold
            self.baseline_reserved = int(torch.cuda.memory_reserved(self.index))
            free, total = torch.cuda.mem_get_info(self.index)
            self.context_bytes = int(total - free - self.baseline_reserved)  # the CUDA context, other processes
            self._stats0 = torch.cuda.memory_stats(self.index)
            return self
        self._code0, self._code_growth, self._left_out = _code_bytes(), 0, 0
        self._kernel_peak = _reset_hwm()
        self.baseline = self._peak_rss = _rss_bytes()
        if not self._kernel_peak:
            self._thread = threading.Thread(target=self._sample, name="summ-rss", daemon=True)
            self._thread.start()
        return self

    def cap(self, budget_bytes: int) -> None:
        """On CUDA, let the allocator take at most `budget_bytes` (context included), so a big card
        runs out where the card planned for would, fragmentation included."""
        if not self.cuda:
            return
        total = torch.cuda.mem_get_info(self.index)[1]
        usable = budget_bytes - (self.context_bytes or 0)
        torch.cuda.set_per_process_memory_fraction(max(0.0, min(1.0, usable / total)), self.index)
        self.capped = True

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
        if self.capped:
            torch.cuda.set_per_process_memory_fraction(1.0, self.index)
            self.capped = False

    def _process_peak(self) -> int:
        if self._kernel_peak:
            self._peak_rss = _hwm_bytes()
        else:
            self._peak_rss = max(self._peak_rss, _rss_bytes())
        return self._peak_rss

    def peak_bytes(self) -> int:
        """This stretch's peak above the baseline, the run's resident weights included."""
        if self.cuda:
            return max(0, int(torch.cuda.max_memory_allocated(self.index)) - self.baseline) + self.weights_bytes
        return max(0, self._process_peak() - self.baseline - self._code_growth - self._left_out) + self.weights_bytes

    def resident_marks(self) -> tuple[int, int] | None:
        """CPU: (resident set, code pages) now, for leave_out_growth; None on CUDA."""
        return None if self.cuda else (_rss_bytes(), _code_bytes())

    def leave_out_growth(self, since: tuple[int, int] | None) -> None:
        """CPU: the resident growth since `since` (resident_marks), code pages aside (settle counts
        them), left out of later peaks; the freed heap is handed back first."""
        if since is None:
            return
        trim_heap()
        self._left_out += max(0, (_rss_bytes() - since[0]) - (_code_bytes() - since[1]))

    def settle(self) -> None:
        """CPU: count the code paged in so far as code, not as the run's memory (the per-step
        readings in between use the last count: they over-read by at most the pages since)."""
        if not self.cuda:
            self._code_growth = max(0, _code_bytes() - self._code0)

    def reserved_peak_bytes(self) -> int:
        """The allocator's reserved peak (CUDA) or the resident set's (CPU), on the same baseline."""
        if self.cuda:
            return max(0, int(torch.cuda.max_memory_reserved(self.index)) - self.baseline_reserved) + self.weights_bytes
        return self.peak_bytes()

    def segment(self) -> int:
        """The peak of the stretch that ends now; the next stretch's peak starts from what is
        resident now (freed memory handed back first)."""
        self.settle()
        peak = self.peak_bytes()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.index)
        elif self._kernel_peak:
            trim_heap()
            _reset_hwm()
        else:
            trim_heap()
            self._peak_rss = _rss_bytes()
        return peak

    def pressure(self) -> tuple[int | None, int | None]:
        """(allocator retries, OOMs) since start: the CUDA allocator freed its cache to satisfy a
        request (a sign of memory pressure), or failed. None on the CPU."""
        if not self.cuda:
            return None, None
        now = torch.cuda.memory_stats(self.index)
        return tuple(int(now.get(k, 0) - self._stats0.get(k, 0)) for k in ("num_alloc_retries", "num_ooms"))

    def capacity_bytes(self) -> int:
        if self.cuda:
            return int(torch.cuda.mem_get_info(self.index)[1])
        return _cpu_capacity_bytes()


class BudgetGuard:
    """Raises OverBudget once the measured peak passes budget x headroom."""

    def __init__(self, monitor: MemoryMonitor, budget_gb: float | None, headroom: float):
        self.monitor = monitor
        budget = budget_gb * GIB if budget_gb else monitor.capacity_bytes()
        self.budget_bytes = int(budget)
        self.limit_bytes = int(budget * headroom)

    def check(self, peak: int | None = None) -> None:
        peak = self.monitor.peak_bytes() if peak is None else peak
        if peak > self.limit_bytes:
            raise OverBudget(peak, self.limit_bytes)


# What allocators say when they run out, for errors raised without the typed exception (as
# accelerate.utils.memory.should_reduce_batch_size matches them): cuBLAS, cuDNN and bitsandbytes
# surface allocation failures as RuntimeError.
OOM_MESSAGES = (
    "CUDA out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_NOT_SUPPORTED",
    "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "DefaultCPUAllocator: can't allocate memory",
    "CUDA error: out of memory",
    "PT_DEVMEM Allocation failed",
)
# NCCL's own allocation failures, raised by ProcessGroupNCCL as DistBackendError (a RuntimeError):
# its CUDACHECK prints "Cuda failure 'out of memory'" (older releases "Cuda failure 2 'out of
# memory'"), and a failed communicator or buffer allocation is "NCCL error ... out of memory".
OOM_PATTERNS = (re.compile(r"Cuda failure (\d+ )?'out of memory'"), re.compile(r"NCCL error.*out of memory", re.S))


class OutOfMemoryOnAProcess(MemoryError, AgreedFailure):
    """Another process of a launch (or this one) ran out of memory: every process ends the run
    with it, agreed in one collective (summ/training/processes.py: agree)."""

    def __init__(self, process: int, processes: int, where: str, message: str):
        super().__init__(f"process {process} of {processes} ran out of memory in {where}: {message}")


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory failure: the typed exceptions first, then the known messages of the
    allocation failures raised as plain RuntimeError."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(exc, RuntimeError) and exc.args and isinstance(exc.args[0], str):
        text = exc.args[0]
        return any(m in text for m in OOM_MESSAGES) or any(p.search(text) for p in OOM_PATTERNS)
    return False
