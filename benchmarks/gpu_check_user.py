"""The GPU check's sections that do what a user does first (benchmarks/gpu_check.py runs them).

0. The README's GPU commands, end to end through run.py, on hub-shaped folders (config.json,
   safetensors weights and a tokenizer, written with save_pretrained; random weights): a
   KoBART-shaped full fine-tune with evaluation and generation, a Llama-3.2-3B-shaped QLoRA run,
   then `python run.py -m preset=knee_grid measure.memory_budget_gb=24` on the Llama-shaped folder,
   its sweep.csv and knee report read back: every cell ok, oom or over_budget, none failed. The
   Llama run's metrics.json also feeds section 2 (its FLOPs per token against an independent count).
5. A failed cell leaves nothing behind: one sweep process (sweep.reuse_loaded on) runs KoBART-shaped
   cells ok, out of memory (a failpoint in a backward, one in a forward, and a real allocator
   failure under a memory cap), ok again: each cell's allocated and reserved memory at its start,
   which must stay within 2% of the first cell's.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import ROOT, compose, fmt, gib, release, table
from gpu_check_runs import kobart, kobart_shape, llama_shape

from summ.errors import MEMORY_STATUSES, Status


def build_folders(ctx, where: Path) -> dict[str, Path]:
    """Hub-shaped model folders with random weights, built once on the device (bf16) and written
    with save_pretrained, the tokenizer beside them (summ's tiny tokenizer: Korean BPE, 4,000 ids).
    Their shapes are the other sections' (gpu_check_runs: common.SHAPES, or its toy under --cpu-smoke)."""
    import torch
    from transformers import BartForConditionalGeneration, LlamaForCausalLM

    from summ.modeling import models

    tok = models.tiny_tokenizer()
    shapes = {
        "kobart": (BartForConditionalGeneration, kobart_shape(ctx.args).hf_config(tok)),
        "llama": (LlamaForCausalLM, llama_shape(ctx.args).hf_config(tok)),
    }
    folders = {}
    for name, (cls, config) in shapes.items():
        folder = where / name
        start = time.perf_counter()
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16 if name == "llama" else torch.float32)
        try:
            with ctx.device:
                model = cls(config)
        finally:
            torch.set_default_dtype(previous)
        model.save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
        del model
        release()
        folders[name] = folder
        print(f"{name}-shaped folder written in {time.perf_counter() - start:.1f} s: {folder}", flush=True)
    return folders


def _cli(args: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    return proc, time.perf_counter() - start


def _errors(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    return (lines[-1] if lines else proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "")[:300]


def readme_commands(ctx) -> dict:
    """Section 0: the README's GPU commands on hub-shaped folders, through run.py."""
    folders = ctx.hub_folders = build_folders(ctx, ctx.scratch / "models")
    cpu = ["train.cpu=true"] if ctx.args.cpu_smoke else []
    runs = ctx.scratch / "runs"
    commands = _readme_command_args(ctx.args, folders, cpu, runs)
    out: dict[str, Any] = {"folders": {k: str(v) for k, v in folders.items()}}
    ctx.user_llama_run = runs / "llama"  # section 2 reads its FLOPs
    rows = []
    for name, args in commands.items():
        out[name], row = _readme_command(ctx, name, args, runs / name)
        rows.append(row)
    out["knee_grid"] = grid = knee_grid(ctx, folders["llama"], cpu)
    said = (grid["error"] or grid["recommendation"] or "")[:80]
    statuses = ",".join(s or "?" for s in grid["statuses"]) or "-"
    command = "python run.py -m preset=knee_grid measure.memory_budget_gb=24"
    rows.append([command, grid["returncode"], statuses, "-", "-", f"{grid['seconds']:.0f}", said])
    header = ["command", "exit", "status", "samples/s", "peak GiB", "s", "error / recommendation"]
    print(table([[str(x) for x in r] for r in rows], header))
    ok = (
        all(out[n]["status"] == Status.ok for n in commands)
        and grid["returncode"] == 0
        and grid["statuses"]
        and grid["cells_failed"] == 0
        and set(grid["statuses"]) <= {Status.ok, *MEMORY_STATUSES}
    )
    out["target_met"] = bool(ok)
    if not ok:
        raise RuntimeError(f"the README's commands did not all end well: {json.dumps(out, default=str)[:800]}")
    return out


def _readme_command_args(a, folders: dict, cpu: list[str], runs: Path) -> dict[str, list[str]]:
    """The README's two real-model commands, at a check's size (few steps, synthetic data)."""
    data = ["data=synthetic", f"data.synthetic_train_size={a.user_train_size}", "data.synthetic_eval_size=16"]
    steps = [f"measure.steps={a.user_steps}", "measure.warmup_steps=2"]
    return {
        "kobart": [
            "model=kobart",
            f"model.path={folders['kobart']}",
            "batch=bs16_ga1",
            "train.mixed_precision=bf16",
            "train.learning_rate=1e-5",
            *steps,
            "data.max_eval_samples=16",
            "inference.max_new_tokens=16",
            *data,
            *cpu,
            f"hydra.run.dir={runs / 'kobart'}",
        ],
        "llama": [
            "model=llama",
            f"model.path={folders['llama']}",
            "batch=bs8_ga1",
            "train.mixed_precision=bf16",
            "train.learning_rate=2e-4",
            *steps,
            "eval.enabled=false",
            *data,
            *cpu,
            f"hydra.run.dir={runs / 'llama'}",
        ],
    }


def _readme_command(ctx, name: str, args: list[str], run_dir: Path) -> tuple[dict, list]:
    """One command through run.py: its record and its row of the section's table."""
    proc, seconds = _cli(args, timeout=max(60.0, ctx.left()))
    file = run_dir / "metrics.json"
    metrics = json.loads(file.read_text()) if file.is_file() else {}
    t, mem, ev = metrics.get("train") or {}, metrics.get("memory") or {}, metrics.get("eval") or {}
    record = {
        "returncode": proc.returncode,
        "seconds": seconds,
        "status": metrics.get("status"),
        "error": metrics.get("error") or (_errors(proc) if proc.returncode else None),
        "samples_per_s": t.get("samples_per_s"),
        "peak_bytes": mem.get("peak_bytes"),
        "probe_peak_bytes": mem.get("probe_peak_bytes"),
        "mfu": metrics.get("mfu"),
        "flops_per_token": t.get("flops_per_token"),
        "rouge_mean": ev.get("rouge_mean"),
        "generation_ms_per_sample": ev.get("generation_ms_per_sample"),
        "run_dir": str(run_dir),
    }
    row = [
        f"python run.py model={name} model.path=...",
        proc.returncode,
        metrics.get("status", "-"),
        fmt(t.get("samples_per_s"), ".1f"),
        gib(mem.get("peak_bytes")),
        f"{seconds:.0f}",
        (record["error"] or "")[:80],
    ]
    return record, row


def knee_grid(ctx, llama: Path, cpu: list[str]) -> dict:
    """`python run.py -m preset=knee_grid measure.memory_budget_gb=24` on the Llama-shaped folder,
    its sweep.csv and knee report read back."""
    a, smoke = ctx.args, ctx.args.cpu_smoke
    sweep = ctx.scratch / "knee_grid"
    grid = (
        ["batch.batch_size=2,4", "batch.gradient_accumulation_steps=1"]
        if smoke
        else (["batch.batch_size=4,16", "batch.gradient_accumulation_steps=1"] if a.quick else [])
    )
    proc, seconds = _cli(
        [
            "-m",
            "preset=knee_grid",
            "model=llama",
            f"model.path={llama}",
            "train.mixed_precision=bf16",
            f"measure.memory_budget_gb={a.budget_gb if not smoke else 24}",
            f"sweep.trial_samples={a.user_trial_samples}",
            f"sweep.trial_warmup_samples={a.user_trial_warmup_samples}",
            f"data.synthetic_train_size={a.user_train_size}",
            *grid,
            *cpu,
            f"hydra.sweep.dir={sweep}",
        ],
        timeout=max(60.0, ctx.left()),
    )
    cells = list(csv.DictReader((sweep / "sweep.csv").open())) if (sweep / "sweep.csv").is_file() else []
    statuses = [c.get("status") for c in cells]
    report = (sweep / "knee_report.md").read_text() if (sweep / "knee_report.md").is_file() else ""
    return {
        "returncode": proc.returncode,
        "seconds": seconds,
        "cells": len(cells),
        "statuses": statuses,
        "cells_failed": sum(s == Status.failed for s in statuses),
        "recommendation": next((line for line in report.splitlines() if "ecommend" in line), None),
        "error": _errors(proc) if proc.returncode else None,
        "sweep_dir": str(sweep),
    }


def failed_cells_leave_nothing(ctx) -> dict:
    """Section 5: cells of one sweep process, ok / out of memory / ok ..., each cell's memory at its start."""
    import torch

    from summ import failpoints
    from summ.measure.memory import MemoryMonitor
    from summ.pipeline import run_job
    from summ.training import reuse

    a = ctx.args
    small, big = a.isolation_small, a.isolation_big
    window = [
        "batch.gradient_accumulation_steps=1",
        "measure.steps=2",
        "measure.warmup_steps=1",
        f"data.synthetic_train_size={a.epoch_train_size}",
    ]
    plan = [
        ("ok", small, None, []),
        ("oom in a backward", big, "oom@backward:step=3", []),
        ("ok", small, None, []),
        ("oom in a forward", big, "oom@forward:step=3", []),
        ("ok", small, None, []),
        ("out of memory under a cap", a.budget_batch, None, [f"measure.memory_budget_gb={a.isolation_cap_gb}"]),
        ("ok", small, None, []),
    ]
    starts: list[dict] = []
    start = MemoryMonitor.start

    def noted(monitor):
        start(monitor)
        cuda = torch.cuda.is_available() and monitor.cuda
        starts.append(
            {
                "allocated": torch.cuda.memory_allocated(monitor.index) if cuda else monitor.baseline,
                "reserved": torch.cuda.memory_reserved(monitor.index) if cuda else None,
            }
        )
        return monitor

    MemoryMonitor.start = noted
    reuse.clear()
    rows, cells = [], []
    try:
        for i, (what, bs, failpoint, extra) in enumerate(plan):
            failpoints.configure(failpoint or "")
            try:
                cfg = compose(kobart(a) + window + [f"batch.batch_size={bs}"] + extra)
                m = run_job(cfg, ctx.scratch / f"isolation_{i}", reuse_loaded=True)
            finally:
                failpoints.configure(None)
            ctx.runs.append((f"s5 {what} bs{bs}", m))
            cells.append({"cell": what, "micro_batch": bs, "status": m.status, "error": m.error, **starts[-1]})
    finally:
        MemoryMonitor.start = start
        reuse.clear()
    first = cells[0]["allocated"]
    for c in cells:
        c["allocated_over_first"] = c["allocated"] / first if first else None
        rows.append(
            [
                c["cell"],
                c["micro_batch"],
                c["status"],
                gib(c["allocated"]),
                gib(c["reserved"]),
                fmt(c["allocated_over_first"], ".3f"),
            ]
        )
    print(
        table(
            [[str(x) for x in r] for r in rows],
            ["cell", "micro-batch", "status", "allocated at start GiB", "reserved at start GiB", "/ first cell"],
        )
    )
    later = [c["allocated_over_first"] for c in cells[1:] if c["allocated_over_first"] is not None]
    worst = max((abs(r - 1) for r in later), default=None)
    expected = [(Status.ok if what == "ok" else Status.oom) for what, *_ in plan]
    statuses_as_planned = [c["status"] for c in cells][:-2] == expected[:-2]  # the capped cell may end over_budget
    print(f"worst start against the first cell: {fmt(worst, '.1%')} (target <= 2%)")
    return {
        "cells": cells,
        "worst_start_difference": worst,
        "target": 0.02,
        "target_met": worst is not None and worst <= 0.02 and statuses_as_planned,
        "statuses_as_planned": statuses_as_planned,
    }
