"""Section 6 of the GPU check (benchmarks/gpu_check.py runs it): memory by part and time by phase
against the CUDA allocator and the host's clock.

For the KoBART-shaped full fine-tune and the Llama-3.2-3B-shaped QLoRA run, one trial each, with
torch.cuda.memory_allocated read at every phase mark of the measured steps (the clock's own marks,
wrapped; reading the allocator's counter does not synchronize):
  - static: allocated after the optimizer's zeroing, above what was allocated before the run,
    against weights + optimizer state counted from the tensors (target within 3%: cuBLAS's
    workspaces come from the same allocator, and the step's micro-batches are still referenced);
  - gradients: allocated after the last backward minus before the first forward of the same
    step, against gradients + logits (the logits are still referenced when backward's mark is
    taken), target within 10%;
  - phases: the CUDA events' split against the step time the host measured (the sum of
    train.phase_seconds against train.seconds, target within 5%), forward, backward and optimizer
    each above zero;
  - cost: the same cell with measure.phase_timing=false, samples/s side by side (one pair: noisy).
"""

from __future__ import annotations

from common import fmt, gib, table
from gpu_check_runs import Context, kobart, llama_3b, summ_run, window


def _recorded_marks(ctx: Context, label: str, overrides: list[str]):
    """A summ run with (phase, allocated bytes) recorded at every mark of the step clock."""
    import torch

    from summ.measure import timing

    marks: list[tuple[str, int]] = []
    original = timing.StepClock.mark
    cuda = ctx.device.type == "cuda"

    def mark(self, phase: str) -> None:
        original(self, phase)
        marks.append((phase, torch.cuda.memory_allocated(ctx.device) if cuda else 0))

    before = torch.cuda.memory_allocated(ctx.device) if cuda else 0
    timing.StepClock.mark = mark
    try:
        m = summ_run(ctx, label, overrides)
    finally:
        timing.StepClock.mark = original
    return m, marks, before


def _last_step(marks: list[tuple[str, int]]) -> dict[str, list[int]]:
    """The last complete step's allocated bytes at each phase mark, in order."""
    starts = [i for i, (phase, _) in enumerate(marks) if phase == "bookkeeping"]
    step = marks[starts[-2] : starts[-1]] if len(starts) >= 2 else marks
    out: dict[str, list[int]] = {}
    for phase, allocated in step:
        out.setdefault(phase, []).append(allocated)
    return out


def _one(ctx: Context, name: str, overrides: list[str]) -> tuple[list, dict, bool]:
    m, marks, before = _recorded_marks(ctx, f"s6 {name}", overrides)
    c, t = m.memory.components, m.train
    step = _last_step(marks)
    static = step["optimizer"][-1] - before if "optimizer" in step else None
    counted_static = c.weights_bytes + (c.optimizer_state_bytes or 0)
    grown = step["backward"][-1] - step["copy"][0] if "backward" in step and "copy" in step else None
    counted_grown = (c.gradients_bytes or 0) + (c.logits_bytes or 0)
    phases = sum((t.phase_seconds or {}).values())
    off = summ_run(ctx, f"s6 {name} phase_timing=false", overrides + ["measure.phase_timing=false"])
    checks = {
        "static_ratio": static / counted_static if static else None,
        "gradients_ratio": grown / counted_grown if grown and counted_grown else None,
        "phases_ratio": phases / t.seconds if t.seconds else None,
        "cost_ratio": t.samples_per_s / off.train.samples_per_s if off.train.samples_per_s else None,
    }
    ok = (
        checks["static_ratio"] is not None
        and abs(checks["static_ratio"] - 1) <= 0.03
        and checks["gradients_ratio"] is not None
        and abs(checks["gradients_ratio"] - 1) <= 0.10
        and checks["phases_ratio"] is not None
        and abs(checks["phases_ratio"] - 1) <= 0.05
        and all((t.phase_seconds or {}).get(p, 0) > 0 for p in ("forward", "backward", "optimizer"))
    )
    rows = [
        [name, "static: allocated after zeroing / weights + optimizer state", gib(static), gib(counted_static)],
        [name, "gradients: allocated backward - forward / gradients + logits", gib(grown), gib(counted_grown)],
        [name, "phases: sum of CUDA-event phases / step time (host)", fmt(phases, ".3f"), fmt(t.seconds, ".3f")],
        [
            name,
            "samples/s with phase marks / without",
            fmt(t.samples_per_s, ".1f"),
            fmt(off.train.samples_per_s, ".1f"),
        ],
    ]
    record = {"checks": checks, "components": vars(c), "phase_seconds": t.phase_seconds, "ok": ok}
    return rows, record, ok


def parts_and_phases(ctx: Context) -> dict:
    a = ctx.args
    runs = {
        "kobart": kobart(a) + window(a.probe_batch, a.probe_steps, 3),
        "llama_qlora": llama_3b(a) + window(a.qlora_batch, a.qlora_steps, max(2, a.qlora_warmup_steps)),
    }
    rows, out = [], {}
    for name, overrides in runs.items():
        r, out[name], _ = _one(ctx, name, overrides)
        rows += r
    print(table(rows, ["run", "check", "measured", "counted / reference"]))
    out["target_met"] = all(out[n]["ok"] for n in runs)
    return out
