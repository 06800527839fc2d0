"""The knee analysis of a sweep's cells: the recommendation rule, memory-pressure flags and the
memory model (peak = a + b x micro-batch x padded positions). Pure functions of the cells, so a
recorded table replays exactly (tests, benchmarks, the knee sweeper's predictions).

The rule: among ok cells (under budget x headroom), the smallest micro-batch whose samples/s is
within `knee.tolerance` of the best; ties go to fewer accumulation steps.
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

from summ.reports.cells import Cell
from summ.run_folder import GIB


@dataclass
class MemoryModel:
    """peak_bytes = intercept + slope x (micro-batch x padded positions per sample)."""

    intercept: float
    slope: float  # bytes per padded token position in a micro-batch
    r2: float
    positions_per_sample: float  # padded positions per sample, in the largest micro-batch measured
    n: int

    def predict(self, micro_batch: int) -> float:
        return self.intercept + self.slope * micro_batch * self.positions_per_sample

    def largest_fitting(self, limit_bytes: float) -> Optional[int]:
        if self.slope <= 0:
            return None
        return max(0, math.floor((limit_bytes - self.intercept) / (self.slope * self.positions_per_sample)))


def fit_memory_model(cells: list[Cell]) -> Optional[MemoryModel]:
    pts = [(c.positions, c.peak_bytes, c.batch_size) for c in cells
           if c.ok and c.positions and c.peak_bytes is not None and c.batch_size]
    xs = [p[0] for p in pts]
    if len(set(xs)) < 2:
        return None
    ys = [p[1] for p in pts]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (intercept + slope * x)) ** 2 for x, y in zip(xs, ys))
    r2 = 1 - ss_res / ss_tot if ss_tot else 1.0
    # Positions per sample from the largest micro-batch measured: the longest sample in a batch
    # sets its padded width, and larger batches are likelier to hold a long one.
    largest = max(pts, key=lambda p: (p[2], p[0]))
    return MemoryModel(intercept, slope, r2, largest[0] / largest[2], len(pts))


@dataclass
class Analysis:
    cells: list[Cell]
    tolerance: float
    recommended: Optional[Cell]
    fastest: Optional[Cell]
    reason: str
    memory_model: Optional[MemoryModel]
    limit_bytes: Optional[int]
    budget_bytes: Optional[int]
    warnings: list[str]
    varied: list[str] = field(default_factory=list)  # settings that differ across cells, shown per cell

    def setting_text(self, c: Cell) -> str:
        s = c.settings()
        return " ".join(f"{k}={s.get(k, '-')}" for k in self.varied)

    @property
    def measured_largest_fitting(self) -> Optional[int]:
        ok = [c.batch_size for c in self.cells if c.ok]
        return max(ok) if ok else None

    @property
    def predicted_largest_fitting(self) -> Optional[int]:
        if self.memory_model is None or not self.limit_bytes:
            return None
        return self.memory_model.largest_fitting(self.limit_bytes)


def _flag_memory_pressure(cells: list[Cell], tolerance: float) -> None:
    series: dict[tuple, list[Cell]] = defaultdict(list)
    for c in cells:
        if c.ok and c.batch_size:
            series[("accumulation", c.gradient_accumulation_steps, c.other_settings())].append(c)
            series[("effective", c.effective_batch_size, c.other_settings())].append(c)
    for members in series.values():
        members.sort(key=lambda c: c.batch_size)
        for prev, cur in zip(members, members[1:]):
            if (cur.batch_size > prev.batch_size and cur.samples_per_s < prev.samples_per_s * (1 - tolerance)
                    and (cur.peak_bytes or 0) > (prev.peak_bytes or 0) and "memory pressure" not in cur.flags):
                cur.flags.append("memory pressure")


def _sort_key(c: Cell) -> tuple:
    return (c.effective_batch_size or 0, c.batch_size or 0, c.gradient_accumulation_steps or 0, c.job)


def varied_settings(cells: list[Cell]) -> list[str]:
    """Keys whose value is not the same in every cell (a grid's or a study's other dimensions)."""
    keys = sorted({k for c in cells for k in c.settings()})
    return [k for k in keys if len({c.settings().get(k) for c in cells}) > 1]


def analyse(cells: list[Cell], tolerance: float = 0.05, warnings: Optional[list[str]] = None) -> Analysis:
    cells = sorted(cells, key=_sort_key)
    varied = varied_settings(cells)
    for c in cells:
        c.flags = []
    _flag_memory_pressure(cells, tolerance)
    ok = [c for c in cells if c.ok and (c.limit_bytes is None or (c.peak_bytes or 0) <= c.limit_bytes)]
    limits = [c.limit_bytes for c in cells if c.limit_bytes]
    budgets = [c.budget_bytes for c in cells if c.budget_bytes]
    limit, budget = (min(limits) if limits else None), (min(budgets) if budgets else None)
    model = fit_memory_model(cells)
    if not ok:
        return Analysis(cells, tolerance, None, None, "no cell finished ok: nothing to recommend", model,
                        limit, budget, warnings or [], varied)
    fastest = max(ok, key=lambda c: c.samples_per_s)
    within = [c for c in ok if c.samples_per_s >= fastest.samples_per_s * (1 - tolerance)]
    rec = min(within, key=lambda c: (c.batch_size, c.gradient_accumulation_steps, c.effective_batch_size))
    rec.flags.append("recommended")
    if fastest is not rec:
        fastest.flags.append("fastest")
    excluded = [c for c in cells if c.status in ("oom", "over_budget")]
    with_settings = " ".join(f"{k}={rec.settings().get(k, '-')}" for k in varied)
    parts = [f"micro-batch {rec.batch_size} x accumulation {rec.gradient_accumulation_steps} "
             f"(effective {rec.effective_batch_size}){' with ' + with_settings if with_settings else ''} "
             f"trains at {rec.samples_per_s:.1f} samples/s"]
    if rec is fastest:
        parts.append("the fastest cell measured")
    else:
        parts.append(f"{rec.samples_per_s / fastest.samples_per_s:.0%} of the fastest cell "
                     f"(micro-batch {fastest.batch_size} x {fastest.gradient_accumulation_steps}, "
                     f"{fastest.samples_per_s:.1f} samples/s), within the {tolerance:.0%} tolerance, with "
                     f"{gib_text(rec.peak_bytes)} peak memory against {gib_text(fastest.peak_bytes)}")
    if rec.budget_fraction is not None:
        parts.append(f"its peak is {rec.budget_fraction:.0%} of the memory budget")
    pressure = [c for c in cells if "memory pressure" in c.flags]
    if pressure:
        parts.append("larger micro-batches were slower per sample while using more memory ("
                     + ", ".join(f"{c.batch_size} x {c.gradient_accumulation_steps}" for c in pressure)
                     + "): past the knee, more samples per pass cost more than they save")
        padded = [c for c in pressure if c.pad_fraction is not None and rec.pad_fraction is not None
                  and c.pad_fraction > rec.pad_fraction + 0.05]
        if padded:
            parts.append(f"padding grows with the micro-batch ({rec.pad_fraction:.0%} at the recommended cell, up to "
                         f"{max(c.pad_fraction for c in padded):.0%}): data.group_by_length=true cuts it")
    if excluded:
        parts.append(f"{len(excluded)} cell(s) did not fit ("
                     + ", ".join(f"{c.batch_size} x {c.gradient_accumulation_steps}: {c.status}" for c in excluded)
                     + ") and were excluded")
    return Analysis(cells, tolerance, rec, fastest, "; ".join(parts) + ".", model, limit, budget, warnings or [],
                    varied)


def gib_text(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / GIB:.3f} GiB"


def pareto_front(cells: list[Cell]) -> list[Cell]:
    """Ok cells with ROUGE that no other cell beats on both speed (seconds per sample, lower)
    and quality (ROUGE mean, higher); ordered from fastest to best ROUGE."""
    pts = [c for c in cells if c.ok and c.seconds_per_sample and c.rouge_mean is not None]
    front = [c for c in pts if not any(
        o.seconds_per_sample <= c.seconds_per_sample and o.rouge_mean >= c.rouge_mean
        and (o.seconds_per_sample < c.seconds_per_sample or o.rouge_mean > c.rouge_mean) for o in pts)]
    return sorted(front, key=lambda c: c.seconds_per_sample)
