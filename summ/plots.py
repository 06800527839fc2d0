"""Figures of one run (save_visualizations=true) and the inference-speed report of a sweep of
mode=predict jobs (preset=inference_speed). Every axis says its unit.

    python -m summ.plots RUN_DIR          # the run figures again, from train_history.jsonl
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional

from summ.io import atomic_write_text
from summ.report import GiB, job_dirs, read_yaml, save_png

log = logging.getLogger(__name__)

RUN_PLOTS = ("loss.png", "throughput.png", "memory.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_history(run_dir: Path) -> list[dict]:
    from summ.io import read_jsonl
    from summ.train import HISTORY_FILE

    return read_jsonl(run_dir / HISTORY_FILE)


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
            ax.axvspan(0.5, warmup_steps + 0.5, color="gray", alpha=0.12, label=f"warm-up ({warmup_steps} steps, untimed)")
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
    ax.plot(steps, [(h.get("peak_mem_bytes") or 0) / GiB for h in history], "-", label="peak so far")
    ax.set_ylim(bottom=0)
    finish(fig, ax, "memory.png", "peak memory (GiB)", "Peak memory")
    return written


# --------------------------------------------------------------------------- inference sweep


def _inference_rows(sweep_dir: Path) -> list[dict]:
    rows = []
    for d in job_dirs(sweep_dir):
        cfg = read_yaml(d / ".hydra" / "config.yaml") or {}
        inf = cfg.get("inference") or {}
        try:
            m = json.loads((d / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            m = {"status": "missing", "error": "no readable metrics.json"}
        ev = m.get("eval") or {}
        rows.append({"job": d.name, "status": m.get("status"), "error": m.get("error"),
                     "quantization": inf.get("quantization"), "batch_size": ev.get("batch_size", inf.get("batch_size")),
                     "sort_by_length": inf.get("sort_by_length"), "ms_per_sample": ev.get("generation_ms_per_sample"),
                     "samples_per_s": ev.get("generation_samples_per_s"), "rouge_mean": ev.get("rouge_mean"),
                     "weights_bytes": (m.get("inference") or {}).get("model_bytes"), "n": ev.get("n")})
    return rows


def inference_report(sweep_dir: Path, tolerance: float = 0.05) -> Optional[dict]:
    """inference_report.md and inference.png: generation speed against ROUGE for each setting,
    the change against the unquantized cell of the same batch and ordering, and a pick: the
    fastest setting whose ROUGE mean is within `tolerance` (relative) of the best."""
    rows = _inference_rows(sweep_dir)
    ok = [r for r in rows if r["status"] == "ok" and r["ms_per_sample"] and r["rouge_mean"] is not None]
    base = {(r["batch_size"], r["sort_by_length"]): r for r in ok if r["quantization"] == "none"}
    for r in ok:
        b = base.get((r["batch_size"], r["sort_by_length"]))
        r["rouge_change"] = r["rouge_mean"] - b["rouge_mean"] if b else None
        r["speedup"] = b["ms_per_sample"] / r["ms_per_sample"] if b else None
    pick = None
    if ok:
        best = max(r["rouge_mean"] for r in ok)
        pick = min((r for r in ok if r["rouge_mean"] >= best * (1 - tolerance)), key=lambda r: r["ms_per_sample"])
    lines = [f"# Inference speed against ROUGE: {sweep_dir}", "",
             "Each job generated the same dev summaries from the same trained weights (mode=predict). "
             "Speed-up and ROUGE change are against the unquantized job with the same batch and ordering.", "",
             "| job | quantization | batch | sorted by length | ms/sample | samples/s | ROUGE mean | ROUGE change | "
             "speed-up | weights (MiB) | status |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in sorted(rows, key=lambda r: (r["ms_per_sample"] is None, r["ms_per_sample"] or 0)):
        mark = " **pick**" if r is pick else ""
        lines.append(f"| {r['job']} | {r['quantization']} | {r['batch_size']} | {r['sort_by_length']} | "
                     f"{fmt(r['ms_per_sample'], '.1f')} | {fmt(r['samples_per_s'], '.2f')} | {fmt(r['rouge_mean'], '.4f')} | "
                     f"{fmt(r.get('rouge_change'), '+.4f')} | {fmt(r.get('speedup'), '.2f')} | "
                     f"{fmt(r['weights_bytes'] and r['weights_bytes'] / 2**20, '.2f')} | {r['status']}{mark} |")
    failed = [r for r in rows if r["status"] != "ok"]
    lines += ["", "## Pick", ""]
    if pick:
        lines.append(f"{pick['quantization']}, batch {pick['batch_size']}, sorted by length {pick['sort_by_length']}: "
                     f"{pick['ms_per_sample']:.1f} ms/sample at ROUGE mean {pick['rouge_mean']:.4f}, the fastest "
                     f"setting within {tolerance:.0%} of the best ROUGE mean (`knee.tolerance`).")
    else:
        lines.append("No job finished with both a speed and a ROUGE figure.")
    for r in failed:
        lines.append(f"- job {r['job']} ({r['quantization']}): {r['status']}: {r['error']}")
    atomic_write_text(sweep_dir / "inference_report.md", "\n".join(lines) + "\n")
    if ok:
        _plot_inference(ok, pick, sweep_dir / "inference.png")
    return pick


def _plot_inference(ok: list[dict], pick: Optional[dict], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for q in sorted({r["quantization"] for r in ok}):
        pts = [r for r in ok if r["quantization"] == q]
        ax.scatter([r["ms_per_sample"] for r in pts], [r["rouge_mean"] for r in pts], label=q, s=40)
        for r in pts:
            ax.annotate(f"b{r['batch_size']}{'' if r['sort_by_length'] else ' unsorted'}",
                        (r["ms_per_sample"], r["rouge_mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if pick:
        ax.plot([pick["ms_per_sample"]], [pick["rouge_mean"]], "*", color="gold", markeredgecolor="black",
                markersize=16, label="pick", zorder=5)
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


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m summ.plots", description="the run figures from train_history.jsonl")
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    cfg = read_yaml(run_dir / ".hydra" / "config.yaml") or {}
    written = save_run_plots(read_history(run_dir), run_dir, (cfg.get("measure") or {}).get("warmup_steps", 0),
                             title=(cfg.get("model") or {}).get("name", ""))
    if not written:
        print(f"error: {run_dir} has no train_history.jsonl: give a training run's folder", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
