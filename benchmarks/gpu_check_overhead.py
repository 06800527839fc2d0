"""Section 1 of the GPU check (benchmarks/gpu_check.py runs it): summ's loop against the bare
reference loop (common.bare_loop) on the KoBART-shaped BART, alternating A B, B A per micro-batch."""

from __future__ import annotations

import time
from typing import Any

from common import bare_loop, median, paired_ratio, release, round_order, same_inputs, table
from gpu_check_runs import Context, kobart, summ_run, window

TARGET = 0.98


def overhead(ctx: Context) -> dict:
    a = ctx.args
    base = kobart(a) + [f"data.synthetic_train_size={a.overhead_train_size}"]
    t0 = time.perf_counter()
    inputs = same_inputs(base)  # built once: each run trains a copy of the same init
    print(
        f"bare loop's data and model prepared in {time.perf_counter() - t0:.1f} s; "
        f"{a.overhead_steps} measured + {a.overhead_warmup_steps} warm-up steps per run, "
        f"up to {a.overhead_rounds} rounds per micro-batch, A B then B A",
        flush=True,
    )

    def summ_side(bs: int, steps: int, warmup_steps: int, label: str) -> dict:
        m = summ_run(ctx, label, base + window(bs, steps, warmup_steps))
        return {
            "samples_per_s": m.train.samples_per_s,
            "seconds": m.train.seconds,
            "final_loss": m.train.final_loss,
            "step_time_s_median": m.train.step_time_s_median,
        }

    def contenders(bs: int) -> dict:
        return {
            "summ": lambda: summ_side(bs, a.overhead_steps, a.overhead_warmup_steps, f"s1 summ bs{bs}"),
            "bare": lambda: bare_loop(inputs, ctx.device, bs, a.overhead_steps, a.overhead_warmup_steps, windowed=True),
        }

    # once per process, both sides: CUDA context, cuBLAS handles, allocator, worker start-up
    t0 = time.perf_counter()
    first = a.overhead_sizes[0]
    summ_side(first, 2, 1, "s1 process warm-up")
    bare_loop(inputs, ctx.device, first, 2, 1, windowed=True)
    print(f"process warm-up (discarded) {time.perf_counter() - t0:.1f} s", flush=True)
    ctx.runs = [r for r in ctx.runs if r[0] != "s1 process warm-up"]

    start, sizes, rows = time.perf_counter(), {}, []
    for bs in a.overhead_sizes:
        res, error = rounds(ctx, bs, contenders(bs), start)
        sizes[str(bs)] = fig = figures(res, error)
        rows.append(row(bs, fig))
    print()
    print(
        table(
            rows,
            [
                "micro-batch",
                "rounds",
                "summ samples/s",
                "bare samples/s",
                "summ/bare",
                "median per-round",
                f">= {TARGET}",
                "last-step loss diff",
                "bare: model syncs/step",
            ],
        )
    )
    print(
        "summ: run_job, samples/s over its measured steps (one sync per step). bare: CUDA events over the "
        "same window, one synchronize at its end; its own code never syncs, and the last column counts the "
        "host syncs the model's forward/backward makes by itself (CUDA sync debug mode, one warm-up step). "
        "Loss differences are bf16 and dropout noise, not data."
    )
    return {"per_micro_batch": sizes, "target": TARGET}


def rounds(ctx: Context, bs: int, contenders: dict, start: float) -> tuple[dict[str, list[dict]], str | None]:
    """Up to --overhead-rounds rounds at micro-batch `bs`, in common.round_order (A B, B A, ...);
    no new round after --overhead-max-s or with under 150 s of the budget left. An error (e.g. out
    of memory) ends this micro-batch only: the rounds run so far are kept."""
    a = ctx.args
    res: dict[str, list[dict]] = {name: [] for name in contenders}
    try:
        for r in range(a.overhead_rounds):
            if r > 0 and (time.perf_counter() - start > a.overhead_max_s or ctx.left() < 150):
                print(f"  micro-batch {bs}: time is up after {r} round(s)", flush=True)
                break
            for name in round_order(list(contenders), r):
                out = contenders[name]()
                res[name].append(out)
                print(
                    f"  bs {bs} round {r + 1}: {name}: {out['samples_per_s']:.1f} samples/s "
                    f"({out['seconds']:.2f} s measured, loss {out['final_loss']:.4f})",
                    flush=True,
                )
    except Exception as exc:  # noqa: BLE001 one micro-batch (e.g. out of memory) must not cost the others
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        print(f"  micro-batch {bs} failed: {error}", flush=True)
        release()
        return res, error
    return res, None


def figures(res: dict[str, list[dict]], error: str | None) -> dict:
    """One micro-batch's figures over its complete rounds (both contenders ran)."""
    fig: dict[str, Any] = {"summ": res["summ"], "bare": res["bare"], "error": error}
    n = min(len(res["summ"]), len(res["bare"]))
    if n:
        s, b = median(res["summ"][:n], "samples_per_s"), median(res["bare"][:n], "samples_per_s")
        fig["bare_model_syncs_per_step"] = res["bare"][0].get("model_syncs_per_step")
        fig.update(
            rounds=n,
            summ_median=s,
            bare_median=b,
            ratio=s / b,
            paired_ratio=paired_ratio(res["summ"][:n], res["bare"][:n], "samples_per_s"),
            loss_difference=abs(res["summ"][n - 1]["final_loss"] - res["bare"][n - 1]["final_loss"]),
            target_met=s / b >= TARGET,
        )
    return fig


def row(bs: int, fig: dict) -> list:
    if not fig.get("rounds"):
        return [bs, 0, "-", "-", "-", "-", "-", fig["error"] or "no round ran", "-"]
    syncs = fig["bare_model_syncs_per_step"]
    return [
        bs,
        fig["rounds"],
        f"{fig['summ_median']:.1f}",
        f"{fig['bare_median']:.1f}",
        f"{fig['ratio']:.3f}",
        f"{fig['paired_ratio']:.3f}",
        "yes" if fig["target_met"] else "NO",
        f"{fig['loss_difference']:.1e}",
        "-" if syncs is None else syncs,
    ]
