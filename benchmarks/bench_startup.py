"""Start-up and the default run: wall time of `python run.py --help` and of `python run.py`
(tiny BART, bundled sample, full schedule with evaluation), each as a fresh process.

    python benchmarks/bench_startup.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

from common import ROOT, machine, table


def wall(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    times: dict[str, list[float]] = {"python run.py --help": [], "python run.py": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            times["python run.py --help"].append(wall(["--help"]))
            times["python run.py"].append(wall([f"hydra.run.dir={tmp}/{r}"]))
            print(f"  round {r + 1}: " + ", ".join(f"{k}: {v[-1]:.1f} s" for k, v in times.items()), flush=True)
    print()
    print(
        table(
            [[k, f"{statistics.median(v):.2f}", f"{min(v):.2f}", f"{max(v):.2f}"] for k, v in times.items()],
            ["command", "median s", "min s", "max s"],
        )
    )


if __name__ == "__main__":
    main()
