"""What would fit: a sweep's memory model, from the cells' memory by part.

peak = static + activations, where static (weights, gradients, optimizer state) is counted from the
tensors and does not change with the micro-batch, and activations = a + b x positions, fitted by
least squares over the ok cells of one group (positions: the padded positions of the micro-batch
the peak came from: the probe's worst batch where it set the peak). Cells without a count of their
parts (recorded before, or by a launcher that gives none) fit the peak itself, which is the same
line. Each prediction comes with a 95% prediction interval; each measured cell is checked against
the model fitted without it; and the same cell with gradient checkpointing switched is predicted by
scaling its activations with the factor measured between two cells that differ only in it.
Pure functions of the cells (recorded tables replay exactly, the knee sweeper predicts with them).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass

from summ.reports.cells import Cell

MIN_R2 = 0.9  # below it the memory model is shown, but predicts nothing
MIN_SIZES = 3  # nor with fewer distinct micro-batch widths than this
# Student's t at 97.5% by degrees of freedom (n - 2): the two-sided 95% prediction interval
T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}


@dataclass
class MemoryModel:
    """peak_bytes = intercept + slope x (micro-batch x padded positions per sample)."""

    intercept: float
    slope: float  # bytes per padded token position in a micro-batch
    r2: float
    positions_per_sample: float  # padded positions per sample, in the largest micro-batch measured
    n: int
    sizes: int = 0  # distinct micro-batch widths (padded positions) among the points
    static_bytes: float | None = None  # weights + gradients + optimizer state, where the cells count them
    residual_sd: float = 0.0  # of the fit, bytes (n - 2 degrees of freedom)
    mean_x: float = 0.0
    sxx: float = 0.0

    @property
    def fitted(self) -> str:
        """What the line was fitted to: the activations (counted parts known) or the whole peak."""
        return "activations" if self.static_bytes is not None else "peak"

    @property
    def predicts(self) -> bool:
        """A fit that may predict cells not measured: R^2 >= MIN_R2 over at least MIN_SIZES widths
        (a line through two points fits them exactly, R^2 = 1, and says nothing)."""
        return self.r2 >= MIN_R2 and self.sizes >= MIN_SIZES

    def x(self, micro_batch: int) -> float:
        return micro_batch * self.positions_per_sample

    def predict(self, micro_batch: int) -> float:
        return self.intercept + self.slope * self.x(micro_batch)

    def activations(self, micro_batch: int) -> float | None:
        return None if self.static_bytes is None else self.predict(micro_batch) - self.static_bytes

    def interval(self, micro_batch: int) -> tuple[float, float] | None:
        """The 95% prediction interval of the peak (None with fewer than three points)."""
        if self.n < 3 or self.sxx <= 0:
            return None
        t = T975.get(self.n - 2, 1.96 if self.n > 40 else 2.1)
        x = self.x(micro_batch)
        half = t * self.residual_sd * math.sqrt(1 + 1 / self.n + (x - self.mean_x) ** 2 / self.sxx)
        p = self.predict(micro_batch)
        return p - half, p + half

    def largest_fitting(self, limit_bytes: float) -> int | None:
        if self.slope <= 0:
            return None
        return max(0, math.floor((limit_bytes - self.intercept) / (self.slope * self.positions_per_sample)))


def peak_positions(c: Cell) -> int | None:
    """The padded positions of the micro-batch the cell's peak came from: the probe's worst batch
    where the probe set the peak, else the largest micro-batch measured."""
    if c.probe_positions and c.probe_peak_bytes is not None and c.probe_peak_bytes >= (c.observed_peak_bytes or 0):
        return c.probe_positions
    return c.positions


def _one_dimension(cells: list[Cell]) -> list[Cell]:
    """The cells sized like most of them (micro-batches in samples, or token budgets): the model's
    size axis is one or the other."""
    tokens = sum(c.by_tokens for c in cells) * 2 > len(cells)
    return [c for c in cells if c.by_tokens == tokens]


def static_bytes(c: Cell) -> int | None:
    parts = [c.part_bytes(k) for k in ("weights_bytes", "gradients_bytes", "optimizer_state_bytes")]
    return None if any(p is None for p in parts) else sum(parts)


def fit_memory_model(cells: list[Cell]) -> MemoryModel | None:
    cells = _one_dimension(cells)
    pts = [
        (peak_positions(c), c.peak_bytes, c.micro, static_bytes(c))
        for c in cells
        if c.ok and peak_positions(c) and c.peak_bytes is not None and c.micro
    ]
    xs = [p[0] for p in pts]
    if len(set(xs)) < 2:
        return None
    statics = [p[3] for p in pts]
    static = statistics.fmean(statics) if all(s is not None for s in statics) else None
    # the activations where every cell counts its parts (the R^2 then is theirs), else the peaks
    ys = [p[1] - p[3] for p in pts] if static is not None else [p[1] for p in pts]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (intercept + slope * x)) ** 2 for x, y in zip(xs, ys))
    r2 = 1 - ss_res / ss_tot if ss_tot else 1.0
    sd = math.sqrt(ss_res / (len(pts) - 2)) if len(pts) > 2 else 0.0
    # Positions per sample from the largest micro-batch measured: the longest sample in a batch
    # sets its padded width, and larger batches are likelier to hold a long one.
    largest = max(pts, key=lambda p: (p[2], p[0]))
    return MemoryModel(
        intercept + (static or 0.0), slope, r2, largest[0] / largest[2], len(pts), len(set(xs)), static, sd, mx, sxx
    )


@dataclass
class HeldOut:
    """A measured cell against the model fitted on its group's other cells."""

    cell: Cell
    predicted: float
    interval: tuple[float, float] | None

    @property
    def error(self) -> float:
        return self.predicted / self.cell.peak_bytes - 1


def held_out_checks(cells: list[Cell]) -> list[HeldOut]:
    """Each ok cell predicted by the model of the others, where they span MIN_SIZES widths."""
    out = []
    ok = [c for c in _one_dimension(cells) if c.ok and c.peak_bytes and c.micro]
    for c in ok:
        mm = fit_memory_model([o for o in ok if o is not c])
        if mm is not None and mm.sizes >= MIN_SIZES:
            out.append(HeldOut(c, mm.predict(c.micro), mm.interval(c.micro)))
    return out


@dataclass
class CheckpointingFactor:
    """Activations with gradient checkpointing over without, measured on cells that differ only in it."""

    factor: float  # median over the pairs
    pairs: list[tuple[Cell, Cell]]  # (without, with)
    backward_ratio: float | None  # backward seconds per sample, with over without (the recompute)


def checkpointing_factor(cells: list[Cell]) -> CheckpointingFactor | None:
    pairs: dict[tuple, dict[bool, Cell]] = defaultdict(dict)
    for c in cells:
        if c.ok and c.part_bytes("activations_bytes") and c.gradient_checkpointing is not None:
            rest = tuple(sorted(o for o in c.other_settings()[3] if "gradient_checkpointing" not in o))
            key = (c.model, c.mixed_precision, rest, c.by_tokens, c.micro, c.gradient_accumulation_steps)
            pairs[key][bool(c.gradient_checkpointing)] = c
    found = [(p[False], p[True]) for p in pairs.values() if len(p) == 2]
    if not found:
        return None
    factor = statistics.median(
        on.part_bytes("activations_bytes") / off.part_bytes("activations_bytes") for off, on in found
    )
    ratios = [
        on.phase_per_sample("backward") / off.phase_per_sample("backward")
        for off, on in found
        if on.phase_per_sample("backward") and off.phase_per_sample("backward")
    ]
    return CheckpointingFactor(factor, found, statistics.median(ratios) if ratios else None)
