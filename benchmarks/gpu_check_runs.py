"""What every section of the GPU check shares (benchmarks/gpu_check.py runs them): the run's
context and JSON, one section run and reported, one summ run, and the two models' overrides."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import SHAPES, Shape, compose, machine, release

from summ.errors import Status


class Context:
    """The check's state: its options, the device, the time budget, every summ run's metrics (for
    section 4) and the JSON report, rewritten after every section."""

    def __init__(self, args, device, json_path: Path, scratch: Path):
        self.args, self.device, self.json_path, self.scratch = args, device, json_path, scratch
        self.started = time.perf_counter()
        self.runs: list[tuple[str, Any]] = []  # (label, RunMetrics) of every summ run, for section 4
        self.hub_folders: dict[str, Path] = {}  # section 0's hub-shaped folders, by model
        self.user_llama_run: Path | None = None  # section 0's Llama run folder: section 2 reads its FLOPs
        self.report: dict[str, Any] = {
            "machine": machine(),
            "args": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()},
            "sections": {},
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.args.budget_s - self.elapsed()

    def save(self) -> None:
        self.report["elapsed_s"] = round(self.elapsed(), 1)
        # every summ run's memory so far: kept even if a later section is cut short
        self.report["runs"] = [
            {"label": label, "status": m.status, "error": m.error, "memory": mem_dict(m)} for label, m in self.runs
        ]
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_name(self.json_path.name + ".tmp")
        tmp.write_text(json.dumps(self.report, indent=1, default=str))
        tmp.replace(self.json_path)


def section(ctx: Context, key: str, title: str, fn: Callable[[Context], dict]) -> bool:
    """Run one section: header, elapsed time, its figures into the JSON; a failure is reported
    and recorded, and the next section runs."""
    print(f"\n=== {title}  (t+{ctx.elapsed():.0f} s)", flush=True)
    start = time.perf_counter()
    record: dict[str, Any]
    try:
        record = {"status": Status.ok, **fn(ctx)}
        if record.get("target_met") is False and not ctx.args.cpu_smoke:  # toy figures meet nothing
            record["status"] = "missed its target"
    except Exception as exc:  # noqa: BLE001 (a failed section is reported; the next one runs)
        tb = traceback.format_exc()
        print("\n".join(tb.splitlines()[-15:]))
        record = {
            "status": Status.failed,
            "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500],
            "traceback_tail": tb.splitlines()[-15:],
        }
    finally:
        release()
    record["elapsed_s"] = round(time.perf_counter() - start, 1)
    ctx.report["sections"][key] = record
    ctx.save()
    print(f"--- section {key}: {record['status']} in {record['elapsed_s']:.0f} s", flush=True)
    return record["status"] == Status.ok


def summ_run(ctx: Context, label: str, overrides: list[str], expect_ok: bool = True):
    """One job through summ's own entry point (run_job); its metrics kept for section 4."""
    from summ.pipeline import run_job

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        m = run_job(compose(overrides), tmp)
    ctx.runs.append((label, m))
    if expect_ok and m.status != Status.ok:
        raise RuntimeError(f"{label}: summ run ended {m.status}: {m.error}")
    return m


def mem_dict(m) -> dict | None:
    return dataclasses.asdict(m.memory) if m.memory is not None else None


# --------------------------------------------------------------------------- the two models


def kobart_shape(a) -> Shape:
    """common.SHAPES' KoBART with --bart-heads; --cpu-smoke: its toy."""
    shape = dataclasses.replace(SHAPES["kobart"], heads=a.bart_heads)
    return shape.toy() if a.cpu_smoke else shape


def llama_shape(a) -> Shape:
    """common.SHAPES' Llama-3.2-3B with --qlora-layers; --cpu-smoke: its toy."""
    shape = dataclasses.replace(SHAPES["llama_3b"], layers=a.qlora_layers)
    return shape.toy(layers=a.qlora_layers) if a.cpu_smoke else shape


def kobart(a) -> list[str]:
    """The KoBART-shaped BART (random init), bf16, no evaluation."""
    return (
        kobart_shape(a).overrides()
        + [
            "data=synthetic",
            "data.synthetic_eval_size=16",
            "train.mixed_precision=bf16",
            "eval.enabled=false",
            "train.save_model=false",
        ]
        + (["train.cpu=true"] if a.cpu_smoke else [])
    )


def llama_3b(a) -> list[str]:
    """The Llama-3.2-3B-shaped model with QLoRA (the tiny_llama preset's LoRA), random init."""
    smoke = ["train.cpu=true", "measure.peak_tflops=1.0"]  # the CPU has no table entry: any peak exercises the figures
    return (
        llama_shape(a).overrides()
        + [
            "model.quantization=4bit",
            "model.gradient_checkpointing=true",
            "model.dtype=bfloat16",
            "data=synthetic",
            "data.synthetic_eval_size=16",
            "train.mixed_precision=bf16",
            "train.learning_rate=1e-4",
            "eval.enabled=false",
            "train.save_model=false",
        ]
        + (smoke if a.cpu_smoke else [])
    )


def window(bs: int, steps: int, warmup_steps: int) -> list[str]:
    """A trial window of whole steps at micro-batch `bs` (measure.samples), no accumulation."""
    return [
        f"batch.batch_size={bs}",
        "batch.gradient_accumulation_steps=1",
        f"measure.samples={steps * bs}",
        f"measure.warmup_samples={warmup_steps * bs}",
    ]
