"""The levers beyond the batch, side by side: how the micro-batch is laid out, and the optimizer.

tiny_llama (LoRA) on competition-shaped synthetic data, micro-batch 8, each contender a fresh
`python run.py` process as a user types it, rounds alternating (A B C / C B A ...), the median of
per-round ratios against the group's first contender (the machine's drift cancels within a round).

  - layout (tiny_llama): padded to the longest in the batch (the default), length-grouped, packed in
    one row (on sdpa, and on sdpa_varlen: attended sample by sample), packed in rows of at most 1024
    positions, micro-batches filled to a 2048-token budget (batch.max_tokens; about micro-batch 8's
    positions) padded and packed (on sdpa and sdpa_varlen): samples/s (and its ratio to length
    grouping's), positions/s, pad fraction, peak;
  - optimizer (tiny_bart, a full fine-tune): adamw (fused on the CPU), adamw_foreach, adamw_8bit,
    adafactor: the optimizer phase's seconds per step, samples/s, the optimizer state's bytes, peak;
  - compile (tiny_llama): eager against train.compile=true: samples/s of the measured steps (after
    the compile warm-up), the seconds compiling, the compilations inside the measured steps.
Acceptance (issue 24): packing cuts padded positions to under 5% and raises samples/s over length
grouping. Nothing else may run meanwhile.

    python benchmarks/bench_levers.py [--group layout|optimizer|compile|all] [--rounds 3] [--steps 20]
        [--contender NAME ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import fmt, gib, machine, round_order, run_cli, table

BASE = [
    "model=tiny_llama",
    "data=synthetic",
    "data.synthetic_train_size=2000",
    "batch.batch_size=8",
    "eval.enabled=false",
    "measure.warmup_steps=3",
    "train.save_model=false",
]
GROUPS = {
    "layout": {
        "padded": [],
        "grouped": ["data.group_by_length=true"],
        "packed, one row": ["data.packing=true"],
        "packed, one row, sdpa_varlen": ["data.packing=true", "model.attn_implementation=sdpa_varlen"],
        "packed, rows <= 1024": ["data.packing=true", "data.max_packed_len=1024"],
        "token budget 2048": ["batch.max_tokens=2048"],
        "packed, token budget 2048": ["data.packing=true", "batch.max_tokens=2048"],
        "packed, token budget 2048, sdpa_varlen": [
            "data.packing=true",
            "batch.max_tokens=2048",
            "model.attn_implementation=sdpa_varlen",
        ],
    },
    "optimizer": {  # a full fine-tune (tiny_bart): LoRA's state is too small to move anything
        "adamw": ["model=tiny_bart", "train.optimizer=adamw"],
        "adamw_foreach": ["model=tiny_bart", "train.optimizer=adamw_foreach"],
        "adamw_8bit": ["model=tiny_bart", "train.optimizer=adamw_8bit"],
        "adafactor": ["model=tiny_bart", "train.optimizer=adafactor"],
    },
    "compile": {"eager": [], "compiled": ["train.compile=true"]},
}


def available(overrides: list[str]) -> bool:
    """A contender whose keys this checkout's schema has (a lever not landed yet is left out, said)."""
    from common import compose
    from hydra.errors import ConfigCompositionException

    try:
        compose(BASE + overrides)
        return True
    except ConfigCompositionException:  # a key or choice this schema lacks; anything else is raised
        return False


def run(overrides: list[str], steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        m = run_cli(Path(tmp) / "run", [*BASE, *overrides, f"measure.steps={steps}"])
    t, mem = m["train"], m["memory"]
    parts = mem.get("components") or {}
    phases = t.get("phase_seconds") or {}
    return {
        "samples_per_s": t["samples_per_s"],
        "positions_per_s": t["positions_per_s"],
        "pad_fraction": t["pad_fraction"],
        "peak_bytes": mem["peak_bytes"],
        "optimizer_s_per_step": phases.get("optimizer", 0.0) / max(t["optimizer_steps"], 1),
        "optimizer_state_bytes": parts.get("optimizer_state_bytes"),
        "built": m.get("optimizer"),
        "compile_seconds": t.get("compile_seconds") or 0.0,
        "recompiles": t.get("recompiles") or 0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--group", choices=[*GROUPS, "all"], default="all")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--contender", action="append", help="only these contenders of the group (repeat the flag)")
    args = ap.parse_args()
    print(f"machine: {machine()}\n{' '.join(BASE)}, {args.steps} measured steps, {args.rounds} rounds")
    for group in GROUPS if args.group == "all" else [args.group]:
        chosen = {k: o for k, o in GROUPS[group].items() if not args.contender or k in args.contender}
        contenders = {k: o for k, o in chosen.items() if available(o)}
        skipped = sorted(set(chosen) - set(contenders))
        results: dict[str, list[dict]] = {k: [] for k in contenders}
        for r in range(args.rounds):
            for name in round_order(list(contenders), r):
                results[name].append(run(contenders[name], args.steps))
                print(f"  round {r + 1}: {name}: samples/s {results[name][-1]['samples_per_s']:.2f}", flush=True)
        first = next(iter(contenders))
        versus = list(dict.fromkeys([first, *(["grouped"] if "grouped" in contenders else [])]))
        rows = []
        for name, res in results.items():
            ratios = [
                statistics.median(a["samples_per_s"] / b["samples_per_s"] for a, b in zip(res, results[other]))
                for other in versus
            ]
            med = {k: statistics.median(x[k] for x in res) for k in res[0] if isinstance(res[0][k], (int, float))}
            rows.append(
                [
                    name if group == "layout" else f"{name} ({res[0]['built']})",
                    fmt(med["samples_per_s"], ".2f"),
                    *(fmt(ratio, ".2f") for ratio in ratios),
                    fmt(med["positions_per_s"], ".0f"),
                    fmt(med["pad_fraction"], ".3f"),
                    gib(med["peak_bytes"]),
                    fmt(med["optimizer_s_per_step"] * 1000, ".1f"),
                    "-"
                    if med.get("optimizer_state_bytes") is None
                    else f"{med['optimizer_state_bytes'] / 2**20:.2f} MiB",
                    fmt(med["compile_seconds"], ".1f"),
                    str(max(x["recompiles"] for x in res)),
                ]
            )
        header = ["contender", "samples/s", *(f"x {other}" for other in versus), "positions/s", "pad", "peak"]
        header += ["optimizer ms/step", "state"]
        header += ["compile s", "recompiles (measured)"]
        print(f"\n{group}:\n" + table(rows, header))
        if skipped:
            print(f"not in this checkout: {', '.join(skipped)}")


if __name__ == "__main__":
    main()
