"""What summ's instruments cost the steps they measure, side by side in one process.

Two duels, each on the duels' setting (tiny BART, synthetic data, micro-batch 16), rounds
alternating A B / B A after a warm-up round, samples/s over the same measured steps:
  - phases: the step's phase marks (measure.phase_timing=true, the default) against none. Target:
    ratio >= 0.99 (timing the phases costs at most 1% of throughput);
  - cpu memory: the default CPU memory accounting (measure.cpu_live_memory=true: every freed tensor
    handed back to the kernel, so the resident peak tracks live tensors) against glibc's heap
    (measure.cpu_live_memory=false). Target (issue 23, item 6): ratio >= 0.95.
Each duel also prints the first contender's memory verdict (memory.peak_bytes) against the second's.

    python benchmarks/bench_instruments.py [--duel phases|cpu_memory|both] [--rounds 9] [--steps 30]
"""

from __future__ import annotations

import argparse
import tempfile

from common import DUEL_OVERRIDES, alternate, compose, fmt, gib, machine, median, paired_ratio, table

SOURCES: dict[str, str] = {}  # how each contender's memory was measured (metrics.memory.source)
DUELS = {
    "phases": (["measure.phase_timing=true"], ["measure.phase_timing=false"], 0.99),
    "cpu_memory": (["measure.cpu_live_memory=true"], ["measure.cpu_live_memory=false"], 0.95),
}


def run(overrides: list[str], steps: int) -> dict:
    from summ.pipeline import run_job

    with tempfile.TemporaryDirectory() as tmp:
        m = run_job(compose(overrides + [f"measure.steps={steps}"]), tmp)
    SOURCES[" ".join(overrides)] = m.memory.source
    return {"samples_per_s": m.train.samples_per_s, "peak_bytes": m.memory.peak_bytes}


def mark_cost_s(marks_per_step: int = 8, steps: int = 20000) -> float:
    """Seconds one step's phase marks and its lap's split take, timed directly (the duel cannot
    resolve a cost this small through the run-to-run noise of 2 cores)."""
    import time

    import torch

    from summ.measure.timing import StepClock

    def seconds(phases: bool) -> float:
        clock = StepClock(torch.device("cpu"), phases=phases)
        clock.start()
        start = time.perf_counter()
        for _ in range(steps):
            for _ in range(marks_per_step):
                clock.mark("forward")
            clock.lap()
        return time.perf_counter() - start

    return (seconds(True) - seconds(False)) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duel", choices=[*DUELS, "both"], default="both")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override for both contenders")
    args = ap.parse_args()
    print(
        f"machine: {machine()}\ntiny_bart, synthetic data, micro-batch 16, {args.steps} measured steps, "
        f"{args.rounds} rounds"
    )
    for name in DUELS if args.duel == "both" else [args.duel]:
        a, b, target = DUELS[name]
        base = DUEL_OVERRIDES + args.set  # the same for both contenders and every duel
        contenders = {"A": base + a, "B": base + b}
        res = alternate({k: lambda o=o: run(o, args.steps) for k, o in contenders.items()}, args.rounds)
        rows = [
            [
                " ".join(o),
                fmt(median(res[k], "samples_per_s"), ".1f"),
                gib(median(res[k], "peak_bytes")),
                SOURCES[" ".join(contenders[k])],
            ]
            for k, o in (("A", a), ("B", b))
        ]
        print(f"\n{name}:\n" + table(rows, ["contender", "median samples/s", "median peak", "memory source"]))
        ratio = paired_ratio(res["A"], res["B"], "samples_per_s")
        print(f"median of per-round ratios A / B = {ratio:.3f} (target >= {target})")
        if name == "phases":
            step_s = 16 / median(res["A"], "samples_per_s")
            cost = mark_cost_s()
            print(f"timed directly: a step's marks cost {cost * 1e6:.1f} us, {cost / step_s:.4%} of its median step")


if __name__ == "__main__":
    main()
