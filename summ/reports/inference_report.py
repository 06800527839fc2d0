"""The inference report of a sweep of mode=predict jobs (preset=inference_speed): generation speed
against ROUGE for each setting, the change against the unquantized job, and a pick."""

from __future__ import annotations

from pathlib import Path

from summ.errors import Status
from summ.reports.knee import TOLERANCE
from summ.reports.plots import plot_inference
from summ.run_folder import INFERENCE_PNG, INFERENCE_REPORT, job_config, job_dirs, read_metrics, write_report


def _inference_rows(sweep_dir: Path) -> list[dict]:
    rows = []
    for d in job_dirs(sweep_dir):
        inf = job_config(d).get("inference") or {}
        found = read_metrics(d)
        m = found.record
        ev = (m.eval if m else None) or {}
        rows.append(
            {
                "job": d.name,
                "status": m.status if m else found.problem.split(":")[0],
                "error": m.error if m else found.problem,
                "quantization": inf.get("quantization"),
                "batch_size": ev.get("batch_size", inf.get("batch_size")),
                "sort_by_length": inf.get("sort_by_length"),
                "ms_per_sample": ev.get("generation_ms_per_sample"),
                "samples_per_s": ev.get("generation_samples_per_s"),
                "rouge_mean": ev.get("rouge_mean"),
                "weights_bytes": ((m.inference if m else None) or {}).get("model_bytes"),
                "n": ev.get("n"),
            }
        )
    return rows


def inference_report(sweep_dir: Path, tolerance: float = TOLERANCE) -> dict | None:
    """inference_report.md and inference.png: generation speed against ROUGE for each setting,
    the change against the unquantized cell of the same batch and ordering, and a pick: the
    fastest setting whose ROUGE mean is within `tolerance` (relative) of the best."""
    rows = _inference_rows(sweep_dir)
    ok = [r for r in rows if r["status"] == Status.ok and r["ms_per_sample"] and r["rouge_mean"] is not None]
    base = {(r["batch_size"], r["sort_by_length"]): r for r in ok if r["quantization"] == "none"}
    for r in ok:
        b = base.get((r["batch_size"], r["sort_by_length"]))
        r["rouge_change"] = r["rouge_mean"] - b["rouge_mean"] if b else None
        r["speedup"] = b["ms_per_sample"] / r["ms_per_sample"] if b else None
    pick = None
    if ok:
        best = max(r["rouge_mean"] for r in ok)
        pick = min((r for r in ok if r["rouge_mean"] >= best * (1 - tolerance)), key=lambda r: r["ms_per_sample"])
    lines = [
        f"# Inference speed against ROUGE: {sweep_dir}",
        "",
        "Each job generated the same dev summaries from the same trained weights (mode=predict). "
        "Speed-up and ROUGE change are against the unquantized job with the same batch and ordering.",
        "",
        "| job | quantization | batch | sorted by length | ms/sample | samples/s | ROUGE mean | ROUGE change | "
        "speed-up | weights (MiB) | status |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in sorted(rows, key=lambda r: (r["ms_per_sample"] is None, r["ms_per_sample"] or 0)):
        mark = " **pick**" if r is pick else ""
        lines.append(
            f"| {r['job']} | {r['quantization']} | {r['batch_size']} | {r['sort_by_length']} | "
            f"{fmt(r['ms_per_sample'], '.1f')} | {fmt(r['samples_per_s'], '.2f')} | {fmt(r['rouge_mean'], '.4f')} | "
            f"{fmt(r.get('rouge_change'), '+.4f')} | {fmt(r.get('speedup'), '.2f')} | "
            f"{fmt(r['weights_bytes'] and r['weights_bytes'] / 2**20, '.2f')} | {r['status']}{mark} |"
        )
    failed = [r for r in rows if r["status"] != Status.ok]
    lines += ["", "## Pick", ""]
    if pick:
        lines.append(
            f"{pick['quantization']}, batch {pick['batch_size']}, sorted by length {pick['sort_by_length']}: "
            f"{pick['ms_per_sample']:.1f} ms/sample at ROUGE mean {pick['rouge_mean']:.4f}, the fastest "
            f"setting within {tolerance:.0%} of the best ROUGE mean (`knee.tolerance`)."
        )
    else:
        lines.append("No job finished with both a speed and a ROUGE figure.")
    for r in failed:
        lines.append(f"- job {r['job']} ({r['quantization']}): {r['status']}: {r['error']}")
    write_report(sweep_dir, INFERENCE_REPORT, "\n".join(lines) + "\n")
    if ok:
        plot_inference(ok, pick, sweep_dir / INFERENCE_PNG)
    return pick
