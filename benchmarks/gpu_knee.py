"""GPU-ready knee runs: a KoBART-shaped BART and a Llama-3.2-3B-shaped model with QLoRA.

Both are built from config objects with random init (no download), at common.SHAPES: BART with
KoBART's published sizes (d_model 768, 6+6 layers, 16 heads, FFN 3072, vocabulary 30,000), and
Llama with Llama-3.2-3B's (hidden 3072, 28 layers, 24 heads, 8 KV heads, FFN 8192, vocabulary 128,256),
4-bit NF4 + LoRA r=16 + gradient checkpointing, as the original report trained it. Each runs a
short knee grid on competition-shaped synthetic data (bf16), and the script prints the knee
table with peak memory and MFU. Sized to fit a 10-minute run on one GPU. Where CUDA is absent it
says so and exits 0.

    python benchmarks/gpu_knee.py [--out outputs/gpu_knee]
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, SHAPES, machine, table

KOBART = SHAPES["kobart"].overrides() + ["batch.batch_size=8,16,32,64,128", "batch.gradient_accumulation_steps=1"]
LLAMA_3B = SHAPES["llama_3b"].overrides() + [
    "model.quantization=4bit",
    "model.gradient_checkpointing=true",
    "model.lora.r=16",
    "model.lora.alpha=32",
    "model.dtype=bfloat16",
    "batch.batch_size=2,4,8,16",
    "batch.gradient_accumulation_steps=1",
]
COMMON = [
    "data=synthetic",
    "data.synthetic_train_size=2000",
    "train.mixed_precision=bf16",
    "measure.steps=5",
    "measure.warmup_steps=2",
    "train.learning_rate=1e-4",
]


def knee(name: str, overrides: list[str], out: Path, timeout: int) -> None:
    sweep = out / name
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "run.py", "-m", f"hydra.sweep.dir={sweep}", *COMMON, *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    print(f"\n=== {name}: exit {proc.returncode} in {time.perf_counter() - start:.0f} s ({sweep})")
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        return
    rows = list(csv.DictReader((sweep / "sweep.csv").open()))
    fmt = lambda v, spec: "-" if v in ("", None) else format(float(v), spec)  # noqa: E731
    print(
        table(
            [
                [
                    r["batch_size"],
                    r["status"],
                    fmt(r["samples_per_s"], ".1f"),
                    fmt(r["tokens_per_s"], ".0f"),
                    fmt(r["step_time_s_median"], ".3f"),
                    fmt(float(r["peak_bytes"]) / 2**30 if r["peak_bytes"] else None, ".2f"),
                    fmt(float(r["mfu"]) * 100 if r["mfu"] else None, ".1f"),
                    r["flags"],
                ]
                for r in rows
            ],
            ["micro-batch", "status", "samples/s", "tokens/s", "step s", "peak GiB", "MFU %", "flags"],
        )
    )
    report = (sweep / "knee_report.md").read_text().split("## Recommendation", 1)[1].split("## Cells", 1)[0]
    print(report.strip())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "outputs" / "gpu_knee"))
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("CUDA is not available on this machine: the GPU knee runs need an NVIDIA GPU. Nothing was run.")
        return 0
    print(f"machine: {machine()}")
    out = Path(args.out)
    knee("kobart_shaped", KOBART, out, timeout=200)
    knee("llama_3b_shaped_qlora", LLAMA_3B, out, timeout=360)
    return 0


if __name__ == "__main__":
    sys.exit(main())
