"""The adaptive knee search, apart from how a cell is measured (hydra_plugins/summ_knee_sweeper
runs each cell as a Hydra job; tests replay recorded tables).

1. Double the micro-batch from `min_batch_size` until a cell ends oom or over_budget (or is
   predicted to), or `patience` + 1 readings in a row do not beat the best cell by `tolerance`
   (a reading more than the tolerance slower is measured again before it counts). A plateau is
   believed only once the largest micro-batch (the last doubling under `max_batch_size`) does not
   beat the best either; if it does, the doubling goes on up to it (on a CPU the rate can stay
   flat for three doublings, then rise by a fifth).
2. Bisect, down to `resolution` x the size: above the best for the memory edge when the next
   cell did not fit, else below it for the knee (the smallest micro-batch as fast as the best).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from summ.errors import MEMORY_STATUSES, Status
from summ.reports.memory_model import MIN_R2, fit_memory_model


@dataclass
class Trial:
    batch_size: int
    gradient_accumulation_steps: int
    status: str
    samples_per_s: float | None = None
    peak_bytes: int | None = None
    job: str | None = None  # the job folder; None for a cell skipped on prediction
    note: str = ""

    @property
    def good(self) -> bool:
        return self.status == Status.ok and bool(self.samples_per_s)


def predicted_over_limit(ok_cells: list, batch_size: int, limit_bytes: int | None) -> float | None:
    """The peak the knee report's memory model predicts for `batch_size` when it passes
    `limit_bytes` (budget x headroom), from cells that ran ok; None when it fits or the model is
    not trustworthy yet (fewer than two cells, or R^2 under 0.9). Two cells suffice here, unlike
    for the report's predictions (MemoryModel.predicts): a search skips only the cell the line puts
    over the limit, and a wrong skip is bisected back by the memory edge."""
    if not limit_bytes or len(ok_cells) < 2:
        return None
    model = fit_memory_model(ok_cells)
    if model is None or model.r2 < MIN_R2:
        return None
    predicted = model.predict(batch_size)
    return predicted if predicted > limit_bytes else None


@dataclass
class Search:
    """One knee search: how a cell is measured (`run`), predicted not to fit (`predicted_over`: the
    predicted peak, or None) and split (`accumulation`: None where the micro-batch does not divide
    the effective batch), the settings (knee_search's docstring), and the cells so far."""

    run: Callable[[int], Trial]
    predicted_over: Callable[[int], float | None]
    accumulation: Callable[[int], int | None]
    min_batch_size: int
    max_batch_size: int
    tolerance: float
    resolution: float
    max_trials: int
    patience: int = 1
    trials: dict[int, Trial] = field(default_factory=dict)

    def measured(self) -> int:
        """Trials run so far, second readings included (cells skipped on prediction are not)."""
        return sum(1 + t.note.count("measured again") for t in self.trials.values() if t.job is not None)

    def out_of_trials(self) -> bool:
        return self.measured() >= self.max_trials

    def cell(self, bs: int) -> Trial:
        """Micro-batch `bs`, run unless the memory model predicts it does not fit."""
        predicted = self.predicted_over(bs)
        if predicted is not None:
            self.trials[bs] = Trial(
                bs,
                self.accumulation(bs) or 0,
                Status.predicted_over_budget,
                note=f"not run: predicted peak {predicted / 2**30:.2f} GiB over the limit",
            )
        else:
            self.trials[bs] = self.run(bs)
        return self.trials[bs]


def knee_search(
    run: Callable[[int], Trial],
    predicted_over: Callable[[int], float | None],
    accumulation: Callable[[int], int | None],
    *,
    min_batch_size: int,
    max_batch_size: int,
    tolerance: float,
    resolution: float,
    max_trials: int,
    patience: int = 1,
) -> dict:
    """Search; returns {stopped_doubling, last_good, first_bad, answer, trials_run, trials: {bs: Trial}}.

    Doubling compares each cell with the best so far. More than `tolerance` faster: the new best.
    More than `tolerance` slower: measured once more before it is believed (one slow reading is as
    often noise as a knee); still slower, it counts like a flat reading. Within the tolerance:
    flat. The doubling stops after `patience` + 1 readings in a row that did not beat the best,
    unless one look at the largest micro-batch beats the best (the doubling then goes on up to it);
    at the first cell that does not fit; or at max_batch_size. A negative tolerance stops on memory only.

    Bisection: above the best only for the memory edge (the next cell tried did not fit: a
    larger one that fits may be faster), otherwise below it for the knee: the rule's answer, the
    smallest micro-batch within the tolerance of the best, lies between the best's half (more than
    the tolerance slower, or the doubling would not have moved on) and the best.
    """
    search = Search(
        run, predicted_over, accumulation, min_batch_size, max_batch_size, tolerance, resolution, max_trials, patience
    )
    trials = search.trials
    best, reason = _double(search)
    later = sorted(b for b in trials if best is not None and b > best)
    first_bad = later[0] if later else None
    memory_bound = first_bad is not None and trials[first_bad].status in (
        *MEMORY_STATUSES,
        Status.predicted_over_budget,
    )
    if memory_bound:
        lo, hi = _bisect_memory_edge(search, best, first_bad)
    else:
        lo, hi = _bisect_knee(search, best)
    return {
        "stopped_doubling": reason,
        "last_good": lo,
        "first_bad": hi,
        "answer": rule_answer(trials, tolerance),
        "trials_run": search.measured(),
        "trials": trials,
    }


def _double(search: Search) -> tuple[int | None, str]:
    """(the best micro-batch, why the doubling stopped)."""
    trials, tolerance = search.trials, search.tolerance
    best, streak, reason, rose = None, 0, "reached max_batch_size", False
    bs = search.min_batch_size
    while bs <= search.max_batch_size:
        if search.out_of_trials():
            return best, f"used all {search.max_trials} trials (max_trials)"
        if search.accumulation(bs) is None:
            return best, f"micro-batch {bs} does not divide the effective batch"
        trial = trials[bs] if bs in trials else search.cell(bs)  # the look at the top measured it already
        if not trial.good:
            return best, f"{trial.status} at micro-batch {bs}"
        top = trials[best].samples_per_s if best is not None else None
        dropped = top is not None and tolerance >= 0 and trial.samples_per_s < top * (1 - tolerance)
        if dropped and not search.out_of_trials():
            again = search.run(bs)  # a drop is believed only when a second reading shows it too
            if again.good:
                trial.samples_per_s = (trial.samples_per_s + again.samples_per_s) / 2
                trial.note = (trial.note + "; " if trial.note else "") + f"measured again (job {again.job}): the mean"
        if top is None or tolerance < 0 or trial.samples_per_s >= top * (1 + tolerance):
            best, streak = bs, 0
        else:
            streak += 1
            if streak > search.patience and not rose:
                said = f"{streak} doublings in a row did not beat micro-batch {best} by {tolerance:.0%}"
                rose, reason = _look_at_the_top(search, best, bs, said)
                if not rose:
                    return best, reason
        bs *= 2
    return best, reason


def _look_at_the_top(search: Search, best: int, bs: int, said: str) -> tuple[bool, str]:
    """After a plateau, one trial at the largest doubling under max_batch_size. (rose, reason):
    rose when it beats the best, and the doubling goes on; else the plateau stands."""
    top = bs
    while top * 2 <= search.max_batch_size:
        top *= 2
    if top == bs or search.out_of_trials() or search.accumulation(top) is None:
        return False, said
    trial = search.cell(top)
    if trial.good and trial.samples_per_s >= search.trials[best].samples_per_s * (1 + search.tolerance):
        return True, f"{said}, but the largest micro-batch, {top}, did: the rate rose again, doubling went on to it"
    return False, f"{said}, nor did the largest micro-batch, {top} ({trial.status})"


def _bisect_memory_edge(search: Search, lo: int, hi: int) -> tuple[int, int]:
    """The largest micro-batch that fits, between `lo` (fits) and `hi` (does not)."""
    while hi - lo > max(1, int(lo * search.resolution)) and not search.out_of_trials():
        candidates = [b for b in range(lo + 1, hi) if search.accumulation(b) is not None]
        if not candidates:
            break
        mid = min(candidates, key=lambda b: abs(b - (lo + hi) / 2))
        lo, hi = (mid, hi) if search.cell(mid).good else (lo, mid)
    return lo, hi


def _bisect_knee(search: Search, best: int | None) -> tuple[int | None, int | None]:
    """The smallest micro-batch within the tolerance of the best, between the largest one tried
    below the best (`lo`, not within) and the best (`hi`, within)."""
    if best is None:
        return None, None
    trials = search.trials
    below = [b for b in trials if b < best and trials[b].good]
    lo, hi = (max(below) if below else best), best
    target = trials[best].samples_per_s * (1 - search.tolerance)
    while hi - lo > max(1, int(hi * search.resolution)) and not search.out_of_trials():
        candidates = [b for b in range(lo + 1, hi) if search.accumulation(b) is not None]
        if not candidates:
            break
        mid = min(candidates, key=lambda b: abs(b - (lo + hi) / 2))
        trial = search.cell(mid)
        lo, hi = (lo, mid) if trial.good and trial.samples_per_s >= target else (mid, hi)
    return lo, hi


def rule_answer(trials: dict[int, Trial], tolerance: float) -> int | None:
    """The knee report's rule over the cells measured: the smallest micro-batch within the
    tolerance of the fastest."""
    good = [t for t in trials.values() if t.good]
    if not good:
        return None
    top = max(t.samples_per_s for t in good)
    return min(t.batch_size for t in good if t.samples_per_s >= top * (1 - max(tolerance, 0)))
