"""The bare reference loop's clocks (benchmarks/common.py: bare_loop): a stopwatch over the measured
window, and a count of the host syncs CUDA reports inside it."""

from __future__ import annotations

import time


class WindowTimer:
    """The bare loop's stopwatch: CUDA events, the device synchronised once before the window
    (outside it) and once at its end; the wall clock on the CPU."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.begin = self.torch.cuda.Event(enable_timing=True)
            self.begin.record()
        self.wall0 = time.perf_counter()

    def stop(self) -> tuple[float, float]:
        """(seconds by the events, or the clock on the CPU; wall seconds)."""
        if self.cuda:
            end = self.torch.cuda.Event(enable_timing=True)
            end.record()
            self.torch.cuda.synchronize()  # the window's one synchronize
            wall = time.perf_counter() - self.wall0
            return self.begin.elapsed_time(end) / 1000.0, wall
        wall = time.perf_counter() - self.wall0
        return wall, wall


class SyncWatch:
    """Counts the host syncs CUDA's sync debug mode reports until stop() (None where it cannot):
    a diagnostic only, so it never fails the run it watches."""

    def __init__(self):
        import warnings

        import torch

        self.torch, self.seen, self._caught = torch, None, None
        try:
            self._caught = warnings.catch_warnings(record=True)
            self.seen = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        except Exception:  # noqa: BLE001
            self.stop()
            self.seen = None

    def stop(self) -> int | None:
        import contextlib

        with contextlib.suppress(Exception):
            self.torch.cuda.set_sync_debug_mode("default")
        if self._caught is not None:
            self._caught.__exit__(None, None, None)
            self._caught = None
        if self.seen is None:
            return None
        return sum("synchroniz" in str(w.message).lower() for w in self.seen)
