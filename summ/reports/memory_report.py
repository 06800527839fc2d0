"""The knee report's "Memory model" section: the recommended cell's memory by part, the fit its
group's cells give (summ/reports/memory_model.py), what it predicts for micro-batches not measured
and for gradient checkpointing switched, each with its interval, and how well it predicted the
cells that were measured (each against the model fitted without it)."""

from __future__ import annotations

import math
from pathlib import Path

from summ.reports.knee import Analysis, gib_text
from summ.reports.memory_model import MIN_R2, MIN_SIZES, CheckpointingFactor, checkpointing_factor, held_out_checks
from summ.reports.summary import parts_text, size_text
from summ.run_folder import GIB


def memory_model_section(a: Analysis, sweep_dir: Path) -> list[str]:
    lines = ["", "## Memory model", ""]
    rec = a.recommended
    if rec is not None and rec.components:
        lines += [
            f"The recommended cell's peak by part: {parts_text(rec.components)} (weights, gradients and "
            f"optimizer state counted from the tensors; activations the rest of the peak).",
            "",
        ]
    mm = a.memory_model
    if mm is None:
        return lines + [
            "Not enough ok cells with different micro-batch sizes (and the same other settings) to fit one."
        ]
    per = (
        f"{mm.positions_per_sample:.2f} padded positions per budget position in the largest budget"
        if a.by_tokens
        else f"{mm.positions_per_sample:.0f} padded positions per sample in the largest micro-batch"
    )
    if mm.fitted == "activations":
        lines.append(
            f"peak = {size_text(mm.static_bytes)} counted (weights, gradients, optimizer state) + activations; "
            f"activations = {size_text(mm.intercept - mm.static_bytes)} + {mm.slope:.0f} bytes x (micro-batch x "
            f"padded positions), R^2 = {mm.r2:.3f} over {mm.n} ok cells of the recommended cell's settings; "
            f"{per}."
        )
    else:
        lines.append(
            f"peak = {mm.intercept / GIB:.3f} GiB + {mm.slope:.0f} bytes x (micro-batch x padded positions); "
            f"{per}; "
            f"R^2 = {mm.r2:.3f} over {mm.n} ok cells of the recommended cell's settings."
        )
    if mm.sizes < MIN_SIZES:
        return lines + [
            "",
            f"Fitted through {mm.sizes} micro-batch widths: a line through two points fits them "
            f"exactly whatever memory does; measure {MIN_SIZES} or more to predict cells not measured.",
        ]
    if mm.r2 < MIN_R2:
        return lines + ["", f"R^2 is under {MIN_R2}: the fit is too poor to predict cells that were not measured."]
    if a.limit_bytes:
        lines += [
            "",
            f"Largest {_size_label(a)} predicted to fit the limit of {gib_text(a.limit_bytes)}: "
            f"**{a.predicted_largest_fitting}** (largest measured ok: {a.measured_largest_fitting}).",
        ]
    lines += _predicted_table(a)
    lines += _held_out(a)
    return lines + _checkpointing(a)


def _size_label(a: Analysis) -> str:
    return "batch.max_tokens" if a.by_tokens else "micro-batch"


def _interval_text(interval: tuple[float, float] | None) -> str:
    return "-" if interval is None else f"{gib_text(max(0.0, interval[0]))} - {gib_text(interval[1])}"


def _fits(a: Analysis, peak: float) -> str:
    return "-" if not a.limit_bytes else ("yes" if peak <= a.limit_bytes else "no")


def _predicted_table(a: Analysis) -> list[str]:
    mm = a.memory_model
    cells = [c for c in a.cells if c.micro and c.by_tokens == a.by_tokens]
    measured = {c.micro for c in cells if c.ok}
    top, low = max([c.micro for c in cells] or [1]), 0  # micro-batches from 1
    if a.by_tokens and cells:  # budgets from half the smallest measured
        low = max(1, int(math.log2(min(c.micro for c in cells))) - 1)
    candidates = sorted({c.micro for c in cells if not c.ok} | {2**k for k in range(low, int(math.log2(top)) + 2)})
    rows = [b for b in candidates if b not in measured]
    if not rows:
        return []
    lines = [
        "",
        "Predicted, not measured:",
        "",
        f"| {_size_label(a)} | predicted peak | 95% interval | fits the limit |",
        "|---:|---:|---|---|",
    ]
    for b in rows:
        p = mm.predict(b)
        lines.append(f"| {b} | {gib_text(p)} (predicted) | {_interval_text(mm.interval(b))} | {_fits(a, p)} |")
    return lines


def _held_out(a: Analysis) -> list[str]:
    group = next((g for g in a.groups if g.memory_model is a.memory_model), None)
    checks = held_out_checks(group.cells) if group is not None else []
    if not checks:
        return []
    worst = max(abs(h.error) for h in checks)
    lines = [
        "",
        f"Checked: each measured cell against the model fitted on the others (worst error {worst:.0%}):",
        "",
        "| cell | predicted peak | 95% interval | measured peak | error |",
        "|---|---:|---|---:|---:|",
    ]
    for h in checks:
        c = h.cell
        lines.append(
            f"| {c.split_text} | {gib_text(h.predicted)} | "
            f"{_interval_text(h.interval)} | {gib_text(c.peak_bytes)} | {h.error:+.1%} |"
        )
    return lines


def _checkpointing(a: Analysis) -> list[str]:
    factor, mm, rec = checkpointing_factor(a.cells), a.memory_model, a.recommended
    if mm is None or mm.fitted != "activations" or rec is None:
        return []
    if factor is None:
        return [
            "",
            "Gradient checkpointing switched: measure one cell with `model.gradient_checkpointing` flipped "
            "(same micro-batch) to measure its factor on activations; the switch is then predicted here.",
        ]
    return ["", _factor_text(factor), "", *_switched_table(a, factor)]


def _factor_text(f: CheckpointingFactor) -> str:
    off, on = f.pairs[0]
    text = (
        f"Gradient checkpointing multiplies the activations by {f.factor:.2f} (measured on {len(f.pairs)} pair(s); "
        f"{off.micro_text}: {size_text(off.part_bytes('activations_bytes'))} -> "
        f"{size_text(on.part_bytes('activations_bytes'))})"
    )
    if f.backward_ratio:
        text += f", and the backward pass (its recompute) by {f.backward_ratio:.2f} per sample"
    return text + "."


def _switched_table(a: Analysis, f: CheckpointingFactor) -> list[str]:
    mm, rec = a.memory_model, a.recommended
    on = bool(rec.gradient_checkpointing)
    scale = 1 / f.factor if on else f.factor
    lines = [
        f"The recommended cell's settings with checkpointing switched {'off' if on else 'on'} (activations x "
        f"{scale:.2f}, the counted parts as they are):",
        "",
        f"| {_size_label(a)} | predicted peak | 95% interval | fits the limit |",
        "|---:|---:|---|---|",
    ]
    own = [c.micro for c in a.cells if c.micro and c.by_tokens == a.by_tokens]
    sizes = sorted(set(own) | {2 * max(own)})
    for b in sizes:
        p = mm.static_bytes + scale * mm.activations(b)
        interval = mm.interval(b)
        scaled = None if interval is None else tuple(mm.static_bytes + scale * (x - mm.static_bytes) for x in interval)
        lines.append(f"| {b} | {gib_text(p)} (predicted) | {_interval_text(scaled)} | {_fits(a, p)} |")
    return lines
