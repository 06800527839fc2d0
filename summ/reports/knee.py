"""The knee analysis of a sweep's cells: the recommendation rule, memory-pressure flags and the
memory model (peak = a + b x micro-batch x padded positions). Pure functions of the cells, so a
recorded table replays exactly (tests, benchmarks, the knee sweeper's predictions).

The rule: among ok cells (under budget x headroom), the smallest micro-batch whose samples/s is
within `knee.tolerance` of the best; ties go to fewer accumulation steps.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field

from summ.config import KneeConfig
from summ.errors import MEMORY_STATUSES, Status
from summ.reports.cells import Cell
from summ.reports.memory_model import MemoryModel, fit_memory_model
from summ.run_folder import GIB

TOLERANCE = KneeConfig().tolerance  # the schema's knee.tolerance: a report made outside a sweep


PRESSURE_FRACTION = 0.9  # a peak above this share of the budget is memory pressure by itself


@dataclass
class Group:
    """Cells that differ only in how the batch is split (same precision, checkpointing, ...)."""

    label: str  # the other settings, "" when nothing else varies
    cells: list[Cell]
    recommended: Cell | None = None
    fastest: Cell | None = None
    memory_model: MemoryModel | None = None


@dataclass
class Analysis:
    cells: list[Cell]
    tolerance: float
    recommended: Cell | None
    fastest: Cell | None
    reason: str
    memory_model: MemoryModel | None  # the recommended cell's group's
    limit_bytes: int | None
    budget_bytes: int | None
    warnings: list[str]
    varied: list[str] = field(default_factory=list)  # settings that differ across cells, shown per cell
    groups: list[Group] = field(default_factory=list)

    def setting_text(self, c: Cell) -> str:
        s = c.settings()
        return " ".join(f"{k}={s.get(k, '-')}" for k in self.varied)

    @property
    def by_tokens(self) -> bool:
        """The size axis of the knee's plot and memory model: token budgets (batch.max_tokens) where
        the recommended cell has one (or, with none recommended, any cell), else micro-batches."""
        rec = self.recommended
        return rec.by_tokens if rec is not None else any(c.by_tokens for c in self.cells)

    @property
    def measured_largest_fitting(self) -> int | None:
        ok = [c.micro for c in self.cells if c.ok and c.micro and c.by_tokens == self.by_tokens]
        return max(ok) if ok else None

    @property
    def predicted_largest_fitting(self) -> int | None:
        """None unless the memory model predicts (MemoryModel.predicts): a poor fit predicts nothing."""
        mm = self.memory_model
        if mm is None or not self.limit_bytes or not mm.predicts:
            return None
        return mm.largest_fitting(self.limit_bytes)


def pressure_evidence(c: Cell) -> str | None:
    """Why a cell is under memory pressure, or None: the CUDA allocator retried (freed its cache to
    satisfy a request) or ran out, or the peak came within 10% of the budget."""
    if c.alloc_retries:
        return f"{c.alloc_retries} allocator retries"
    if c.num_ooms:
        return f"{c.num_ooms} out-of-memory events"
    if c.peak_bytes and c.budget_bytes and c.peak_bytes > PRESSURE_FRACTION * c.budget_bytes:
        return f"peak at {c.peak_bytes / c.budget_bytes:.0%} of the budget"
    return None


def _flag_memory_pressure(cells: list[Cell], tolerance: float) -> None:
    """A cell slower per sample than the next smaller micro-batch of its series (same
    accumulation, or same effective batch, and same other settings) while its memory rose, with
    evidence of pressure (pressure_evidence). A slowdown without that evidence is not memory's."""
    series: dict[tuple, list[Cell]] = defaultdict(list)
    for c in cells:
        if c.ok and c.micro:
            series[("accumulation", c.by_tokens, c.gradient_accumulation_steps, c.other_settings())].append(c)
            series[("effective", c.per_step, c.other_settings())].append(c)
    for members in series.values():
        members.sort(key=lambda c: c.micro)
        for prev, cur in zip(members, members[1:]):
            slower = cur.samples_per_s < prev.samples_per_s * (1 - tolerance) and not _overlap(cur, prev)
            if (
                cur.micro > prev.micro
                and slower
                and (cur.peak_bytes or 0) > (prev.peak_bytes or 0)
                and pressure_evidence(cur)
                and "memory pressure" not in cur.flags
            ):
                cur.flags.append("memory pressure")


def _overlap(a: Cell, b: Cell) -> bool:
    """The two cells' per-step rates overlap (interquartile ranges): a difference within the noise.
    Not for a token budget's per-step rates: its steps hold micro-batches of different widths, whose
    attention costs differ per position, so their spread is the work's, not noise (a budget's cell
    measured again is still read by its runs' means)."""
    if any(c.by_tokens and c.interval_of == "steps" for c in (a, b)):
        return False
    ia, ib = a.samples_per_s_interval, b.samples_per_s_interval
    return bool(ia and ib and ia[0] <= ib[1] and ib[0] <= ia[1])


def _sort_key(c: Cell) -> tuple:
    return (c.by_tokens, (c.per_step or ("", 0))[1], c.micro or 0, c.gradient_accumulation_steps or 0, c.job)


def varied_settings(cells: list[Cell]) -> list[str]:
    """Keys whose value is not the same in every cell (a grid's or a study's other dimensions)."""
    keys = sorted({k for c in cells for k in c.settings()})
    return [k for k in keys if len({c.settings().get(k) for c in cells}) > 1]


# Rows that stay in the table but leave the analysis: an earlier reading of a cell measured again,
# and a job that took the result of another job of the same sweep (an Optuna trial that repeated one)
SET_ASIDE = (Status.remeasured, Status.reused)


def _merge_repeats(cells: list[Cell]) -> None:
    """A cell measured again (the knee sweeper re-measures a drop before believing it): the last
    reading carries the mean of all of them (its interval then spans the readings' means), the
    earlier ones are flagged and leave the analysis. A job that only took another job's result is
    not a reading: it is marked reused and leaves the analysis, the job that measured stays."""
    by_hash: dict[str, list[Cell]] = defaultdict(list)
    for c in cells:
        if c.copy_of is not None and c.ok:
            c.status = Status.reused
            c.flags.append(f"the result of job {c.copy_of} (same config), not measured again")
        elif c.config_hash and c.ok:
            by_hash[c.config_hash].append(c)
    for repeats in by_hash.values():
        if len(repeats) < 2:
            continue
        last = repeats[-1]
        rates = [c.samples_per_s for c in repeats]
        last.samples_per_s = statistics.fmean(rates)
        last.samples_per_s_interval, last.interval_of = [min(rates), max(rates)], "runs"
        for c in repeats[:-1]:
            c.status = Status.remeasured
            c.flags.append(f"measured again in job {last.job}")


def _recommend(members: list[Cell], tolerance: float) -> tuple[Cell | None, Cell | None]:
    """(recommended, fastest) among the ok cells under budget: the rule of the module docstring;
    a cell whose rate interval overlaps the fastest's is a tie with it."""
    ok = [c for c in members if c.ok and (c.limit_bytes is None or (c.peak_bytes or 0) <= c.limit_bytes)]
    if not ok:
        return None, None
    fastest = max(ok, key=lambda c: c.samples_per_s)
    within = [c for c in ok if c.samples_per_s >= fastest.samples_per_s * (1 - tolerance) or _overlap(c, fastest)]
    return min(within, key=lambda c: (c.micro, c.gradient_accumulation_steps, c.samples_per_step or 0)), fastest


def analyse(cells: list[Cell], tolerance: float = TOLERANCE, warnings: list[str] | None = None) -> Analysis:
    """The knee of a sweep; the recommendation's reason is assembled from every finding in the
    order a reader checks them (the cell, its rivals, memory, padding, exclusions)."""
    cells = sorted(cells, key=_sort_key)
    warnings = list(warnings or [])
    for c in cells:
        c.flags = []
    _merge_repeats(cells)
    varied = varied_settings([c for c in cells if c.status not in SET_ASIDE])
    for c in cells:
        i = c.samples_per_s_interval
        if c.ok and i and c.interval_of == "steps" and not i[0] <= c.samples_per_s <= i[1]:
            c.flags.append("outside its interval")
    _flag_memory_pressure(cells, tolerance)
    limits = [c.limit_bytes for c in cells if c.limit_bytes]
    budgets = [c.budget_bytes for c in cells if c.budget_bytes]
    limit, budget = (min(limits) if limits else None), (min(budgets) if budgets else None)
    groups = _groups(cells, varied, tolerance)
    warnings += measurement_warnings(cells)
    best = max((g for g in groups if g.fastest), key=lambda g: g.fastest.samples_per_s, default=None)
    if best is None:
        return Analysis(
            cells,
            tolerance,
            None,
            None,
            "no cell finished ok: nothing to recommend",
            fit_memory_model(cells),
            limit,
            budget,
            warnings,
            varied,
            groups,
        )
    rec, fastest = best.recommended, best.fastest
    rec.flags.append("recommended")
    if fastest is not rec:
        fastest.flags.append("fastest")
    parts = [
        f"{rec.micro_text} x accumulation {rec.gradient_accumulation_steps} "
        f"({rec.step_text}){' with ' + best.label if best.label else ''} "
        f"trains at {rec.samples_per_s:.1f} samples/s"
    ]
    if rec is fastest:
        parts.append("the fastest cell measured")
    else:
        ratio = rec.samples_per_s / fastest.samples_per_s
        why = (
            f"within the {tolerance:.0%} tolerance"
            if ratio >= 1 - tolerance
            else f"outside the {tolerance:.0%} tolerance, but their per-step rates overlap: a tie within the noise"
        )
        parts.append(
            f"{ratio:.1%} of the fastest cell ({fastest.micro_text} x "
            f"{fastest.gradient_accumulation_steps}, {fastest.samples_per_s:.1f} samples/s), {why}, with "
            f"{gib_text(rec.peak_bytes)} peak memory against {gib_text(fastest.peak_bytes)}"
        )
    if rec.budget_fraction is not None:
        parts.append(
            f"its peak (the worst batch's) is {percent(rec.budget_fraction)} of the memory budget"
            + (" (the device's memory: no budget was set)" if rec.budget_source == "device capacity" else "")
        )
    effective = {c.per_step: c for c in cells if c.ok and c.status not in SET_ASIDE and c.per_step}
    if len(effective) > 1:
        sizes = [effective[k].step_text.removeprefix("effective ") for k in sorted(effective)]
        parts.append(
            f"the cells differ in effective batch ({', '.join(sizes)}): a different "
            f"effective batch changes the training itself (updates per epoch, the gradient noise, the "
            f"learning rate that suits it), not only its speed; check its quality (sweep.evaluate=true) "
            f"before adopting it"
        )
    parts += _slowdown_notes(cells, rec, tolerance)
    excluded = [c for c in cells if c.status in MEMORY_STATUSES]
    if excluded:
        parts.append(
            f"{len(excluded)} cell(s) did not fit ("
            + ", ".join(f"{c.split_text}: {c.status}" for c in excluded)
            + ") and were excluded"
        )
    return Analysis(
        cells,
        tolerance,
        rec,
        fastest,
        "; ".join(parts) + ".",
        best.memory_model,
        limit,
        budget,
        warnings,
        varied,
        groups,
    )


def _groups(cells: list[Cell], varied: list[str], tolerance: float) -> list[Group]:
    """One group per combination of the other settings, each with its own knee and memory model."""
    by_key: dict[tuple, list[Cell]] = defaultdict(list)
    for c in cells:
        if c.status not in SET_ASIDE:
            by_key[tuple(c.settings().get(k) for k in varied)].append(c)
    groups = []
    for key, members in by_key.items():
        label = " ".join(f"{k}={v if v is not None else '-'}" for k, v in zip(varied, key))
        rec, fastest = _recommend(members, tolerance)
        groups.append(Group(label, members, rec, fastest, fit_memory_model(members)))
    return groups


def _slowdown_notes(cells: list[Cell], rec: Cell, tolerance: float) -> list[str]:
    pressure = [c for c in cells if "memory pressure" in c.flags]
    notes = []
    if pressure:
        notes.append(
            "larger micro-batches were slower per sample under memory pressure ("
            + ", ".join(f"{c.split_text}: {pressure_evidence(c)}" for c in pressure)
            + "): past the knee, more samples per pass cost more than they save"
        )
    padded = [
        c
        for c in cells
        if c.ok
        and c.pad_fraction is not None
        and rec.pad_fraction is not None
        and c.micro
        and rec.micro
        and c.by_tokens == rec.by_tokens
        and c.micro > rec.micro
        and c.pad_fraction > rec.pad_fraction + 0.05
        and c.samples_per_s < rec.samples_per_s * (1 - tolerance)
    ]
    if padded:
        notes.append(
            f"padding grows with the micro-batch ({rec.pad_fraction:.0%} at the recommended cell, up to "
            f"{max(c.pad_fraction for c in padded):.0%}) and slows the larger ones: {padding_remedy(rec)}"
        )
    return notes


def padding_remedy(c: Cell) -> str:
    """What cuts the padding a cell measured."""
    if not c.by_tokens:
        return "data.group_by_length=true cuts it"
    return (
        "a token budget's micro-batches are cut from length-sorted buckets already; in a trial window the "
        "bucket is the window's own samples, so a larger budget mixes more lengths than a full epoch's "
        "buckets of 50 micro-batches (epoch s (proj.) counts a full epoch's padding): a larger "
        "sweep.trial_samples measures it more as an epoch pads"
    )


def measurement_warnings(cells: list[Cell]) -> list[str]:
    """What makes cells unfit to compare: another machine's load, different measured work."""
    out = [
        f"job {c.job} ({c.split_text}) was timed on a busy machine: other "
        f"processes competed for it, so its samples/s reads low; measure it again alone"
        for c in cells
        if c.busy
    ]
    work: dict = defaultdict(set)  # per model: another tokenizer reads the same samples as other tokens
    for c in cells:
        if c.ok and c.samples is not None:
            work[c.model].add((c.samples, c.tokens))
    for model, seen in sorted(work.items(), key=lambda kv: str(kv[0])):
        if len(seen) > 1:
            out.append(
                f"the {model} cells measured different samples ("
                + ", ".join(f"{s} samples / {t} tokens" for s, t in sorted(seen))
                + "): their rates compare less well; set "
                "measure.samples to a multiple of every cell's effective batch so that all measure the same ones"
            )
    said: dict[str, list[str]] = {}
    for c in cells:
        for text in c.caveats:
            said.setdefault(text, []).append(c.job)
    out += [
        (
            f"all {len(cells)} cells"
            if len(jobs) == len(cells)
            else "job" + ("s " if len(jobs) > 1 else " ") + ", ".join(jobs)
        )
        + f": {text}"
        for text, jobs in said.items()
    ]
    return out


def percent(fraction: float | None) -> str:
    """A share as people read it: 37%, 0.4% (not 0%), <0.1%."""
    if fraction is None:
        return "-"
    if 0 < fraction < 0.001:
        return "<0.1%"
    return f"{fraction:.1%}" if fraction < 0.1 else f"{fraction:.0%}"


def gib_text(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.3f} GiB"


def pareto_front(cells: list[Cell]) -> list[Cell]:
    """Ok cells with ROUGE that no other cell beats on both speed (seconds per sample, lower)
    and quality (ROUGE mean, higher); ordered from fastest to best ROUGE."""
    pts = [c for c in cells if c.ok and c.seconds_per_sample and c.rouge_mean is not None]
    front = [
        c
        for c in pts
        if not any(
            o.seconds_per_sample <= c.seconds_per_sample
            and o.rouge_mean >= c.rouge_mean
            and (o.seconds_per_sample < c.seconds_per_sample or o.rouge_mean > c.rouge_mean)
            for o in pts
        )
    ]
    return sorted(front, key=lambda c: c.seconds_per_sample)
