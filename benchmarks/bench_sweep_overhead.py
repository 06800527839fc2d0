"""A sweep's fixed cost per cell: data prepared and the model loaded once per sweep, or per cell.

    python benchmarks/bench_sweep_overhead.py [--preset knee_grid]

Runs `python run.py -m preset=knee_grid` (10 cells) and the same preset cut to its first cell,
each with sweep.reuse_loaded=true and =false, in fresh processes. For each sweep: its wall time,
the cells' summed step times (train_history.jsonl, warm-up steps included) and the memory probes'
time (metrics train.probe_seconds). The fixed cost per additional cell is

    ((wall - steps) of the 10-cell sweep - (wall - steps) of the 1-cell sweep) / 9,

reported with the probe counted as overhead and without it (the probe is measurement, not
setup: one forward and backward at the widest samples). Also checks that both settings recommend
the same cell. Nothing else may run meanwhile (2 cores: contention swamps the figures).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, table


def sweep(preset: str, reuse: bool, one_cell: bool, folder: Path) -> dict:
    args = [
        sys.executable,
        str(ROOT / "run.py"),
        "-m",
        f"preset={preset}",
        f"sweep.reuse_loaded={str(reuse).lower()}",
        f"hydra.sweep.dir={folder}",
    ]
    if one_cell:
        # command-line values replace the preset's
        args += ["batch.batch_size=2", "batch.gradient_accumulation_steps=1"]
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"the sweep failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    steps = probes = 0.0
    cells = 0
    for job in sorted(p for p in folder.iterdir() if p.name.isdigit()):
        history = [json.loads(line) for line in (job / "train_history.jsonl").read_text().splitlines() if line]
        steps += sum(h["step_time_s"] for h in history)
        probes += json.loads((job / "metrics.json").read_text())["train"].get("probe_seconds") or 0.0
        cells += 1
    rows = list(csv.DictReader((folder / "sweep.csv").open()))
    recommended = next(
        (f"{r['batch_size']}x{r['gradient_accumulation_steps']}" for r in rows if "recommended" in r["flags"]), "-"
    )
    return {"wall": wall, "steps": steps, "probes": probes, "cells": cells, "recommended": recommended}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="knee_grid")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for reuse in (True, False):
            for one_cell in (True, False):
                results[(reuse, one_cell)] = sweep(args.preset, reuse, one_cell, Path(tmp) / f"{reuse}_{one_cell}")
    rows = []
    for reuse in (True, False):
        full, one = results[(reuse, False)], results[(reuse, True)]
        extra = full["cells"] - one["cells"]
        with_probe = ((full["wall"] - full["steps"]) - (one["wall"] - one["steps"])) / extra
        without = (
            (full["wall"] - full["steps"] - full["probes"]) - (one["wall"] - one["steps"] - one["probes"])
        ) / extra
        rows.append(
            [
                f"reuse_loaded={str(reuse).lower()}",
                f"{full['wall']:.1f}",
                f"{full['steps']:.1f}",
                f"{full['probes']:.1f}",
                f"{one['wall']:.1f}",
                f"{one['steps']:.1f}",
                f"{with_probe:.2f}",
                f"{without:.2f}",
                full["recommended"],
            ]
        )
    print(f"sweep fixed cost per additional cell, preset={args.preset} | {machine()}")
    print(
        table(
            rows,
            [
                "setting",
                "wall s (10 cells)",
                "steps s",
                "probes s",
                "wall s (1 cell)",
                "steps s (1)",
                "fixed s/cell (probe in)",
                "fixed s/cell (probe out)",
                "recommended",
            ],
        )
    )
    same = results[(True, False)]["recommended"] == results[(False, False)]["recommended"]
    print(f"same recommendation with and without reuse: {'yes' if same else 'no (timing noise between the runs?)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
