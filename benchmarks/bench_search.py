"""Trials to answer: the grid, Optuna TPE and the knee sweeper on the knee_grid preset's space.

How many trials (and how much trial time) each method spends before its answer is the grid's
recommended cell, or a cell within the knee tolerance of the grid's fastest ("as fast").

Replay (default; deterministic): every method asks a recorded table for its cells, so all three
decide on the same numbers. The table is a JSON file (benchmarks/tables/) or a finished sweep
folder measured on some machine (`--sweep DIR`). TPE runs over `--seeds` seeds; its answer after
n trials is its best trial so far (it does not know when it has arrived; the grid and the knee
sweeper stop by themselves).

Real (`--real`): the three sweeps run once each through run.py on the tiny model, with the same
data and measurement settings; trials and wall time are counted, and each answer is looked up in
the grid's own measurements. Timing noise between separate runs on a small CPU can exceed the
tolerance, so this mode reports what happened once; the replay is the comparison.

    python benchmarks/bench_search.py [--table benchmarks/tables/llama_qlora_24gb.json | --sweep DIR]
    python benchmarks/bench_search.py --real [--out outputs/bench_search]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import ROOT, machine, table

from summ.errors import Status
from summ.reports.cells import Cell, load_cells
from summ.reports.knee import Analysis, analyse
from summ.sweeps.knee_search import Trial, knee_search, predicted_over_limit

PENALTY = 1e6


def preset(name: str) -> dict:
    return yaml.safe_load((ROOT / "multirun_presets" / f"{name}.yaml").read_text(encoding="utf-8"))


def grid_space() -> tuple[list[int], list[int]]:
    params = preset("knee_grid")["hydra"]["sweeper"]["params"]
    return (
        [int(x) for x in str(params["batch.batch_size"]).split(",")],
        [int(x) for x in str(params["batch.gradient_accumulation_steps"]).split(",")],
    )


# --------------------------------------------------------------------------- tables


def table_from_json(path: Path) -> tuple[dict, dict]:
    """{(bs, ga): Cell}, {(bs, ga): trial seconds} from a recorded table."""
    t = json.loads(path.read_text(encoding="utf-8"))
    cells, seconds = {}, {}
    for row in t["cells"]:
        bs, ga, sps, peak = row["batch_size"], row["gradient_accumulation_steps"], row["samples_per_s"], row["peak_gib"]
        cells[(bs, ga)] = Cell(
            job=f"{bs}x{ga}",
            overrides=[],
            status=Status.ok if sps else Status.oom,
            model=t["model"],
            batch_size=bs,
            gradient_accumulation_steps=ga,
            effective_batch_size=bs * ga,
            samples_per_s=sps,
            peak_bytes=int(peak * 2**30) if peak else None,
            budget_bytes=int(t["budget_gib"] * 2**30),
            limit_bytes=int(t["limit_gib"] * 2**30),
            positions=bs * t["positions_per_sample"] if sps else None,
        )
        # a trial: load the model, then the measured steps (an oom cell fails in its first step)
        steps = t["measured_steps"] if sps else 0
        seconds[(bs, ga)] = t["setup_seconds"] + (steps * bs * ga / sps if sps else 0.0)
    return cells, seconds


def table_from_sweep(sweep_dir: Path) -> tuple[dict, dict]:
    cells, seconds = {}, {}
    for c in load_cells(sweep_dir)[0]:
        if c.batch_size is None:
            continue
        cells[(c.batch_size, c.gradient_accumulation_steps)] = c
        try:
            m = json.loads((sweep_dir / c.job / "metrics.json").read_text(encoding="utf-8"))
            seconds[(c.batch_size, c.gradient_accumulation_steps)] = m.get("wall_seconds") or m["train"]["seconds"]
        except (OSError, ValueError, KeyError, TypeError):
            seconds[(c.batch_size, c.gradient_accumulation_steps)] = 0.0
    return cells, seconds


# --------------------------------------------------------------------------- methods


def as_fast(cells: dict, grid: Analysis, tol: float) -> set:
    """Cells the grid's rule counts as fast as its fastest: the acceptable answers."""
    best = grid.fastest.samples_per_s
    return {k for k, c in cells.items() if c.ok and c.samples_per_s >= best * (1 - tol)}


def run_grid(cells: dict, seconds: dict, tol: float) -> tuple[dict, Analysis]:
    sizes, accs = grid_space()
    keys = [(bs, ga) for ga in accs for bs in sizes]
    missing = [k for k in keys if k not in cells]
    if missing:
        raise SystemExit(f"the table lacks grid cells {missing}: it must cover the knee_grid preset's space")
    a = analyse([cells[k] for k in keys], tol)
    return {
        "method": "grid (knee_grid)",
        "trials": len(keys),
        "seconds": sum(seconds[k] for k in keys),
        "answer": (a.recommended.batch_size, a.recommended.gradient_accumulation_steps),
    }, a


def run_knee(cells: dict, seconds: dict, tol: float, ga: int, resolution: float) -> dict:
    p = preset("knee_search")["hydra"]["sweeper"]

    def replay(bs: int) -> Trial:
        if (bs, ga) not in cells:
            raise SystemExit(
                f"the knee sweeper asked for micro-batch {bs} x {ga}, which the table lacks "
                f"(use --resolution 1 for a table of powers of two)"
            )
        c = cells[(bs, ga)]
        return Trial(bs, ga, c.status, c.samples_per_s, c.peak_bytes, job=c.job)

    limit = min((c.limit_bytes for c in cells.values() if c.limit_bytes), default=None)
    seen: list[Cell] = []

    def measure(bs: int) -> Trial:  # as the plugin: each measured cell feeds the memory model
        trial = replay(bs)
        seen.append(cells[(bs, ga)])
        return trial

    r = knee_search(
        measure,
        lambda bs: predicted_over_limit([c for c in seen if c.ok], bs, limit),
        lambda bs: ga,
        min_batch_size=p["min_batch_size"],
        max_batch_size=p["max_batch_size"],
        tolerance=tol,
        resolution=resolution,
        max_trials=p["max_trials"],
        patience=p.get("patience", 1),
    )
    ran = [(bs, ga) for bs, t in r["trials"].items() if t.job is not None]
    rec = analyse([cells[k] for k in ran], tol).recommended
    return {
        "method": f"knee sweeper (accumulation {ga})",
        "trials": r["trials_run"],
        "seconds": sum(seconds[k] for k in ran),
        "answer": (rec.batch_size, rec.gradient_accumulation_steps),
    }


def run_tpe(cells: dict, seconds: dict, good: set, seeds: int, max_trials: int) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sizes, accs = grid_space()
    startup = preset("optuna_step_time")["hydra"]["sweeper"]["sampler"]["n_startup_trials"]
    trials_needed, seconds_needed = [], []
    for seed in range(seeds):
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup))
        spent, best = 0.0, (float("inf"), None)
        for n in range(1, max_trials + 1):
            trial = study.ask()
            key = (trial.suggest_categorical("batch_size", sizes), trial.suggest_categorical("accumulation", accs))
            c = cells[key]
            value = 1.0 / c.samples_per_s if c.ok else PENALTY
            study.tell(trial, value)
            spent += seconds[key]
            best = min(best, (value, key))
            if best[1] in good:
                trials_needed.append(n)
                seconds_needed.append(spent)
                break
    reached = len(trials_needed)
    med = statistics.median(trials_needed) if trials_needed else None
    return {
        "method": f"Optuna TPE ({seeds} seeds)",
        "trials": med,
        "seconds": statistics.median(seconds_needed) if seconds_needed else None,
        "answer": f"as fast in {reached}/{seeds} seeds within {max_trials} trials"
        + (f"; worst {max(trials_needed)} trials" if trials_needed else ""),
    }


def replay(args) -> int:
    cells, seconds = table_from_sweep(args.sweep) if args.sweep else table_from_json(args.table)
    grid_row, grid = run_grid(cells, seconds, args.tolerance)
    good = as_fast(cells, grid, args.tolerance)
    target = grid_row["answer"]
    rows = [
        grid_row,
        run_knee(cells, seconds, args.tolerance, target[1], args.resolution),
        run_tpe(cells, seconds, good, args.seeds, 2 * grid_row["trials"]),
    ]
    source = args.sweep or args.table.relative_to(ROOT)
    print(f"trials to answer, replaying {source} | {machine()}")
    print(
        f"grid recommendation: micro-batch {target[0]} x accumulation {target[1]}; as fast (within "
        f"{args.tolerance:.0%} of the fastest): {', '.join(f'{b}x{g}' for b, g in sorted(good))}"
    )
    print(
        table(
            [
                [
                    r["method"],
                    _fmt(r["trials"]),
                    _fmt(r["seconds"], ".0f"),
                    f"{r['answer'][0]}x{r['answer'][1]}" if isinstance(r["answer"], tuple) else r["answer"],
                    "yes" if not isinstance(r["answer"], tuple) or r["answer"] in good else "NO",
                ]
                for r in rows
            ],
            ["method", "trials", "trial seconds", "answer", "as fast"],
        )
    )
    knee = rows[1]
    print(
        f"knee sweeper / grid trials: {knee['trials'] / grid_row['trials']:.2f}; "
        f"trial seconds: {knee['seconds'] / grid_row['seconds']:.2f}"
    )
    return 0 if knee["answer"] in good else 1


# --------------------------------------------------------------------------- real


TPE_PRESET = """# @package _global_
# bench_search: the optuna_step_time preset restricted to the knee_grid space
defaults:
  - optuna_step_time
hydra:
  sweeper:
    params:
      batch.batch_size: choice({sizes})
      batch.gradient_accumulation_steps: choice({accs})
      model.gradient_checkpointing: false
      train.mixed_precision: "no"
"""


def real(args) -> int:
    out = args.out.resolve()
    common = [
        f"data.synthetic_train_size={args.train_size}",
        "measure.warmup_steps=2",
        "measure.steps=6",
        "data.padding=max_length",
        "data.encoder_max_len=128",
        "data.decoder_max_len=32",
    ]

    def sweep(name: str, *extra: str) -> float:
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "run.py", "-m", *extra, *common, f"hydra.sweep.dir={out / name}"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        )
        return time.perf_counter() - start

    wall = {"grid": sweep("grid", "preset=knee_grid")}
    cells, _ = table_from_sweep(out / "grid")
    grid_row, grid = run_grid(cells, {k: 0.0 for k in cells}, args.tolerance)
    good, target = as_fast(cells, grid, args.tolerance), grid_row["answer"]
    wall["knee"] = sweep("knee", "preset=knee_search", f"hydra.sweeper.gradient_accumulation_steps={target[1]}")
    knee_search_json = json.loads((out / "knee" / "knee_search.json").read_text())
    knee_rec = analyse(load_cells(out / "knee")[0], args.tolerance).recommended
    sizes, accs = grid_space()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "preset").mkdir()
        (Path(tmp) / "preset" / "bench_tpe.yaml").write_text(
            TPE_PRESET.format(sizes=",".join(map(str, sizes)), accs=",".join(map(str, accs)))
        )
        wall["tpe"] = sweep(
            "tpe",
            "--config-dir",
            tmp,
            "preset=bench_tpe",
            f"hydra.sweeper.n_trials={grid_row['trials']}",
            f"hydra.sweeper.storage=sqlite:///{out}/tpe.db",
            "hydra.sweeper.study_name=bench_search",
        )
    best = yaml.safe_load((out / "tpe" / "optimization_results.yaml").read_text())["best_params"]
    tpe_answer = (int(best["batch.batch_size"]), int(best["batch.gradient_accumulation_steps"]))
    rows = [
        ["grid (knee_grid)", grid_row["trials"], f"{wall['grid']:.0f}", f"{target[0]}x{target[1]}", "yes"],
        [
            f"knee sweeper (accumulation {target[1]})",
            knee_search_json["trials_run"],
            f"{wall['knee']:.0f}",
            f"{knee_rec.batch_size}x{knee_rec.gradient_accumulation_steps}",
            "yes" if (knee_rec.batch_size, knee_rec.gradient_accumulation_steps) in good else "no",
        ],
        [
            f"Optuna TPE ({grid_row['trials']} trials)",
            grid_row["trials"],
            f"{wall['tpe']:.0f}",
            f"{tpe_answer[0]}x{tpe_answer[1]}",
            "yes" if tpe_answer in good else "no",
        ],
    ]
    print(f"trials to answer, measured once on the tiny model in {out} | {machine()}")
    print(f"grid recommendation: {target[0]}x{target[1]}; as fast: {', '.join(f'{b}x{g}' for b, g in sorted(good))}")
    print(table(rows, ["method", "trials", "wall seconds", "answer", "as fast (by the grid's figures)"]))
    return 0


def _fmt(v, spec: str = "g") -> str:
    return "-" if v is None else format(v, spec)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", type=Path, default=ROOT / "benchmarks" / "tables" / "llama_qlora_24gb.json")
    p.add_argument("--sweep", type=Path, help="replay a finished knee_grid sweep folder instead of a table")
    p.add_argument("--tolerance", type=float, default=0.05, help="the knee tolerance (knee.tolerance)")
    p.add_argument(
        "--resolution",
        type=float,
        default=None,
        help="knee bisection resolution (default: the knee_search preset's; 1 for --sweep: powers of two only)",
    )
    p.add_argument("--seeds", type=int, default=20, help="TPE seeds to replay")
    p.add_argument("--real", action="store_true", help="run the three sweeps once for real on the tiny model")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_search")
    p.add_argument("--train-size", type=int, default=1200, help="synthetic training dialogues (--real)")
    args = p.parse_args()
    if args.resolution is None:
        args.resolution = 1.0 if args.sweep else preset("knee_search")["hydra"]["sweeper"]["resolution"]
    return real(args) if args.real else replay(args)


if __name__ == "__main__":
    sys.exit(main())
