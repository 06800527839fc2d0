"""The knee report of a sweep: which micro-batch x accumulation trains fastest per sample
within the memory budget, and why.

Built from the job folders alone (each holds metrics.json and .hydra/), so it can be rebuilt
at any time:  python -m summ.report <sweep_dir> [--tolerance 0.05]
A Hydra callback (KneeReportCallback, on by default in conf/config.yaml) runs it at the end
of every multirun. Writes sweep.csv, knee_report.md and knee.png into the sweep folder.

The rule, documented in the report itself: among ok cells (under budget x headroom), the
smallest micro-batch whose samples/s is within `knee.tolerance` of the best; ties go to fewer
accumulation steps. A cell is flagged **memory pressure** when, against the next smaller
micro-batch of its series (same accumulation, or same effective batch, and same other
settings), its samples/s falls by more than the tolerance while its peak memory rises.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from summ.io import atomic_write_text

log = logging.getLogger(__name__)

GiB = 2**30
OK = "ok"
REPORT_FILES = ("sweep.csv", "knee_report.md", "knee.png")


@dataclass
class Cell:
    job: str
    overrides: list[str]
    status: str
    error: Optional[str] = None
    model: Optional[str] = None
    batch_size: Optional[int] = None
    gradient_accumulation_steps: Optional[int] = None
    effective_batch_size: Optional[int] = None
    mixed_precision: Optional[str] = None
    gradient_checkpointing: Optional[bool] = None
    samples_per_s: Optional[float] = None
    tokens_per_s: Optional[float] = None
    seconds_per_sample: Optional[float] = None
    step_time_s_median: Optional[float] = None
    step_time_s_p90: Optional[float] = None
    peak_bytes: Optional[int] = None
    capacity_fraction: Optional[float] = None
    budget_bytes: Optional[int] = None
    limit_bytes: Optional[int] = None
    positions: Optional[int] = None  # padded positions of the largest micro-batch
    pad_fraction: Optional[float] = None  # share of the positions that were padding
    epoch_seconds_projected: Optional[float] = None
    mfu: Optional[float] = None
    eval_loss: Optional[float] = None
    rouge1: Optional[float] = None
    rouge2: Optional[float] = None
    rougeL: Optional[float] = None
    rouge_mean: Optional[float] = None
    flags: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == OK and bool(self.samples_per_s)

    @property
    def budget_fraction(self) -> Optional[float]:
        if self.peak_bytes is None or not self.budget_bytes:
            return None
        return self.peak_bytes / self.budget_bytes

    def settings(self) -> dict[str, str]:
        """The cell's own overrides other than the batch split (preset and Hydra's keys aside)."""
        out = {}
        for o in self.overrides:
            key, _, value = o.lstrip("+~").partition("=")
            if not key.startswith(("batch.batch_size", "batch.gradient_accumulation_steps",
                                   "batch.effective_batch_size", "hydra.", "preset")):
                out[key] = value
        return out

    def other_settings(self) -> tuple:
        """Everything that defines the cell except how the batch is split."""
        rest = tuple(sorted(o for o in self.overrides if not o.split("=", 1)[0].lstrip("+~").startswith("batch.")))
        return (self.model, self.mixed_precision, self.gradient_checkpointing, rest)


# --------------------------------------------------------------------------- reading


def job_dirs(sweep_dir: Path) -> list[Path]:
    dirs = [d for d in sweep_dir.iterdir() if d.is_dir() and ((d / ".hydra").is_dir() or (d / "metrics.json").exists())]
    return sorted(dirs, key=lambda d: (0, int(d.name)) if d.name.isdigit() else (1, d.name))


def read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


METRICS_FILE = "metrics.json"  # every job's result (summ.train writes it)


def load_cells(sweep_dir: Path) -> tuple[list[Cell], list[str]]:
    """One Cell per job folder; a missing or corrupt metrics.json becomes a warning and a row."""
    cells, warnings = [], []
    for d in job_dirs(sweep_dir):
        cell, warning = read_job(d, f"job {d.name}")
        cells.append(cell)
        if warning:
            warnings.append(warning)
    return cells, warnings


def read_job(d: Path, label: str) -> tuple[Cell, Optional[str]]:
    """A job or run folder as a Cell, and a warning (`label`: how to name it) when its
    metrics.json is missing or unreadable: then the Cell comes from its .hydra config."""
    overrides = read_yaml(d / ".hydra" / "overrides.yaml") or []
    try:
        m = json.loads((d / METRICS_FILE).read_text(encoding="utf-8"))
        if not isinstance(m, dict) or not isinstance(m.get("status"), str):
            raise ValueError("no status field")
        _check_figures(m)
    except FileNotFoundError:
        return _from_config(d, overrides, "missing"), f"{label}: no {METRICS_FILE} (the job did not finish)"
    except (OSError, ValueError) as exc:
        return _from_config(d, overrides, "corrupt"), f"{label}: metrics.json is corrupt ({exc}); skipped"
    return cell_from_metrics(d.name, overrides, m), None


# The figures a report reads, each a number (or null) in a sound metrics.json.
NUMBERS = {"": ("batch_size", "gradient_accumulation_steps", "effective_batch_size", "epoch_seconds_projected", "mfu"),
           "train": ("samples_per_s", "tokens_per_s", "seconds_per_sample", "step_time_s_median", "step_time_s_p90",
                     "max_micro_batch_positions", "pad_fraction"),
           "memory": ("peak_bytes", "fraction", "budget_bytes", "limit_bytes"),
           "eval": ("loss", "rouge1", "rouge2", "rougeL", "rouge_mean")}


def _check_figures(m: dict) -> None:
    """ValueError naming the first figure that is not a number (a hand-edited or foreign file)."""
    for section, keys in NUMBERS.items():
        node = m.get(section) if section else m
        if node is None:
            continue
        if not isinstance(node, dict):
            raise ValueError(f"{section} is not an object")
        for key in keys:
            value = node.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{section + '.' if section else ''}{key} is {value!r}, not a number")


def _from_config(d: Path, overrides: list[str], status: str) -> Cell:
    cfg = read_yaml(d / ".hydra" / "config.yaml") or {}
    batch = cfg.get("batch") or {}
    bs, ga = batch.get("batch_size"), batch.get("gradient_accumulation_steps")
    return Cell(job=d.name, overrides=overrides, status=status, model=(cfg.get("model") or {}).get("name"),
                batch_size=bs, gradient_accumulation_steps=ga, effective_batch_size=bs * ga if bs and ga else None)


def cell_from_metrics(job: str, overrides: list[str], m: dict) -> Cell:
    t, mem, ev = m.get("train") or {}, m.get("memory") or {}, m.get("eval") or {}
    return Cell(
        job=job, overrides=overrides, status=m["status"], error=m.get("error"), model=m.get("model"),
        batch_size=m.get("batch_size"), gradient_accumulation_steps=m.get("gradient_accumulation_steps"),
        effective_batch_size=m.get("effective_batch_size"), mixed_precision=m.get("mixed_precision"),
        gradient_checkpointing=m.get("gradient_checkpointing"), samples_per_s=t.get("samples_per_s"),
        tokens_per_s=t.get("tokens_per_s"), seconds_per_sample=t.get("seconds_per_sample"),
        step_time_s_median=t.get("step_time_s_median"), step_time_s_p90=t.get("step_time_s_p90"),
        peak_bytes=mem.get("peak_bytes"), capacity_fraction=mem.get("fraction"), budget_bytes=mem.get("budget_bytes"),
        limit_bytes=mem.get("limit_bytes"), positions=t.get("max_micro_batch_positions"),
        pad_fraction=t.get("pad_fraction"),
        epoch_seconds_projected=m.get("epoch_seconds_projected"), mfu=m.get("mfu"), eval_loss=ev.get("loss"),
        rouge1=ev.get("rouge1"), rouge2=ev.get("rouge2"), rougeL=ev.get("rougeL"), rouge_mean=ev.get("rouge_mean"))


# --------------------------------------------------------------------------- analysis


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
                     f"{_gib(rec.peak_bytes)} peak memory against {_gib(fastest.peak_bytes)}")
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


# --------------------------------------------------------------------------- writing


def _gib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / GiB:.3f} GiB"


def _f(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


CSV_COLUMNS = ["job", "overrides", "status", "error", "model", "batch_size", "gradient_accumulation_steps",
               "effective_batch_size", "mixed_precision", "gradient_checkpointing", "samples_per_s", "tokens_per_s",
               "pad_fraction",
               "seconds_per_sample", "step_time_s_median", "step_time_s_p90", "peak_bytes", "capacity_fraction",
               "budget_fraction", "epoch_seconds_projected", "mfu", "eval_loss", "rouge1", "rouge2", "rougeL", "rouge_mean",
               "flags"]


def sweep_csv(a: Analysis) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS[:3] + ["settings"] + CSV_COLUMNS[3:])
    for c in a.cells:
        row = [a.setting_text(c)]
        for col in CSV_COLUMNS:
            v = getattr(c, col)
            row.append(" ".join(v) if col == "overrides" else ";".join(v) if col == "flags" else "" if v is None else v)
        w.writerow(row[1:4] + row[:1] + row[4:])
    return buf.getvalue()


def knee_markdown(a: Analysis, sweep_dir: Path) -> str:
    lines = [f"# Knee report: {sweep_dir}", ""]
    models = sorted({c.model for c in a.cells if c.model})
    lines.append(f"Model: {', '.join(models) or '-'}. Memory budget: {_gib(a.budget_bytes)}, "
                 f"stop limit (budget x headroom): {_gib(a.limit_bytes)}. "
                 f"Cells: {len(a.cells)} ({sum(c.ok for c in a.cells)} ok).")
    lines += ["", "## Recommendation", ""]
    if a.recommended:
        lines.append(f"**micro-batch {a.recommended.batch_size} x accumulation "
                     f"{a.recommended.gradient_accumulation_steps}** (job {a.recommended.job}): {a.reason}")
        if a.fastest is not None:
            lines.append("")
            lines.append(f"Fastest cell overall: micro-batch {a.fastest.batch_size} x accumulation "
                         f"{a.fastest.gradient_accumulation_steps} at {a.fastest.samples_per_s:.1f} samples/s "
                         f"(job {a.fastest.job}).")
    else:
        lines.append(a.reason)
    lines += ["", f"Rule: among ok cells under budget x headroom, the smallest micro-batch whose samples/s is "
                  f"within {a.tolerance:.0%} (`knee.tolerance`) of the best; ties go to fewer accumulation steps."]
    sweeper = ((read_yaml(sweep_dir / "multirun.yaml") or {}).get("hydra") or {}).get("sweeper") or {}
    if "optuna" in str(sweeper.get("_target_", "")).lower():
        lines += ["", "An Optuna search: its best trial (the lowest objective over the whole study, this folder's "
                      "cells and earlier ones) is written to `best_overrides.txt` as a command. The rule above "
                      "instead takes the smallest micro-batch within the tolerance among this folder's cells, so "
                      "the two can differ; the settings column shows what else each cell changed."]
    lines += [
              "", "## Cells", "",
              "", "## Cells", "",
              "Ordered by effective batch, then micro-batch. Per-sample cost is the figure to compare; "
              "step time grows with the work per step and says little alone.", "",
              "| eff. batch | micro-batch | accum. | " + ("settings | " if a.varied else "")
              + "status | samples/s | tokens/s | pad | ms/sample | step s (median) "
              "| peak memory | % of budget | epoch s (proj.) | ROUGE mean | notes |",
              "|---:|---:|---:|" + ("---|" if a.varied else "") + "---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in a.cells:
        notes = ", ".join(f"**{f}**" for f in c.flags)
        if c.error and not c.ok:
            notes = (notes + "; " if notes else "") + c.error.replace("|", "/")
        settings = f"| {a.setting_text(c)} " if a.varied else ""
        lines.append(f"| {c.effective_batch_size or '-'} | {c.batch_size or '-'} | {c.gradient_accumulation_steps or '-'} "
                     f"{settings}| {c.status} | {_f(c.samples_per_s, '.2f')} | {_f(c.tokens_per_s, '.0f')} | {_f(c.pad_fraction, '.0%')} "
                     f"| {_f(c.seconds_per_sample and 1000 * c.seconds_per_sample, '.2f')} "
                     f"| {_f(c.step_time_s_median, '.3f')} | {_gib(c.peak_bytes)} | {_f(c.budget_fraction, '.0%')} "
                     f"| {_f(c.epoch_seconds_projected, '.0f')} | {_f(c.rouge_mean, '.4f')} | {notes} |")
    groups: dict[int, list[Cell]] = defaultdict(list)
    for c in a.cells:
        if c.effective_batch_size:
            groups[c.effective_batch_size].append(c)
    same = {k: v for k, v in groups.items() if len(v) > 1}
    if same:
        lines += ["", "## Same effective batch, different split", "",
                  "Same samples per optimizer step (same work per update); only micro-batch x accumulation differs.", ""]
        for eff, members in sorted(same.items()):
            best = max((c.samples_per_s for c in members if c.ok), default=None)
            parts = []
            for c in sorted(members, key=lambda c: c.batch_size or 0):
                if c.ok and best:
                    parts.append(f"{c.batch_size} x {c.gradient_accumulation_steps}: {c.samples_per_s:.1f} samples/s "
                                 f"({c.samples_per_s / best:.0%} of best), {_gib(c.peak_bytes)}")
                else:
                    parts.append(f"{c.batch_size} x {c.gradient_accumulation_steps}: {c.status}")
            lines.append(f"- effective {eff}: " + "; ".join(parts))
    lines += ["", "## Memory model", ""]
    mm = a.memory_model
    if mm is None:
        lines.append("Not enough ok cells with different micro-batch sizes to fit one.")
    else:
        lines.append(f"peak = {mm.intercept / GiB:.3f} GiB + {mm.slope:.0f} bytes x (micro-batch x padded positions); "
                     f"{mm.positions_per_sample:.0f} padded positions per sample in the largest micro-batch; "
                     f"R^2 = {mm.r2:.3f} over {mm.n} ok cells.")
        if a.limit_bytes:
            lines.append("")
            lines.append(f"Largest micro-batch predicted to fit the limit of {_gib(a.limit_bytes)}: "
                         f"**{a.predicted_largest_fitting}** (largest measured ok: {a.measured_largest_fitting}).")
        measured = {c.batch_size for c in a.cells if c.ok}
        top = max([c.batch_size for c in a.cells if c.batch_size] or [1])
        candidates = sorted({c.batch_size for c in a.cells if c.batch_size and not c.ok}
                            | {2 ** k for k in range(0, int(math.log2(top)) + 2)})
        rows = [b for b in candidates if b not in measured]
        if rows:
            lines += ["", "Predicted, not measured:", "", "| micro-batch | predicted peak | fits the limit |",
                      "|---:|---:|---|"]
            for b in rows:
                p = mm.predict(b)
                fits = "-" if not a.limit_bytes else ("yes" if p <= a.limit_bytes else "no")
                lines.append(f"| {b} | {_gib(p)} (predicted) | {fits} |")
    if a.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in a.warnings]
    lines += ["", "Files: `sweep.csv` (one row per job), `knee.png` (samples/s and peak memory against micro-batch)."]
    return "\n".join(lines) + "\n"


def plot(a: Analysis, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    by_ga: dict[int, list[Cell]] = defaultdict(list)
    for c in a.cells:
        if c.batch_size and c.gradient_accumulation_steps:
            by_ga[c.gradient_accumulation_steps].append(c)
    for ga, members in sorted(by_ga.items()):
        members.sort(key=lambda c: c.batch_size)
        okc = [c for c in members if c.ok]
        line, = ax_s.plot([c.batch_size for c in okc], [c.samples_per_s for c in okc], "o-",
                          label=f"accumulation {ga}")
        ax_m.plot([c.batch_size for c in okc], [c.peak_bytes / GiB for c in okc], "o-", color=line.get_color(),
                  label=f"accumulation {ga}")
        bad = [c for c in members if c.status in ("oom", "over_budget")]
        if bad and a.limit_bytes:
            ax_m.plot([c.batch_size for c in bad], [a.limit_bytes / GiB] * len(bad), "x", color=line.get_color(),
                      markersize=10, mew=2, label=f"oom / over budget (accum. {ga})")
        for c in okc:
            if "memory pressure" in c.flags:
                ax_s.annotate("memory pressure", (c.batch_size, c.samples_per_s), textcoords="offset points",
                              xytext=(4, -12), fontsize=8, color="firebrick")
    if a.memory_model is not None:
        sizes = sorted({c.batch_size for c in a.cells if c.batch_size})
        xs = [2 ** (k / 4) for k in range(0, int(4 * math.log2(max(sizes) * 2)) + 1)] if sizes else []
        ax_m.plot(xs, [a.memory_model.predict(x) / GiB for x in xs], ":", color="gray",
                  label=f"memory model (R²={a.memory_model.r2:.2f})")
    peaks = [c.peak_bytes / GiB for c in a.cells if c.ok and c.peak_bytes is not None]
    top = max(peaks, default=0.0)
    off_scale = bool(a.budget_bytes and top and a.budget_bytes / GiB > 4 * top)
    if off_scale:  # keep the measured curve readable; say where the budget is
        ax_m.set_ylim(0, top * 1.35)
        ax_m.text(0.02, 0.97, f"budget {a.budget_bytes / GiB:.1f} GiB, budget x headroom "
                  f"{(a.limit_bytes or 0) / GiB:.1f} GiB (above the plot)", transform=ax_m.transAxes,
                  va="top", fontsize=8)
    else:
        if a.budget_bytes:
            ax_m.axhline(a.budget_bytes / GiB, color="black", linewidth=1.2, label="memory budget")
        if a.limit_bytes:
            ax_m.axhline(a.limit_bytes / GiB, color="black", linestyle="--", linewidth=1, label="budget x headroom")
    r = a.recommended
    if r is not None:
        ax_s.plot([r.batch_size], [r.samples_per_s], "*", color="gold", markeredgecolor="black", markersize=18,
                  label="recommended", zorder=5)
        ax_m.plot([r.batch_size], [r.peak_bytes / GiB], "*", color="gold", markeredgecolor="black", markersize=18,
                  label="recommended", zorder=5)
    sizes = sorted({c.batch_size for c in a.cells if c.batch_size})
    for ax in (ax_s, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.set_xlabel("micro-batch size (samples per forward pass)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax_s.set_ylabel("training throughput (samples/s)")
    ax_s.set_title("Throughput per sample")
    ax_m.set_ylabel("peak memory (GiB)")
    ax_m.set_title("Peak memory")
    if not off_scale:
        ax_m.set_ylim(bottom=0)
    fig.suptitle(f"Knee: {', '.join(sorted({c.model for c in a.cells if c.model}))}", fontsize=11)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def pareto_front(cells: list[Cell]) -> list[Cell]:
    """Ok cells with ROUGE that no other cell beats on both speed (seconds per sample, lower)
    and quality (ROUGE mean, higher); ordered from fastest to best ROUGE."""
    pts = [c for c in cells if c.ok and c.seconds_per_sample and c.rouge_mean is not None]
    front = [c for c in pts if not any(
        o.seconds_per_sample <= c.seconds_per_sample and o.rouge_mean >= c.rouge_mean
        and (o.seconds_per_sample < c.seconds_per_sample or o.rouge_mean > c.rouge_mean) for o in pts)]
    return sorted(front, key=lambda c: c.seconds_per_sample)


def _describe(c: Cell) -> str:
    rest = [o for o in c.overrides
            if not o.startswith(("batch.batch_size=", "batch.gradient_accumulation_steps=", "preset="))]
    return f"{c.batch_size} x {c.gradient_accumulation_steps}" + (f" ({' '.join(rest)})" if rest else "")


def pareto_markdown(cells: list[Cell], front: list[Cell], sweep_dir: Path) -> str:
    scored = [c for c in cells if c.ok and c.rouge_mean is not None]
    lines = [f"# Speed against quality: {sweep_dir}", "",
             f"{len(scored)} evaluated cells; {len(front)} on the Pareto front (no other cell is both faster per "
             f"sample and better on ROUGE mean).", "",
             "| job | micro-batch x accum. (other settings) | ms/sample | samples/s | ROUGE-1 | ROUGE-2 | ROUGE-L "
             "| ROUGE mean | on the front |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for c in sorted(scored, key=lambda c: c.seconds_per_sample):
        lines.append(f"| {c.job} | {_describe(c)} | {1000 * c.seconds_per_sample:.2f} | {_f(c.samples_per_s, '.1f')} "
                     f"| {_f(c.rouge1, '.4f')} | {_f(c.rouge2, '.4f')} | {_f(c.rougeL, '.4f')} | {c.rouge_mean:.4f} "
                     f"| {'**yes**' if c in front else ''} |")
    return "\n".join(lines) + "\n"


def plot_pareto(cells: list[Cell], front: list[Cell], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [c for c in cells if c.ok and c.rouge_mean is not None]
    fig, ax = plt.subplots(figsize=(7, 4.8))
    ax.scatter([1000 * c.seconds_per_sample for c in scored], [c.rouge_mean for c in scored], color="tab:blue",
               label="evaluated cell")
    ax.plot([1000 * c.seconds_per_sample for c in front], [c.rouge_mean for c in front], "o-", color="tab:red",
            label="Pareto front")
    for c in front:
        ax.annotate(f"{c.batch_size}x{c.gradient_accumulation_steps}", (1000 * c.seconds_per_sample, c.rouge_mean),
                    textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("training cost (ms per sample, lower is better)")
    ax.set_ylabel("ROUGE mean of R1/R2/RL F1 (higher is better)")
    ax.set_title("Speed against quality")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def save_png(fig, path: Path) -> None:
    from summ.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def _tolerance_from_sweep(sweep_dir: Path) -> Optional[float]:
    cfg = read_yaml(sweep_dir / "multirun.yaml") or {}
    return (cfg.get("knee") or {}).get("tolerance")


def build_report(sweep_dir: str | Path, tolerance: Optional[float] = None) -> Analysis:
    """Read every job folder under sweep_dir and write sweep.csv, knee_report.md and knee.png."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir}: no such sweep folder")
    if tolerance is None:
        tolerance = _tolerance_from_sweep(sweep_dir)
        tolerance = 0.05 if tolerance is None else tolerance
    cells, warnings = load_cells(sweep_dir)
    for w in warnings:
        log.warning(w)
    a = analyse(cells, tolerance, warnings)
    atomic_write_text(sweep_dir / "sweep.csv", sweep_csv(a))
    atomic_write_text(sweep_dir / "knee_report.md", knee_markdown(a, sweep_dir))
    if any(c.ok for c in a.cells):
        plot(a, sweep_dir / "knee.png")
    front = pareto_front(a.cells)
    if front:  # cells were evaluated: speed against quality too
        atomic_write_text(sweep_dir / "pareto_report.md", pareto_markdown(a.cells, front, sweep_dir))
        plot_pareto(a.cells, front, sweep_dir / "pareto.png")
    return a


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a hard dependency
    Callback = object  # type: ignore[misc,assignment]


class KneeReportCallback(Callback):
    """When a multirun ends: the knee report (or, for mode=predict jobs, the inference report) in
    the sweep folder, the study's best command, and the exit code: non-zero when the report cannot
    be written or no job ended ok (the jobs' own folders keep their results either way)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        from summ.app import say
        from summ.distributed import is_main_process
        from summ.errors import EXIT_FAILED, RESOURCE_STATUSES, exit_code

        if not is_main_process():
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            say(f"error: the sweep folder {sweep_dir} does not exist, so no report was written: the jobs ran in "
                f"other folders (a hydra.sweep.dir that names a new folder per job?)", err=True)
            sys.exit(EXIT_FAILED)
        predict = config.get("mode") == "predict"
        try:
            if predict:  # an inference sweep: speed against ROUGE, not a knee
                from summ.plots import inference_report

                inference_report(sweep_dir, config.get("knee", {}).get("tolerance", 0.05))
                statuses = [c.status for c in load_cells(sweep_dir)[0]]
            else:
                a = build_report(sweep_dir, tolerance=config.get("knee", {}).get("tolerance"))
                statuses = [c.status for c in a.cells]
        except Exception as exc:
            say(f"error: the {'inference' if predict else 'knee'} report could not be written in {sweep_dir} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); the jobs' results are "
                f"kept: rebuild it with python -m summ.report {sweep_dir}", err=True)
            sys.exit(EXIT_FAILED)
        if predict:
            say(f"\ninference report: {sweep_dir / 'inference_report.md'}")
        else:
            log.info("knee report: %s", sweep_dir / "knee_report.md")
            say(f"\nknee report: {sweep_dir / 'knee_report.md'}\n{a.reason}")
            from summ.study import write_best

            command = write_best(config, sweep_dir)
            if command:
                say(f"best trial of the study ({sweep_dir / 'best_overrides.txt'}):\n  {command}")
        if OK not in statuses:
            kinds = sorted(set(statuses)) or ["no job"]
            say(f"error: no job of the sweep ended ok ({', '.join(kinds)}): see the notes in "
                f"{sweep_dir / ('inference_report.md' if predict else 'knee_report.md')}", err=True)
            resource = statuses and all(s in RESOURCE_STATUSES for s in statuses)
            sys.exit(exit_code("oom") if resource else EXIT_FAILED)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in [0, 1) (0.05 = within 5% of the best)")
    return value


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m summ.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="a multirun folder (holds one numbered folder per job)")
    parser.add_argument("--tolerance", type=_fraction, default=None,
                        help="samples/s tolerance of the recommendation rule (default: the sweep's knee.tolerance, or 0.05)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    from summ.errors import UserError

    try:
        a = build_report(args.sweep_dir, args.tolerance)
    except (FileNotFoundError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print((Path(args.sweep_dir) / "knee_report.md").read_text(encoding="utf-8"))
    return 0 if a.cells else 1


if __name__ == "__main__":
    sys.exit(main())
