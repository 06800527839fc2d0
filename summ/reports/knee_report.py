"""The knee report of a sweep: which micro-batch x accumulation trains fastest per sample
within the memory budget, and why. Built from the job folders alone, so it can be rebuilt at any
time (summ-report <sweep_dir>, or python -m summ.reports.knee_report); a Hydra callback writes it at the end
of every multirun (summ/sweeps/callbacks.py). Writes sweep.csv, knee_report.md and knee.png
(and pareto_report.md, pareto.png where cells were evaluated) into the sweep folder.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
from collections import defaultdict
from pathlib import Path

from summ.console import OneLineParser
from summ.errors import Status, UserError
from summ.figures import PHASES
from summ.reports.cells import Cell, load_cells
from summ.reports.knee import (
    SET_ASIDE,
    TOLERANCE,
    Analysis,
    analyse,
    gib_text,
    pareto_front,
    percent,
)
from summ.reports.memory_report import memory_model_section
from summ.reports.plots import plot_knee, plot_pareto
from summ.reports.why import why_lines
from summ.run_folder import (
    FINAL_DIR,
    KNEE_PNG,
    KNEE_REPORT,
    METRICS_FILE,
    MULTIRUN_YAML,
    PARETO_PNG,
    PARETO_REPORT,
    SWEEP_CSV,
    job_dirs,
    read_metrics,
    read_yaml,
    write_report,
)

log = logging.getLogger(__name__)


def _f(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


CSV_COLUMNS = [
    "job",
    "overrides",
    "status",
    "error",
    "model",
    "batch_size",
    "max_tokens",
    "gradient_accumulation_steps",
    "effective_batch_size",
    "mixed_precision",
    "gradient_checkpointing",
    "optimizer",
    "attention",
    "samples",
    "tokens",
    "samples_per_s",
    "samples_per_s_interval",
    "tokens_per_s",
    "pad_fraction",
    "seconds_per_sample",
    "step_time_s_median",
    "step_time_s_p90",
    "peak_bytes",
    "observed_peak_bytes",
    "probe_peak_bytes",
    "capacity_fraction",
    "budget_fraction",
    "alloc_retries",
    "busy",
    "epoch_seconds_projected",
    "mfu",
    "hfu",
    "eval_loss",
    "rouge1",
    "rouge2",
    "rougeL",
    "rouge_mean",
    "flags",
]


# A column per memory component (memory_<part>, bytes) and per phase (<phase>_s_per_sample)
PART_COLUMNS = [
    "weights_bytes",
    "trainable_bytes",
    "gradients_bytes",
    "optimizer_state_bytes",
    "activations_bytes",
    "logits_bytes",
    "loss_float32_rows_bytes",
    "allocator_reserve_bytes",
    "eval_peak_bytes",
]


def sweep_csv(a: Analysis) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    parts = [f"memory_{k}" for k in PART_COLUMNS]
    phases = [f"{p}_s_per_sample" for p in PHASES]
    w.writerow(CSV_COLUMNS[:3] + ["settings"] + CSV_COLUMNS[3:] + parts + phases)
    for c in a.cells:
        row = [a.setting_text(c)]
        for col in CSV_COLUMNS:
            v = getattr(c, col)
            if col == "samples_per_s_interval" and v:
                v = f"{v[0]:.3f}-{v[1]:.3f}"
            row.append(" ".join(v) if col == "overrides" else ";".join(v) if col == "flags" else "" if v is None else v)
        row += ["" if c.part_bytes(k) is None else c.part_bytes(k) for k in PART_COLUMNS]
        row += ["" if c.phase_per_sample(p) is None else f"{c.phase_per_sample(p):.6g}" for p in PHASES]
        w.writerow(row[1:4] + row[:1] + row[4:])
    return buf.getvalue()


def knee_markdown(a: Analysis, sweep_dir: Path) -> str:
    """knee_report.md: its sections in the order a reader meets them."""
    lines = [f"# Knee report: {sweep_dir}", ""]
    models = sorted({c.model for c in a.cells if c.model})
    lines.append(
        f"Model: {', '.join(models) or '-'}. {_budget_text(a)}, stop limit (budget x headroom): "
        f"{gib_text(a.limit_bytes)}. {_count_text(a)}."
    )
    for section in (_recommendation, _why, _cells_table, _same_effective_batch, memory_model_section):
        lines += section(a, sweep_dir)
    if a.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in a.warnings]
    lines += ["", "Files: `sweep.csv` (one row per job), `knee.png` (samples/s and peak memory against micro-batch)."]
    return "\n".join(lines) + "\n"


def _why(a: Analysis, sweep_dir: Path) -> list[str]:
    """One sentence per step of the grid: how the per-sample cost moved, and why (summ/reports/why.py)."""
    lines = why_lines(a.cells, a.tolerance, a.setting_text if a.varied else None)
    if not lines:
        return []
    head = [
        "",
        "## Why",
        "",
        "Each step of the grid (a doubling of the micro-batch at fixed accumulation, or a split of a "
        "fixed effective batch) with the cause its figures show, memory by part (`memory.components`) "
        "and time by phase (`train.phase_seconds`) in each cell's metrics record:",
        "",
    ]
    return head + [f"- {line}" for line in lines]


def _budget_text(a: Analysis) -> str:
    sources = {c.budget_source for c in a.cells if c.budget_bytes}
    if sources == {"device capacity"}:
        return (
            f"Memory budget: none set (measure.memory_budget_gb), so the device's own memory: "
            f"{gib_text(a.budget_bytes)}"
        )
    return f"Memory budget: {gib_text(a.budget_bytes)}"


def _count_text(a: Analysis) -> str:
    """Jobs, and what became of them: ok, set aside (measured again, or a copy), anything else."""
    by_status: dict[str, int] = defaultdict(int)
    for c in a.cells:
        by_status[Status.ok if c.ok else c.status] += 1
    words = {
        Status.remeasured: "measured again later (merged into the last reading)",
        Status.reused: "took another job's result (same config)",
    }
    parts = [f"{n} {words.get(s, s)}" for s, n in sorted(by_status.items(), key=lambda kv: kv[0] != Status.ok)]
    return f"Jobs: {len(a.cells)} ({', '.join(parts)})"


def _recommendation(a: Analysis, sweep_dir: Path) -> list[str]:
    lines = ["", "## Recommendation", ""]
    if a.recommended is None:
        return lines + [a.reason]
    r = a.recommended
    lines.append(f"**{r.micro_text} x accumulation {r.gradient_accumulation_steps}** (job {r.job}): {a.reason}")
    if len([g for g in a.groups if g.recommended]) > 1:
        lines += ["", "Each combination of the other settings has its own knee:", ""]
        for g in sorted((g for g in a.groups if g.recommended), key=lambda g: -g.fastest.samples_per_s):
            lines.append(
                f"- {g.label}: {g.recommended.micro_text} x {g.recommended.gradient_accumulation_steps} "
                f"at {g.recommended.samples_per_s:.1f} samples/s (its fastest: {g.fastest.samples_per_s:.1f})"
            )
    lines += [
        "",
        f"Rule: among ok cells under budget x headroom, the smallest micro-batch whose samples/s is within "
        f"{a.tolerance:.0%} (`knee.tolerance`) of the best, or whose per-step rates overlap the best's "
        f"(a tie within the noise); ties go to fewer accumulation steps. Peak memory is the worst of the "
        f"steps measured and a probe batch at the training set's widest samples.",
    ]
    sweeper = ((read_yaml(sweep_dir / MULTIRUN_YAML) or {}).get("hydra") or {}).get("sweeper") or {}
    if "optuna" in str(sweeper.get("_target_", "")).lower():
        lines += [
            "",
            "An Optuna search: its best trial (the lowest objective over the whole study, this folder's "
            "cells and earlier ones) is written to `best_overrides.txt` as a command. The rule above "
            "instead takes the smallest micro-batch within the tolerance among this folder's cells, so "
            "the two can differ; the settings column shows what else each cell changed.",
        ]
    return lines + _final_run(sweep_dir)


def _final_run(sweep_dir: Path) -> list[str]:
    """sweep.then_train's run of the recommended cell, where it trained (summ/sweeps/then_train.py)."""
    m = read_metrics(sweep_dir / FINAL_DIR).record
    if m is None:
        return []
    cell = m.recommended_cell or {}
    job = cell.get("job", "?")
    text = f"The recommended cell (job {job}) trained for its full schedule: [`{FINAL_DIR}/`]({FINAL_DIR}/)"
    if m.status != Status.ok:
        return ["", f"{text}, which ended {m.status}: {m.error}"]
    steps = m.train.total_optimizer_steps if m.train else 0
    rouge = f", ROUGE-1/2/L {m.eval['rouge1']:.4f} / {m.eval['rouge2']:.4f} / {m.eval['rougeL']:.4f}" if m.eval else ""
    return ["", f"{text}, {steps:,} optimizer steps{rouge}; its model in `{FINAL_DIR}/model`."]


def _rate(c: Cell) -> str:
    if c.samples_per_s is None:
        return "-"
    i = c.samples_per_s_interval
    runs = "runs " if c.interval_of == "runs" else ""
    return f"{c.samples_per_s:.2f}" + (f" ({runs}{i[0]:.1f}-{i[1]:.1f})" if i else "")


def _cells_table(a: Analysis, sweep_dir: Path) -> list[str]:
    lines = [
        "",
        "## Cells",
        "",
        "Ordered by effective batch, then micro-batch. Per-sample cost is the figure to compare; step time "
        "grows with the work per step and says little alone. samples/s: the measured samples over the measured "
        'time, with the interquartile range of the per-step rates ("runs": the range of the means of a cell '
        "measured more than once). **outside its interval**: a few steps were far slower (or faster) than the "
        "middle half, and they weigh in the total time; compare step s median and p90 in sweep.csv. A token "
        "budget's cell (batch.max_tokens) shows its budget as the micro-batch and its measured mean samples a "
        "step as the effective batch.",
        "",
        "| eff. batch | micro-batch | accum. | "
        + ("settings | " if a.varied else "")
        + "status | samples/s | tokens/s | pad | ms/sample | step s (median) "
        "| peak memory | % of budget | epoch s (proj.) | ROUGE mean | notes |",
        "|---:|---:|---:|" + ("---|" if a.varied else "") + "---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in a.cells:
        notes = ", ".join(f"**{f}**" for f in c.flags + (["busy machine"] if c.busy else []))
        if c.error and not c.ok:
            notes = (notes + "; " if notes else "") + c.error.replace("|", "/")
        settings = f"| {a.setting_text(c)} " if a.varied else ""
        lines.append(
            f"| {_effective_cell(c)} | {f'{c.max_tokens} tokens' if c.by_tokens else c.batch_size or '-'} "
            f"| {c.gradient_accumulation_steps or '-'} "
            f"{settings}| {c.status} | {_rate(c)} | {_f(c.tokens_per_s, '.0f')} | {_f(c.pad_fraction, '.0%')} "
            f"| {_f(c.seconds_per_sample and 1000 * c.seconds_per_sample, '.2f')} "
            f"| {_f(c.step_time_s_median, '.3f')} | {gib_text(c.peak_bytes)} | {percent(c.budget_fraction)} "
            f"| {_f(c.epoch_seconds_projected, '.0f')} | {_f(c.rouge_mean, '.4f')} | {notes} |"
        )
    return lines


def _effective_cell(c: Cell) -> str:
    """The effective batch column: a token budget's measured mean samples a step."""
    if c.effective_batch_size or not c.by_tokens:
        return str(c.effective_batch_size or "-")
    return f"{c.samples_per_step:.1f} (mean)" if c.samples_per_step else "-"


def _same_effective_batch(a: Analysis, sweep_dir: Path) -> list[str]:
    groups: dict[tuple, list[Cell]] = defaultdict(list)
    for c in a.cells:
        if c.per_step and c.status not in SET_ASIDE:
            groups[(c.per_step, a.setting_text(c))].append(c)
    same = {k: v for k, v in groups.items() if len(v) > 1}
    if not same:
        return []
    lines = [
        "",
        "## Same effective batch, different split",
        "",
        "Same samples (or token budget) per optimizer step: same work per update; only micro-batch x "
        "accumulation differs.",
        "",
    ]
    for ((unit, eff), settings), members in sorted(same.items()):
        best = max((c.samples_per_s for c in members if c.ok), default=None)
        parts = [
            f"{c.split_text}: "
            + (
                f"{c.samples_per_s:.1f} samples/s ({c.samples_per_s / best:.0%} of best), {gib_text(c.peak_bytes)}"
                if c.ok and best
                else c.status
            )
            for c in sorted(members, key=lambda c: c.micro or 0)
        ]
        what = f"{eff} tokens a step" if unit == "tokens" else f"effective {eff}"
        lines.append(f"- {what}{' (' + settings + ')' if settings else ''}: " + "; ".join(parts))
    return lines


def _describe(c: Cell) -> str:
    rest = [
        o
        for o in c.overrides
        if not o.startswith(("batch.batch_size=", "batch.max_tokens=", "batch.gradient_accumulation_steps=", "preset="))
    ]
    return c.split_text + (f" ({' '.join(rest)})" if rest else "")


def pareto_markdown(cells: list[Cell], front: list[Cell], sweep_dir: Path) -> str:
    scored = [c for c in cells if c.ok and c.rouge_mean is not None]
    lines = [
        f"# Speed against quality: {sweep_dir}",
        "",
        f"{len(scored)} evaluated cells; {len(front)} on the Pareto front (no other cell is both faster per "
        f"sample and better on ROUGE mean).",
        "",
        "| job | micro-batch x accum. (other settings) | ms/sample | samples/s | ROUGE-1 | ROUGE-2 | ROUGE-L "
        "| ROUGE mean | on the front |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in sorted(scored, key=lambda c: c.seconds_per_sample):
        lines.append(
            f"| {c.job} | {_describe(c)} | {1000 * c.seconds_per_sample:.2f} | {_f(c.samples_per_s, '.1f')} "
            f"| {_f(c.rouge1, '.4f')} | {_f(c.rouge2, '.4f')} | {_f(c.rougeL, '.4f')} | {c.rouge_mean:.4f} "
            f"| {'**yes**' if c in front else ''} |"
        )
    return "\n".join(lines) + "\n"


def _tolerance_from_sweep(sweep_dir: Path) -> float | None:
    cfg = read_yaml(sweep_dir / MULTIRUN_YAML) or {}
    return (cfg.get("knee") or {}).get("tolerance")


def build_report(sweep_dir: str | Path, tolerance: float | None = None) -> Analysis:
    """Read every job folder under sweep_dir and write sweep.csv, knee_report.md and knee.png."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir}: no such sweep folder")
    if tolerance is None:
        tolerance = _tolerance_from_sweep(sweep_dir)
        tolerance = TOLERANCE if tolerance is None else tolerance
    cells, warnings = load_cells(sweep_dir)
    for w in warnings:
        log.warning(w)
    a = analyse(cells, tolerance, warnings)
    write_report(sweep_dir, SWEEP_CSV, sweep_csv(a))
    write_report(sweep_dir, KNEE_REPORT, knee_markdown(a, sweep_dir))
    if any(c.ok for c in a.cells):
        plot_knee(a, sweep_dir / KNEE_PNG)
    front = pareto_front(a.cells)
    if front:  # cells were evaluated: speed against quality too
        write_report(sweep_dir, PARETO_REPORT, pareto_markdown(a.cells, front, sweep_dir))
        plot_pareto(a.cells, front, sweep_dir / PARETO_PNG)
    return a


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in [0, 1) (0.05 = within 5% of the best)")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="summ-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="a multirun folder (holds one numbered folder per job)")
    parser.add_argument(
        "--tolerance",
        type=_fraction,
        default=None,
        help=f"samples/s tolerance of the recommendation rule (default: the sweep's knee.tolerance, or {TOLERANCE})",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    folder = Path(args.sweep_dir)
    if (folder / METRICS_FILE).is_file():  # a single run (a K-fold run's fold_<k>/ are its members, not cells)
        print(
            f"error: {folder} is a run's folder, not a sweep's: summ-report reads a sweep's job folders "
            f"(outputs/multirun/<date_time>); summ-compare {folder} shows one run",
            file=sys.stderr,
        )
        return 2
    if folder.is_dir() and not job_dirs(folder):
        print(
            f"error: {folder} holds no job folders (0/, 1/, ... with {METRICS_FILE}): give the folder of a sweep, "
            f"such as outputs/multirun/<date_time>",
            file=sys.stderr,
        )
        return 2
    try:
        a = build_report(args.sweep_dir, args.tolerance)
    except (FileNotFoundError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print((Path(args.sweep_dir) / KNEE_REPORT).read_text(encoding="utf-8"))
    return 0 if a.cells else 1


if __name__ == "__main__":
    sys.exit(main())
