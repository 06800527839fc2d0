"""Sections 3 and 4 of the GPU check (benchmarks/gpu_check.py runs them): a trial's probe against
a full epoch's peak, a run under the allocator cap, and every run's context and fragmentation."""

from __future__ import annotations

from typing import Any

from common import fmt, gib, table
from gpu_check_runs import Context, kobart, mem_dict, summ_run, window

from summ.errors import MEMORY_STATUSES, Status


def probe_vs_epoch(ctx: Context) -> dict:
    a = ctx.args
    base = kobart(a) + [
        f"data.synthetic_train_size={a.epoch_train_size}",
        f"batch.batch_size={a.probe_batch}",
        "batch.gradient_accumulation_steps=1",
    ]
    trial = summ_run(
        ctx,
        f"s3 trial bs{a.probe_batch}",
        base + window(a.probe_batch, a.probe_steps, 3) + ["measure.memory_probe=true"],
    )
    epoch = summ_run(ctx, f"s3 epoch bs{a.probe_batch}", base + ["train.epochs=1", "measure.memory_probe=false"])
    tm, em = trial.memory, epoch.memory
    ratio = tm.peak_bytes / em.observed_peak_bytes if em.observed_peak_bytes else None
    observed = tm.observed_peak_bytes / em.observed_peak_bytes if em.observed_peak_bytes else None
    rows = [
        ["trial memory.peak_bytes (worst of observed and probe)", gib(tm.peak_bytes)],
        ["trial memory.probe_peak_bytes", gib(tm.probe_peak_bytes)],
        ["trial memory.observed_peak_bytes", gib(tm.observed_peak_bytes)],
        [
            f"epoch observed_peak_bytes ({epoch.train.total_optimizer_steps} steps, probe off)",
            gib(em.observed_peak_bytes),
        ],
        ["trial peak / epoch observed (target >= 0.95)", fmt(ratio)],
        ["trial observed only / epoch observed (no probe)", fmt(observed)],
        ["trial steps measured + warm-up", f"{trial.train.optimizer_steps} + {trial.train.warmup_optimizer_steps}"],
    ]
    print(table(rows, ["figure", "value"]))
    print(
        "The probe is one micro-batch at the training set's widest input and label. Without it, the trial "
        "sees only the batches it happened to draw; the last ratio shows how far that falls short of an epoch."
    )
    return {
        "trial": mem_dict(trial),
        "epoch": mem_dict(epoch),
        "trial_peak_over_epoch": ratio,
        "trial_observed_over_epoch": observed,
        "target": 0.95,
        "target_met": ratio is not None and ratio >= 0.95,
        "epoch_steps": epoch.train.total_optimizer_steps,
    }


def budget_cap(ctx: Context) -> dict:
    a = ctx.args
    base = kobart(a) + [f"data.synthetic_train_size={a.epoch_train_size}", f"measure.memory_budget_gb={a.budget_gb}"]
    out: dict[str, Any] = {"budget_gb": a.budget_gb}
    rows = []
    cells = ([("control", a.budget_control_batch, True)] if a.budget_control_batch else []) + [
        ("over-large", a.budget_batch, False)
    ]
    for name, bs, expect in cells:
        m = summ_run(ctx, f"s4 cap {name} bs{bs}", base + window(bs, 2, 1), expect_ok=False)
        mem = m.memory
        out[name] = {"micro_batch": bs, "status": m.status, "error": m.error, "phase": m.phase, "memory": mem_dict(m)}
        rows.append(
            [
                name,
                bs,
                m.status,
                gib(mem.budget_bytes if mem else None),
                gib(mem.limit_bytes if mem else None),
                gib(mem.peak_bytes if mem else None),
                mem.num_ooms if mem else "-",
                (m.error or "")[:90],
            ]
        )
        if expect and m.status != Status.ok:
            out[f"{name}_unexpected"] = True
    uncapped = [
        (label, m.memory.peak_bytes)
        for label, m in ctx.runs
        if m.memory is not None and not label.startswith("s4 cap") and m.status == Status.ok
    ]
    print(
        table(
            [[str(x) for x in r] for r in rows],
            ["run", "micro-batch", "status", "budget GiB", "limit GiB", "peak GiB", "ooms", "error"],
        )
    )
    if uncapped:
        label, peak = max(uncapped, key=lambda x: x[1])
        print(f"largest uncapped peak so far: {gib(peak)} GiB ({label})")
        out["largest_uncapped_peak"] = {"label": label, "peak_bytes": peak}
    failed_as_card = out["over-large"]["status"] in MEMORY_STATUSES
    out["over_large_failed_as_expected"] = failed_as_card
    verdict = f"as a {a.budget_gb:g} GB card would" if failed_as_card else "NOT failed: raise --budget-batch"
    print(f"over-large micro-batch under the {a.budget_gb:g} GB cap: {out['over-large']['status']} ({verdict})")
    return out


def context_and_fragmentation(ctx: Context) -> dict:
    rows, records, latest = [], [], {}
    for label, m in ctx.runs:  # one row per kind of run: its last
        latest[label] = m
    for label, m in latest.items():
        mem = m.memory
        if mem is None:
            rows.append([label, m.status, "-", "-", "-", "-", "-", "-"])
            continue
        cuda = mem.source.startswith("cuda")  # on the CPU "reserved" is the resident set: no fragmentation figure
        frag = mem.reserved_peak_bytes - mem.peak_bytes if cuda and mem.reserved_peak_bytes is not None else None
        records.append(
            {
                "label": label,
                "status": m.status,
                "context_bytes": mem.context_bytes,
                "peak_bytes": mem.peak_bytes,
                "reserved_peak_bytes": mem.reserved_peak_bytes,
                "fragmentation_bytes": frag,
                "fragmentation_fraction": frag / mem.reserved_peak_bytes
                if frag is not None and mem.reserved_peak_bytes
                else None,
                "alloc_retries": mem.alloc_retries,
                "num_ooms": mem.num_ooms,
                "source": mem.source,
            }
        )
        rows.append(
            [
                label,
                m.status,
                gib(mem.context_bytes),
                gib(mem.peak_bytes),
                gib(mem.reserved_peak_bytes),
                gib(frag),
                fmt(records[-1]["fragmentation_fraction"], ".1%"),
                "-" if mem.alloc_retries is None else mem.alloc_retries,
            ]
        )
    print(
        table(
            [[str(x) for x in r] for r in rows],
            [
                "run",
                "status",
                "context GiB",
                "peak GiB",
                "reserved GiB",
                "reserved-peak GiB",
                "of reserved",
                "alloc retries",
            ],
        )
    )
    print(
        "context: device memory in use at the run's start that is not this process's allocator (CUDA context, "
        "other processes). reserved - peak: what the caching allocator held beyond the live peak (fragmentation)."
    )
    return {"runs": records}
