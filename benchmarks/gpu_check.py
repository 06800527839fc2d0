"""GPU check: what a user runs first on a GPU, and summ's loop, MFU and memory figures against
independent references, on one GPU.

    python benchmarks/gpu_check.py [--quick]

About 10 minutes on one H100 (--quick: about 3, for a first smoke); every size is a flag (--help).
Each section prints one table and its elapsed time; a failed section is reported and the others
still run; the exit code is 1 if any failed or missed its target. All figures go to
$OUT/gpu_check.json (else ./gpu_check.json), rewritten after every section, so a run cut short
keeps what it measured.

0. The README's GPU commands through run.py, on hub-shaped folders written with save_pretrained
   (random weights, summ's Korean tokenizer): a KoBART-shaped full fine-tune with evaluation and
   generation, a Llama-3.2-3B-shaped QLoRA run, then `python run.py -m preset=knee_grid
   measure.memory_budget_gb=24` on the Llama-shaped folder, its sweep.csv and knee report read
   back: every cell ok, oom or over_budget, none failed (benchmarks/gpu_check_user.py).
5. A failed cell leaves nothing behind: KoBART-shaped cells of one sweep process (reuse on), ok /
   out of memory in a backward, a forward (failpoints) and for real under a memory cap / ok: every
   cell's allocated memory at its start within 2% of the first cell's.
1. Loop overhead. A KoBART-shaped BART (common.SHAPES: d_model 768, 6+6 layers, 16 heads, FFN
   3072, vocabulary 30,000; bf16 autocast) at micro-batch 8, 32 and 128. summ's loop (run_job, a
   measure.samples window, the memory probe on, as sweeps run it) runs against the bare reference
   loop (common.bare_loop): same init, same samples in the same order and batch shapes, fused
   AdamW, non_blocking copies from pinned memory, DataLoader workers, and no host sync per step.
   The bare loop is timed with CUDA events and one synchronize at the end of its window. The two
   alternate A B, B A, ... Prints median samples/s per contender and the ratio summ/bare (target
   >= 0.98: a probe billed to the first measured step, or any added sync, shows here first).
2. QLoRA FLOPs and MFU. Section 0's Llama-3.2-3B-shaped QLoRA run (4-bit NF4, LoRA, gradient
   checkpointing, bf16; else a run of its own): metrics.mfu, metrics.hfu and train.flops_per_token
   next to 6N and 4N counted from the folder's config.json (4-bit weights are stored packed). About
   4N/6N = 0.67 is expected: frozen weights get no weight gradients.
3. Probe vs epoch peak. The BART at micro-batch 32: a trial cell (measure.samples window,
   memory probe on) against one full epoch of the same small set (probe off). Prints the trial's
   peak, probe and observed peaks, the epoch's observed peak, trial peak / epoch (target
   >= 0.95) and observed-only trial / epoch (the bias the probe removes).
4. Context and fragmentation. For every run above: memory.context_bytes, reserved_peak_bytes -
   peak_bytes and alloc_retries. Then one run with measure.memory_budget_gb=24 on Accelerate's
   `cuda` device (no index: the cap once failed at setup there): the allocator cap makes an
   over-large micro-batch fail as oom or over_budget, as a 24 GB card would. A control run at a
   micro-batch that fits still passes under the same cap.
6. Memory by part and time by phase. The KoBART-shaped and the QLoRA runs with the allocator's
   counter read at every phase mark: weights + optimizer state against what stays allocated after
   the optimizer's zeroing (target 3%), gradients + logits against what backward adds (10%), the
   CUDA-event phases against the host's step time (5%), and samples/s without the marks beside.
7. Levers. The KoBART-shaped run with train.optimizer adamw (fused on CUDA), adamw_8bit and
   paged_adamw_8bit: the 8-bit states at most 0.30 of AdamW's; the QLoRA Llama padded, grouped and
   packed (flash_attention_2 where flash-attn is installed): packed padding under 5%.

The runs go in the order 0, 5, 1, 3, 4 (capped run), 2, 6, 7, then the table of section 4. Where CUDA is
absent the script says so and exits 0. --cpu-smoke runs every section at toy size on the CPU
instead. Its figures mean nothing; it only checks the script's plumbing.

This file is the command line and the plan; the sections live in gpu_check_user.py (0, 5),
gpu_check_overhead.py (1), gpu_check_qlora.py (2), gpu_check_memory.py (3, 4), gpu_check_parts.py (6),
gpu_check_levers.py (7), and what they share in gpu_check_runs.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import gpu_check_user as user
from common import SHAPES
from gpu_check_levers import levers
from gpu_check_memory import budget_cap, context_and_fragmentation, probe_vs_epoch
from gpu_check_overhead import overhead
from gpu_check_parts import parts_and_phases
from gpu_check_qlora import qlora_mfu
from gpu_check_runs import Context, section

# Sizes: full run, then what --quick and --cpu-smoke change (a flag given on the command line wins).
DEFAULTS: dict[str, Any] = {
    "sections": "0,1,2,3,4,5,6,7",
    "budget_s": 480.0,
    "user_train_size": 512,
    "user_steps": 5,
    "user_trial_samples": 32,
    "user_trial_warmup_samples": 16,
    "isolation_small": 8,
    "isolation_big": 64,
    "isolation_cap_gb": 6.0,
    "overhead_sizes": "8,32,128",
    "overhead_rounds": 2,
    "overhead_steps": 30,
    "overhead_warmup_steps": 3,
    "overhead_train_size": 3000,
    "overhead_max_s": 120.0,
    "bart_heads": SHAPES["kobart"].heads,
    "qlora_batch": 4,
    "qlora_steps": 8,
    "qlora_warmup_steps": 2,
    "qlora_layers": 28,
    "qlora_train_size": 256,
    "qlora_min_s": 100.0,
    "probe_batch": 32,
    "probe_steps": 10,
    "epoch_train_size": 2000,
    "budget_gb": 24.0,
    "budget_batch": 256,
    "budget_control_batch": 32,
}
QUICK: dict[str, Any] = {
    "budget_s": 180.0,
    "user_train_size": 128,
    "user_steps": 3,
    "overhead_sizes": "8,32",
    "overhead_rounds": 1,
    "overhead_steps": 10,
    "overhead_train_size": 1000,
    "overhead_max_s": 40.0,
    "qlora_layers": 4,
    "qlora_steps": 3,
    "qlora_min_s": 40.0,
    "probe_steps": 4,
    "epoch_train_size": 640,
}
SMOKE: dict[str, Any] = {
    **QUICK,
    "budget_s": 480.0,
    "user_train_size": 24,
    "user_steps": 1,
    "user_trial_samples": 4,
    "user_trial_warmup_samples": 2,
    "isolation_small": 2,
    "isolation_big": 4,
    "isolation_cap_gb": 0.001,
    "overhead_sizes": "4",
    "overhead_steps": 3,
    "overhead_warmup_steps": 1,
    "overhead_train_size": 48,
    "qlora_batch": 2,
    "qlora_steps": 2,
    "qlora_warmup_steps": 1,
    "qlora_layers": 2,
    "qlora_train_size": 16,
    "probe_batch": 4,
    "probe_steps": 2,
    "epoch_train_size": 24,
    "budget_gb": 0.001,
    "budget_batch": 4,
    "budget_control_batch": 0,
}

HELP = {
    "sections": "which sections to run, e.g. 1,3",
    "user_train_size": "section 0: data.synthetic_train_size of the README's commands",
    "user_steps": "section 0: measure.steps of the two single runs",
    "user_trial_samples": "section 0: sweep.trial_samples of the knee grid",
    "user_trial_warmup_samples": "section 0: sweep.trial_warmup_samples of the knee grid",
    "isolation_small": "section 5: the micro-batch of the cells that fit",
    "isolation_big": "section 5: the micro-batch of the cells a failpoint fails",
    "isolation_cap_gb": "section 5: measure.memory_budget_gb of the cell that runs out for real (at --budget-batch)",
    "budget_s": "seconds the whole script may take; sections skip or shorten to stay inside it",
    "overhead_sizes": "section 1: micro-batches, comma-separated",
    "overhead_rounds": "section 1: A B rounds per micro-batch",
    "overhead_steps": "section 1: measured optimizer steps per run (measure.samples = steps x micro-batch)",
    "overhead_warmup_steps": "section 1: warm-up steps per run (measure.warmup_samples = steps x micro-batch)",
    "overhead_train_size": "section 1: data.synthetic_train_size",
    "overhead_max_s": "section 1: no new round starts after this many seconds",
    "bart_heads": "attention heads of the KoBART-shaped BART (default: the published KoBART's)",
    "qlora_batch": "section 2: micro-batch",
    "qlora_steps": "section 2: measured steps",
    "qlora_warmup_steps": "section 2: warm-up steps (the first is the FLOP-counted one)",
    "qlora_layers": "section 2: decoder layers (28 = Llama-3.2-3B)",
    "qlora_train_size": "section 2: data.synthetic_train_size",
    "qlora_min_s": "section 2: skipped when fewer seconds than this are left of --budget-s",
    "probe_batch": "sections 3 and 4: micro-batch of the trial and the epoch",
    "probe_steps": "section 3: measured steps of the trial cell",
    "epoch_train_size": "sections 3 and 4: data.synthetic_train_size (the epoch's size)",
    "budget_gb": "section 4: measure.memory_budget_gb of the capped run",
    "budget_batch": "section 4: the over-large micro-batch run under the cap",
    "budget_control_batch": "section 4: a micro-batch that fits, run under the same cap (0: none)",
}

# (key, title, section): the order the runs go in; 4b and 4 both run with section 4
PLAN = [
    ("0", "0. the README's GPU commands on hub-shaped folders", user.readme_commands),
    ("5", "5. a failed cell leaves nothing behind for the next", user.failed_cells_leave_nothing),
    ("1", "1. loop overhead: summ vs a bare asynchronous loop", overhead),
    ("3", "3. memory: trial (probe) peak vs a full epoch's observed peak", probe_vs_epoch),
    ("4b", "4. memory budget: allocator cap at measure.memory_budget_gb", budget_cap),
    ("2", "2. QLoRA MFU: summ's counted FLOPs vs analytic 6N", qlora_mfu),
    ("6", "6. memory by part and time by phase vs the allocator and CUDA events", parts_and_phases),
    ("7", "7. levers: fused and 8-bit optimizers' state, packing's padding", levers),
    ("4", "4. context and fragmentation, every run above", context_and_fragmentation),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Sections:\n" + __doc__[__doc__.index("1. Loop overhead") :],
    )
    ap.add_argument("--quick", action="store_true", help="shrink every section for a first smoke on a GPU (~3 min)")
    ap.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="run every section at toy size on the CPU (checks the script, figures mean nothing)",
    )
    ap.add_argument(
        "--json", default=None, help="where the figures go (default: $OUT/gpu_check.json, else ./gpu_check.json)"
    )
    for name, default in DEFAULTS.items():
        kind = type(default) if not isinstance(default, str) else str
        ap.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=None,
            help=f"{HELP[name]} (default {default}; --quick {QUICK.get(name, default)})",
        )
    args = ap.parse_args(argv)
    preset = SMOKE if args.cpu_smoke else QUICK if args.quick else {}
    for name, default in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, preset.get(name, default))
    args.overhead_sizes = [int(x) for x in str(args.overhead_sizes).split(",") if x.strip()]
    args.sections = {x.strip() for x in str(args.sections).split(",") if x.strip()}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print(
            "CUDA is not available on this machine: the GPU check needs an NVIDIA GPU. Nothing was run "
            "(--cpu-smoke runs the sections at toy size on the CPU, to check the script)."
        )
        return 0
    device = torch.device("cuda") if torch.cuda.is_available() and not args.cpu_smoke else torch.device("cpu")
    out = os.environ.get("OUT")
    json_path = Path(args.json) if args.json else (Path(out) if out else Path.cwd()) / "gpu_check.json"
    mode = "--cpu-smoke (toy sizes, figures mean nothing)" if args.cpu_smoke else "--quick" if args.quick else "full"
    ok = True
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        ctx = Context(args, device, json_path, Path(scratch))
        print(
            f"machine: {ctx.report['machine']}\nmode: {mode}; budget {args.budget_s:.0f} s; sections "
            f"{','.join(sorted(args.sections))}; figures -> {json_path}",
            flush=True,
        )
        for key, title, fn in PLAN:
            if key.rstrip("b") in args.sections:
                ok = section(ctx, key, title, fn) and ok
    print(
        f"\n=== done in {ctx.elapsed():.0f} s: "
        + ", ".join(f"{k} {v['status']} ({v['elapsed_s']:.0f} s)" for k, v in ctx.report["sections"].items())
    )
    print(f"figures: {json_path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
