"""The adaptive knee search, apart from how a cell is measured (hydra_plugins/summ_knee_sweeper
runs each cell as a Hydra job; tests replay recorded tables).

1. Double the micro-batch from `min_batch_size` until a cell ends oom or over_budget (or is
   predicted to), or gains less than `tolerance` samples/s over the previous cell.
2. Bisect between the last good and the first bad cell until the gap is at most
   `resolution` x the good size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


@dataclass
class Trial:
    batch_size: int
    gradient_accumulation_steps: int
    status: str
    samples_per_s: Optional[float] = None
    peak_bytes: Optional[int] = None
    job: Optional[str] = None  # the job folder; None for a cell skipped on prediction
    note: str = ""

    @property
    def good(self) -> bool:
        return self.status == "ok" and bool(self.samples_per_s)


def knee_search(run: Callable[[int], Trial], predicted_over: Callable[[int], Optional[float]],
                accumulation: Callable[[int], Optional[int]], *, min_batch_size: int, max_batch_size: int,
                tolerance: float, resolution: float, max_trials: int) -> dict:
    """Search; returns {stopped_doubling, last_good, first_bad, trials_run, trials: {bs: Trial}}."""
    trials: dict[int, Trial] = {}

    def measured() -> int:
        return sum(1 for t in trials.values() if t.job is not None)

    def cell(bs: int) -> Trial:
        predicted = predicted_over(bs)
        if predicted is not None:
            trials[bs] = Trial(bs, accumulation(bs) or 0, "predicted_over_budget",
                               note=f"not run: predicted peak {predicted / 2**30:.2f} GiB over the limit")
        else:
            trials[bs] = run(bs)
        return trials[bs]

    bs, last_good, first_bad, reason = min_batch_size, None, None, "reached max_batch_size"
    while bs <= max_batch_size:
        if measured() >= max_trials:
            reason = f"used all {max_trials} trials (max_trials)"
            break
        if accumulation(bs) is None:
            reason = f"micro-batch {bs} does not divide the effective batch"
            break
        trial = cell(bs)
        if not trial.good:
            first_bad, reason = bs, f"{trial.status} at micro-batch {bs}"
            break
        if last_good is not None and trial.samples_per_s < trials[last_good].samples_per_s * (1 + tolerance):
            first_bad, reason = bs, f"doubling to {bs} gained less than {tolerance:.0%} samples/s"
            break
        last_good, bs = bs, bs * 2
    memory_bound = first_bad is not None and trials[first_bad].status in ("oom", "over_budget", "predicted_over_budget")
    lo, hi = last_good, first_bad
    while lo is not None and hi is not None and hi - lo > max(1, int(lo * resolution)) and measured() < max_trials:
        candidates = [b for b in range(lo + 1, hi) if accumulation(b) is not None]
        if not candidates:
            break
        mid = min(candidates, key=lambda b: abs(b - (lo + hi) / 2))
        trial = cell(mid)
        if memory_bound:
            lo, hi = (mid, hi) if trial.good else (lo, mid)
        elif first_bad is not None and not trials[first_bad].good:  # crashed or diverged: no edge to find
            break
        else:
            better = trial.good and trial.samples_per_s >= trials[lo].samples_per_s * (1 + tolerance)
            lo, hi = (mid, hi) if better else (lo, mid)
    return {"stopped_doubling": reason, "last_good": lo, "first_bad": hi, "trials_run": measured(),
            "trials": trials}
