"""The adaptive knee search, apart from how a cell is measured (hydra_plugins/summ_knee_sweeper
runs each cell as a Hydra job; tests replay recorded tables).

1. Double the micro-batch from `min_batch_size` until a cell ends oom or over_budget (or is
   predicted to), falls more than `tolerance` below the best cell's samples/s, or stays within
   the tolerance of it `patience` + 1 times in a row.
2. Bisect between the best cell and the next larger one tried until the gap is at most
   `resolution` x the best size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from summ.reports.knee import fit_memory_model


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


def predicted_over_limit(ok_cells: list, batch_size: int, limit_bytes: Optional[int]) -> Optional[float]:
    """The peak the knee report's memory model predicts for `batch_size` when it passes
    `limit_bytes` (budget x headroom), from cells that ran ok; None when it fits or the model is
    not trustworthy yet (fewer than two cells, or R^2 under 0.9)."""
    if not limit_bytes or len(ok_cells) < 2:
        return None
    model = fit_memory_model(ok_cells)
    if model is None or model.r2 < 0.9:
        return None
    predicted = model.predict(batch_size)
    return predicted if predicted > limit_bytes else None


def knee_search(run: Callable[[int], Trial], predicted_over: Callable[[int], Optional[float]],
                accumulation: Callable[[int], Optional[int]], *, min_batch_size: int, max_batch_size: int,
                tolerance: float, resolution: float, max_trials: int, patience: int = 1) -> dict:
    """Search; returns {stopped_doubling, last_good, first_bad, trials_run, trials: {bs: Trial}}.

    Doubling compares each cell with the best so far: more than `tolerance` faster goes on; more
    than `tolerance` slower is past the knee and stops; within the tolerance is flat, and up to
    `patience` flat doublings in a row go on (one flat reading is as often timing noise as a
    knee: a 2-core CPU's run-to-run spread exceeds 5%). A negative tolerance stops on memory only.
    Bisection then runs between the best cell and the next larger one tried: for the memory edge
    when that one did not fit, else for the throughput knee.

    Long because the two phases share their bookkeeping (trials, best, budget) and read in order.
    """
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

    bs, best, flat, reason = min_batch_size, None, 0, "reached max_batch_size"
    while bs <= max_batch_size:
        if measured() >= max_trials:
            reason = f"used all {max_trials} trials (max_trials)"
            break
        if accumulation(bs) is None:
            reason = f"micro-batch {bs} does not divide the effective batch"
            break
        trial = cell(bs)
        if not trial.good:
            reason = f"{trial.status} at micro-batch {bs}"
            break
        top = trials[best].samples_per_s if best is not None else None
        if top is None or tolerance < 0 or trial.samples_per_s >= top * (1 + tolerance):
            best, flat = bs, 0
        elif trial.samples_per_s < top * (1 - tolerance):
            reason = f"doubling to {bs} lost more than {tolerance:.0%} samples/s against micro-batch {best}"
            break
        else:
            flat += 1
            if flat > patience:
                reason = f"{flat} doublings in a row gained less than {tolerance:.0%} samples/s over micro-batch {best}"
                break
        bs *= 2
    later = sorted(b for b in trials if best is not None and b > best)
    lo, hi = best, (later[0] if later else None)
    memory_bound = hi is not None and trials[hi].status in ("oom", "over_budget", "predicted_over_budget")
    while lo is not None and hi is not None and hi - lo > max(1, int(lo * resolution)) and measured() < max_trials:
        candidates = [b for b in range(lo + 1, hi) if accumulation(b) is not None]
        if not candidates:
            break
        mid = min(candidates, key=lambda b: abs(b - (lo + hi) / 2))
        trial = cell(mid)
        if memory_bound:
            lo, hi = (mid, hi) if trial.good else (lo, mid)
        elif not trials[hi].good:  # crashed or diverged: no edge to find
            break
        else:
            better = trial.good and trial.samples_per_s >= trials[lo].samples_per_s * (1 + tolerance)
            lo, hi = (mid, hi) if better else (lo, mid)
    return {"stopped_doubling": reason, "last_good": lo, "first_bad": hi, "trials_run": measured(),
            "trials": trials}
