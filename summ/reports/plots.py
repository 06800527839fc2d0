"""Figures: a run's steps (save_visualizations=true), a sweep's knee and Pareto front, and an
inference sweep's speed against ROUGE. Every axis says its unit.

    python -m summ.reports.plots RUN_DIR      # a run's figures again, from train_history.jsonl
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from summ.errors import MEMORY_STATUSES
from summ.files import atomic_write_bytes
from summ.run_folder import GIB, job_config, read_history

if TYPE_CHECKING:
    from summ.reports.cells import Cell
    from summ.reports.knee import Analysis


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def save_run_plots(history: list[dict], run_dir: Path, warmup_steps: int = 0, title: str = "") -> list[Path]:
    """loss.png (loss and learning rate), throughput.png (samples/s), memory.png (peak memory),
    each against the optimizer step. Returns the files written."""
    if not history:
        return []
    plt = _pyplot()
    steps = [h["step"] for h in history]
    written = []

    def finish(fig, ax, name: str, ylabel: str, subtitle: str) -> None:
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{subtitle}{' - ' + title if title else ''}", fontsize=10)
        if warmup_steps:
            ax.axvspan(
                0.5, warmup_steps + 0.5, color="gray", alpha=0.12, label=f"warm-up ({warmup_steps} steps, untimed)"
            )
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        save_png(fig, run_dir / name)
        plt.close(fig)
        written.append(run_dir / name)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [h["loss"] for h in history], "-", label="training loss")
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [h["lr"] for h in history], ":", color="gray")
    lr_ax.set_ylabel("learning rate (gray, dotted)")
    finish(fig, ax, "loss.png", "loss (mean token cross-entropy, nats)", "Training loss")

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [h["samples_per_s"] for h in history], "-", label="samples/s in the step")
    finish(fig, ax, "throughput.png", "throughput (samples/s)", "Training throughput per optimizer step")

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [(h.get("peak_mem_bytes") or 0) / GIB for h in history], "-", label="peak so far")
    ax.set_ylim(bottom=0)
    finish(fig, ax, "memory.png", "peak memory (GiB)", "Peak memory")
    return written


def plot_knee(a: Analysis, path: Path) -> None:
    """knee.png: samples/s and peak memory against micro-batch, budget and recommendation marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    _knee_curves(a, ax_s, ax_m)
    sizes = sorted({c.micro for c in a.cells if c.micro and c.by_tokens == a.by_tokens})
    if a.memory_model is not None:
        low = max(0, int(4 * (math.log2(min(sizes)) - 1))) if sizes else 0  # from half the smallest size
        xs = [2 ** (k / 4) for k in range(low, int(4 * math.log2(max(sizes) * 2)) + 1)] if sizes else []
        label = f"memory model (R²={a.memory_model.r2:.2f})"
        ax_m.plot(xs, [a.memory_model.predict(x) / GIB for x in xs], ":", color="gray", label=label)
    off_scale = _budget_lines(a, ax_m)
    if a.recommended is not None:
        star = dict(color="gold", markeredgecolor="black", markersize=18, label="recommended", zorder=5)
        ax_s.plot([a.recommended.micro], [a.recommended.samples_per_s], "*", **star)
        ax_m.plot([a.recommended.micro], [a.recommended.peak_bytes / GIB], "*", **star)
    for ax in (ax_s, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.set_xlabel(
            "batch.max_tokens (padded positions per forward pass)"
            if a.by_tokens
            else "micro-batch size (samples per forward pass)"
        )
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax_s.set_ylim(bottom=0)  # from zero: a 5% difference looks like 5%
    ax_s.set_ylabel("samples/s (bars: middle half of the steps)")
    ax_s.set_title("Throughput per sample")
    ax_m.set_ylabel("peak memory (GiB)")
    ax_m.set_title("Peak memory")
    if not off_scale:
        ax_m.set_ylim(bottom=0)
    fig.suptitle(f"Knee: {', '.join(sorted({c.model for c in a.cells if c.model}))}", fontsize=11)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def _knee_curves(a: Analysis, ax_s, ax_m) -> None:
    """One curve per accumulation on each panel: samples/s with its interquartile bars, peak
    memory, the cells that did not fit marked at the limit, memory pressure annotated."""
    by_ga: dict[int, list[Cell]] = defaultdict(list)
    for c in a.cells:
        if c.micro and c.gradient_accumulation_steps and c.by_tokens == a.by_tokens:
            by_ga[c.gradient_accumulation_steps].append(c)
    for ga, members in sorted(by_ga.items()):
        members.sort(key=lambda c: c.micro)
        okc = [c for c in members if c.ok]
        # the interquartile range of the per-step rates (of the runs' means for a cell measured
        # again): the overlaps the recommendation treats as ties are visible
        low = [
            max(0.0, c.samples_per_s - c.samples_per_s_interval[0]) if c.samples_per_s_interval else 0.0 for c in okc
        ]
        high = [
            max(0.0, c.samples_per_s_interval[1] - c.samples_per_s) if c.samples_per_s_interval else 0.0 for c in okc
        ]
        sizes, label = [c.micro for c in okc], f"accumulation {ga}"
        line = ax_s.errorbar(sizes, [c.samples_per_s for c in okc], yerr=[low, high], fmt="o-", capsize=3, label=label)
        color = line.lines[0].get_color()
        ax_m.plot(sizes, [c.peak_bytes / GIB for c in okc], "o-", color=color, label=label)
        bad = [c.micro for c in members if c.status in MEMORY_STATUSES]
        if bad and a.limit_bytes:
            marks = dict(color=color, markersize=10, mew=2, label=f"oom / over budget (accum. {ga})")
            ax_m.plot(bad, [a.limit_bytes / GIB] * len(bad), "x", **marks)
        for c in okc:
            if "memory pressure" in c.flags:
                where = dict(textcoords="offset points", xytext=(4, -12), fontsize=8, color="firebrick")
                ax_s.annotate("memory pressure", (c.micro, c.samples_per_s), **where)


def _budget_lines(a: Analysis, ax_m) -> bool:
    """The budget and budget x headroom on the memory panel; True when the budget is so far above
    the measured peaks that it is said in words instead (the curve stays readable)."""
    peaks = [c.peak_bytes / GIB for c in a.cells if c.ok and c.peak_bytes is not None]
    top = max(peaks, default=0.0)
    off_scale = bool(a.budget_bytes and top and a.budget_bytes / GIB > 4 * top)
    if off_scale:
        ax_m.set_ylim(0, top * 1.35)
        text = (
            f"budget {a.budget_bytes / GIB:.1f} GiB, budget x headroom {(a.limit_bytes or 0) / GIB:.1f} GiB "
            f"(above the plot)"
        )
        ax_m.text(0.02, 0.97, text, transform=ax_m.transAxes, va="top", fontsize=8)
        return True
    if a.budget_bytes:
        ax_m.axhline(a.budget_bytes / GIB, color="black", linewidth=1.2, label="memory budget")
    if a.limit_bytes:
        ax_m.axhline(a.limit_bytes / GIB, color="black", linestyle="--", linewidth=1, label="budget x headroom")
    return False


def plot_pareto(cells: list[Cell], front: list[Cell], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [c for c in cells if c.ok and c.rouge_mean is not None]
    fig, ax = plt.subplots(figsize=(7, 4.8))
    ax.scatter(
        [1000 * c.seconds_per_sample for c in scored],
        [c.rouge_mean for c in scored],
        color="tab:blue",
        label="evaluated cell",
    )
    ax.plot(
        [1000 * c.seconds_per_sample for c in front],
        [c.rouge_mean for c in front],
        "o-",
        color="tab:red",
        label="Pareto front",
    )
    for c in front:
        ax.annotate(
            f"{c.micro}{' tok' if c.by_tokens else ''}x{c.gradient_accumulation_steps}",
            (1000 * c.seconds_per_sample, c.rouge_mean),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    ax.set_xlabel("training cost (ms per sample, lower is better)")
    ax.set_ylabel("ROUGE mean of R1/R2/RL F1 (higher is better)")
    ax.set_title("Speed against quality")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def plot_inference(ok: list[dict], pick: dict | None, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for q in sorted({r["quantization"] for r in ok}):
        pts = [r for r in ok if r["quantization"] == q]
        ax.scatter([r["ms_per_sample"] for r in pts], [r["rouge_mean"] for r in pts], label=q, s=40)
        for r in pts:
            ax.annotate(
                f"b{r['batch_size']}{'' if r['sort_by_length'] else ' unsorted'}",
                (r["ms_per_sample"], r["rouge_mean"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    if pick:
        ax.plot(
            [pick["ms_per_sample"]],
            [pick["rouge_mean"]],
            "*",
            color="gold",
            markeredgecolor="black",
            markersize=16,
            label="pick",
            zorder=5,
        )
    times = [r["ms_per_sample"] for r in ok]
    log_scale = max(times) / min(times) > 20  # a log axis only where the settings span decades
    if log_scale:
        from matplotlib.ticker import ScalarFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("generation time (ms per sample" + (", log scale)" if log_scale else ")"))
    ax.set_ylabel("ROUGE mean (F1 of ROUGE-1/2/L)")
    ax.set_title("Inference settings: speed against ROUGE", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, title="quantization")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m summ.reports.plots", description="a run's figures again, from train_history.jsonl"
    )
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    cfg = job_config(run_dir)
    written = save_run_plots(
        read_history(run_dir),
        run_dir,
        (cfg.get("measure") or {}).get("warmup_steps", 0),
        title=(cfg.get("model") or {}).get("name", ""),
    )
    if not written:
        print(f"error: {run_dir} has no train_history.jsonl: give a training run's folder", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
