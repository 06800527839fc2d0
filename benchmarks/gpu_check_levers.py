"""Section 7 of the GPU check (benchmarks/gpu_check.py runs it): the levers beyond the batch on a GPU.

  - optimizers, on the KoBART-shaped full fine-tune (one trial each): train.optimizer=adamw must
    build the fused kernel on CUDA (metrics `optimizer` = adamw_fused); adamw_8bit and
    paged_adamw_8bit (bitsandbytes; the paged one only runs on CUDA) must hold their state at
    about a quarter of AdamW's (8-bit moments for tensors of 4096+ elements: target <= 0.30); each
    with its samples/s, peak and the optimizer phase's time per step;
  - packing, on the Llama-3.2-3B-shaped QLoRA model: padded, length-grouped and packed
    (data.packing=true, flash_attention_2 where flash-attn is installed, else sdpa; and on
    sdpa_varlen, whose per-sample sdpa calls cost kernel launches on a GPU) with its rows capped
    and not, and micro-batches filled to a token budget (batch.max_tokens): pad fraction
    (target: packed under 0.05), samples/s and peak. A packed run that completes has passed the
    setup's isolation check on the model itself;
  - compile, on the KoBART-shaped model: train.compile=true against the eager adamw run above:
    samples/s after the compile warm-up, the seconds compiling, and no compilation inside the
    measured steps (target: train.recompiles == 0).
--cpu-smoke runs both at toy size on the CPU (no paged optimizer there: it is refused off CUDA).
"""

from __future__ import annotations

import importlib.util

from common import fmt, gib, table
from gpu_check_runs import Context, kobart, llama_3b, summ_run, window


def _row(name: str, m) -> list[str]:
    t, c = m.train, m.memory.components
    optimizer_s = (t.phase_seconds or {}).get("optimizer", 0.0) / max(t.optimizer_steps, 1)
    state = c.optimizer_state_bytes if c is not None else None
    return [
        name,
        m.optimizer or "-",
        fmt(t.samples_per_s, ".1f"),
        fmt(t.pad_fraction, ".3f"),
        gib(m.memory.peak_bytes),
        fmt(optimizer_s * 1000, ".1f"),
        gib(state),
    ]


def levers(ctx: Context) -> dict:
    a, cuda = ctx.args, ctx.device.type == "cuda"
    rows, out = [], {"optimizers": {}, "layouts": {}}
    base = kobart(a) + window(a.probe_batch, a.probe_steps, 3)
    names = ["adamw", "adamw_8bit"] + (["paged_adamw_8bit"] if cuda else [])
    for name in names:
        m = summ_run(ctx, f"s7 {name}", base + [f"train.optimizer={name}"])
        rows.append(_row(f"kobart {name}", m))
        out["optimizers"][name] = {
            "built": m.optimizer,
            "samples_per_s": m.train.samples_per_s,
            "peak_bytes": m.memory.peak_bytes,
            "optimizer_state_bytes": m.memory.components.optimizer_state_bytes,
        }
    adamw = out["optimizers"]["adamw"]["optimizer_state_bytes"] or 1
    ratios = {n: (r["optimizer_state_bytes"] or 0) / adamw for n, r in out["optimizers"].items() if n != "adamw"}
    attention = "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"
    llama = llama_3b(a) + window(a.qlora_batch, a.qlora_steps, max(2, a.qlora_warmup_steps))
    layouts = {  # name: (attention, overrides)
        "padded": (attention, []),
        "grouped": (attention, ["data.group_by_length=true"]),
        "packed": (attention, ["data.packing=true"]),
        "packed sdpa_varlen": ("sdpa_varlen", ["data.packing=true"]),  # one sdpa launch per sample and layer
        "packed rows<=2048": (attention, ["data.packing=true", "data.max_packed_len=2048"]),
        "token budget": (attention, [f"batch.max_tokens={max(2048, a.qlora_batch * 512)}"]),  # ~ the micro-batch
    }
    for name, (kernel, extra) in layouts.items():
        m = summ_run(ctx, f"s7 {name}", llama + [f"model.attn_implementation={kernel}", *extra])
        rows.append(_row(f"llama {name} ({kernel})", m))
        out["layouts"][name] = {
            "pad_fraction": m.train.pad_fraction,
            "samples_per_s": m.train.samples_per_s,
            "peak_bytes": m.memory.peak_bytes,
        }
    m = summ_run(ctx, "s7 kobart compiled", base + ["train.compile=true"])
    rows.append(_row("kobart adamw compiled", m))
    out["compiled"] = {
        "samples_per_s": m.train.samples_per_s,
        "x_eager": m.train.samples_per_s / out["optimizers"]["adamw"]["samples_per_s"],
        "compile_seconds": m.train.compile_seconds,
        "recompiles": m.train.recompiles,
    }
    print(table(rows, ["run", "optimizer", "samples/s", "pad", "peak", "optimizer ms/step", "state"]))
    print(f"compiled kobart: {out['compiled']}")
    out["state_ratio_to_adamw"] = ratios
    out["target_met"] = (
        (not cuda or out["optimizers"]["adamw"]["built"] == "adamw_fused")
        and all(r <= 0.30 for r in ratios.values())
        and out["layouts"]["packed"]["pad_fraction"] < 0.05
        and out["compiled"]["recompiles"] == 0
    )
    return out
