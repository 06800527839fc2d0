"""A trial's figures against the full epoch they stand for.

    python benchmarks/bench_projection.py [--train-size 2000] [--batch-size 8] [--samples 192]
                                          [--rounds N] [--set KEY=VALUE]

For each grouping setting (data.group_by_length false / true), two runs of the same config on
competition-shaped synthetic data (tiny BART, evaluation off), each in a fresh process as a user
types them:
  - a trial, by default the knee presets' window (measure.warmup_samples=64, measure.samples=192): its
    `epoch_seconds_projected` and its `memory.peak_bytes` (the worst of the measured steps and the
    probe at the widest samples);
  - one full epoch without the probe: its `train.loop_seconds` (the whole loop, bookkeeping
    included) and `memory.observed_peak_bytes` (the epoch's real worst batch).
Targets (issue 15): projection within 10% of the epoch's loop time; the trial's peak at least
0.95x the epoch's. Nothing else may run meanwhile.

The projection's error is the trial's timing noise: on 2 CPU cores a step's rate varies by about a
third, so 24 steps (192 samples at micro-batch 8) land within +-12% of the epoch's rate in 90% of
windows, 96 steps within +-5% (resampling one epoch's own steps). --samples sets the window.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import machine, round_order, run_cli, table


def run(folder: Path, overrides: list[str]) -> dict:
    start = time.perf_counter()
    metrics = run_cli(folder, overrides)
    metrics["bench_wall_s"] = time.perf_counter() - start
    return metrics


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--samples", type=int, default=192, help="the trial's measured window")
    ap.add_argument("--rounds", type=int, default=1, help="trial and epoch pairs per grouping, in alternating order")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for every run")
    args = ap.parse_args()
    base = [
        "data=synthetic",
        f"data.synthetic_train_size={args.train_size}",
        f"batch.batch_size={args.batch_size}",
        "eval.enabled=false",
        "train.save_model=false",
        *args.set,
    ]
    rows, ratios = [], {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for grouped in (False, True):
                setting = base + [f"data.group_by_length={str(grouped).lower()}"]
                pair = {
                    "trial": setting + ["measure.warmup_samples=64", f"measure.samples={args.samples}"],
                    "epoch": setting + ["train.epochs=1", "measure.memory_probe=false"],
                }
                order = round_order(["trial", "epoch"], r)  # neither always runs first
                got = {name: run(Path(tmp) / f"{name}_{grouped}_{r}", pair[name]) for name in order}
                trial, epoch = got["trial"], got["epoch"]
                projected, loop = trial["epoch_seconds_projected"], epoch["train"]["loop_seconds"]
                rate_only = trial["train"]["epoch_positions"] / trial["train"]["positions_per_s"]
                peak, epoch_peak = trial["memory"]["peak_bytes"], epoch["memory"]["observed_peak_bytes"]
                ratios[grouped].append(projected / loop)
                rows.append(
                    [
                        str(r + 1),
                        str(grouped).lower(),
                        f"{trial['train']['samples']}",
                        f"{projected:.1f}",
                        f"{rate_only:.1f}",
                        f"{loop:.1f}",
                        f"{projected / loop:.3f}",
                        f"{peak / 2**20:.1f}",
                        f"{trial['memory']['observed_peak_bytes'] / 2**20:.1f}",
                        f"{epoch_peak / 2**20:.1f}",
                        f"{peak / epoch_peak:.3f}",
                    ]
                )
    print(
        f"trial vs full epoch: tiny_bart, data=synthetic ({args.train_size} samples), micro-batch "
        f"{args.batch_size}" + (f", {' '.join(args.set)}" if args.set else "") + f" | {machine()}"
    )
    print(
        table(
            rows,
            [
                "round",
                "grouped",
                "trial samples",
                "projected epoch s",
                "rate-only s",
                "epoch loop s",
                "ratio (target 0.9-1.1)",
                "trial peak MiB",
                "trial steps' peak MiB",
                "epoch peak MiB",
                "ratio (target >= 0.95)",
            ],
        )
    )
    for grouped, values in ratios.items():
        print(
            f"grouped={str(grouped).lower()}: median of {len(values)} projected / epoch loop ratios "
            f"{statistics.median(values):.3f} (range {min(values):.3f}-{max(values):.3f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
