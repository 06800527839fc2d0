"""The short table a run prints at its end: the figures users compare, with their units."""

from __future__ import annotations

from pathlib import Path

from summ.run_folder import GIB, METRICS_FILE


def _fmt(value, spec: str = ".3g", unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:{spec}}{unit}"


def _interval(i) -> str:
    return f"  (steps: {i[0]:.1f}-{i[1]:.1f}, interquartile)" if i else ""


def gib(n_bytes: float | None) -> float | None:
    return None if n_bytes is None else n_bytes / GIB


def _generation_rows(ev: dict, what: str) -> list[tuple[str, str]]:
    rows = [
        (
            f"{what} generation",
            f"{_fmt(ev.get('generation_ms_per_sample'), '.1f', ' ms/sample')}, "
            f"{_fmt(ev.get('generation_samples_per_s'), '.2f', ' samples/s')} "
            f"(batch {ev.get('batch_size', '-')}, sorted by length: {ev.get('sort_by_length', '-')})",
        )
    ]
    q = ev.get("quantized") or (ev if ev.get("unquantized") else None)
    if q:
        rows.append(
            (
                "quantized",
                f"{q.get('quantization', '')}: ROUGE mean change {_fmt(q.get('rouge_mean_change'), '+.4f')}, "
                f"speed-up {_fmt(q.get('speedup'), '.2f', 'x')} against unquantized",
            )
        )
    return rows


def format_predict_summary(m: dict, output_dir: Path | None = None) -> str:
    ev, pr, inf = m.get("eval") or {}, m.get("predict") or {}, m.get("inference") or {}
    rows = [
        ("status", m["status"] + (f" ({m['error']})" if m.get("error") else "")),
        ("model / device", f"{m['model']} / {m.get('device')}"),
        ("weights", f"{m.get('trained_from', '-')}" + (" (LoRA adapter)" if m.get("lora_adapter") else "")),
        (
            "inference",
            f"quantization {inf.get('quantization', '-')}, "
            f"{_fmt(gib(inf.get('model_bytes')), '.3f', ' GiB')} of weights",
        ),
    ]
    if ev:
        rows.append(
            (
                "dev ROUGE-1/2/L",
                " / ".join(_fmt(ev.get(k), ".4f") for k in ("rouge1", "rouge2", "rougeL"))
                + f"  (mean {_fmt(ev.get('rouge_mean'), '.4f')}, n={ev.get('n')})",
            )
        )
        rows += _generation_rows(ev, "dev")
    if pr:
        rows.append(
            (
                "submission",
                f"{pr['rows']} rows in {pr['file']} ({_fmt(pr.get('generation_ms_per_sample'), '.1f', ' ms/sample')})",
            )
        )
    if m.get("solar"):
        s = m["solar"]
        rows.append(
            (
                "solar api",
                f"{s['model']} {s['prompt_strategy']}: {s['requests_sent']} requests, "
                f"{s['cache_hits']} cached, {s['retries']} retries",
            )
        )
    if output_dir is not None:
        rows.append(("metrics", str(Path(output_dir) / METRICS_FILE)))
    return _table(rows)


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _batch_text(m: dict, t: dict) -> str:
    """The batch shape; a token budget's samples per step are the measured steps' mean."""
    accumulation = f" x accum {m['gradient_accumulation_steps']}"
    if m.get("max_tokens") is None:
        return f"micro {m['batch_size']}{accumulation} = effective {m.get('effective_batch_size')}"
    steps = t.get("optimizer_steps")
    mean = f" = {t['samples'] / steps:.1f} samples a step (mean)" if steps else ""
    return f"{m['max_tokens']} tokens a micro-batch{accumulation}{mean}"


def format_summary(m: dict, output_dir: Path | None = None) -> str:
    if m.get("mode") == "predict" or m.get("solar"):
        return format_predict_summary(m, output_dir)
    t, mem, ev = m.get("train") or {}, m.get("memory") or {}, m.get("eval") or {}
    rows = [
        ("status", m["status"] + (f" ({m['error']})" if m.get("error") else "")),
        ("model / device", f"{m['model']} / {m.get('device')} x{m.get('num_processes')}"),
        ("batch", _batch_text(m, t)),
        (
            "measured steps",
            f"{t.get('optimizer_steps', 0)} optimizer, {t.get('micro_steps', 0)} micro "
            f"(+{t.get('warmup_optimizer_steps', 0)} warmup)",
        ),
        (
            "samples/s",
            _fmt(t.get("samples_per_s"), ".2f")
            + _interval(t.get("samples_per_s_interval"))
            + (
                f"  (all {m['num_processes']} processes; {_fmt(t.get('samples_per_s_per_process'), '.2f')} per process)"
                if (m.get("num_processes") or 1) > 1
                else ""
            ),
        ),
        ("tokens/s", _fmt(t.get("tokens_per_s"), ".0f") + f"  (pad {_fmt(t.get('pad_fraction'), '.1%')} of positions)"),
        ("ms per sample", _fmt(1000 * t["seconds_per_sample"] if t.get("seconds_per_sample") else None, ".1f")),
        (
            "step time",
            f"median {_fmt(t.get('step_time_s_median'), '.3f', ' s')}, "
            f"p90 {_fmt(t.get('step_time_s_p90'), '.3f', ' s')}",
        ),
        (
            "peak memory",
            f"{_fmt(gib(mem.get('peak_bytes')), '.3f', ' GiB')} "
            f"({_fmt(mem.get('fraction'), '.1%')} of capacity, {mem.get('source', '-')}; steps "
            f"{_fmt(gib(mem.get('observed_peak_bytes')), '.3f', ' GiB')}, worst-batch probe "
            f"{_fmt(gib(mem.get('probe_peak_bytes')), '.3f', ' GiB')}, evaluation "
            f"{_fmt(gib(mem.get('eval_peak_bytes')), '.3f', ' GiB')})",
        ),
        *_why_rows(t, mem),
        (
            "epoch (projected)",
            _fmt(m.get("epoch_seconds_projected"), ".1f", " s")
            + (f"  (this run's loop: {t['loop_seconds']:.1f} s)" if t.get("loop_seconds") else ""),
        ),
        ("MFU / HFU", f"{_fmt(m.get('mfu'), '.1%')} / {_fmt(m.get('hfu'), '.1%')}"),
        ("final train loss", _fmt(t.get("final_loss"), ".4f")),
    ]
    if t.get("compile_seconds") is not None:
        recompiles = t.get("recompiles")
        rows.append(
            (
                "compile",
                f"{t['compile_seconds']:.1f} s compiling (torch.compile), in the warm-up before the measured steps; "
                + ("-" if recompiles is None else str(recompiles))
                + " compilations inside the measured steps",
            )
        )
    busy = busy_warning(m.get("machine"))
    if busy:
        rows.append(("warning", busy))
    outside = outside_warning(t)
    if outside:
        rows.append(("warning", outside))
    if m.get("eval"):
        rows += [
            ("eval loss", _fmt(ev.get("loss"), ".4f")),
            (
                "ROUGE-1/2/L",
                " / ".join(_fmt(ev.get(k), ".4f") for k in ("rouge1", "rouge2", "rougeL"))
                + f"  (sum {_fmt(ev.get('rouge_sum'), '.4f')}, mean {_fmt(ev.get('rouge_mean'), '.4f')}, "
                f"n={ev.get('n')})",
            ),
        ]
        if m.get("random_init") and ev.get("rouge_mean") is not None:
            rows.append(
                (
                    "",
                    "a randomly initialised test-size model: ROUGE near zero is expected; real scores "
                    "need pretrained weights (model=kobart model.path=...)",
                )
            )
        if ev.get("generation_ms_per_sample") is not None:
            rows += _generation_rows(ev, "dev")
    rows += _pipeline_rows(m, ev)
    if m.get("profile"):
        rows.append(("profile", profile_text(m["profile"])))
    if output_dir is not None:
        rows.append(("metrics", str(Path(output_dir) / METRICS_FILE)))
    return _table(rows)


def size_text(n: float | None) -> str:
    """Bytes in the unit that reads best: GiB from 1 GiB up, else MiB, else KiB."""
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n / 1024:.3g} KiB"


def parts_text(c: dict) -> str:
    """metrics.memory.components in a line: the counted parts, then the measured rest."""
    storage = c.get("weights_bytes_by_storage") or {}
    weights = size_text(c.get("weights_bytes"))
    if len(storage) > 1:
        weights += " (" + ", ".join(f"{k} {size_text(v)}" for k, v in storage.items()) + ")"
    elif storage:
        weights += f" ({next(iter(storage))})"
    named = ", ".join(
        f"{what} {size_text(c[key])}"
        for what, key in (("logits", "logits_bytes"), ("loss rows", "loss_float32_rows_bytes"))
        if c.get(key)
    )
    parts = [
        f"weights {weights}",
        f"gradients {size_text(c.get('gradients_bytes'))}",
        f"optimizer state {size_text(c.get('optimizer_state_bytes'))}",
        f"activations {size_text(c.get('activations_bytes'))}" + (f" (of which {named})" if named else ""),
    ]
    if c.get("allocator_reserve_bytes") is not None:
        parts.append(f"allocator reserve {size_text(c['allocator_reserve_bytes'])}")
    return "; ".join(parts)


def profile_text(p: dict) -> str:
    """metrics.profile: the recorded step's files and what opens them."""
    text = f"step {p['step']}: {p['trace']} (Perfetto, chrome://tracing, TensorBoard's profiler)"
    if p.get("memory_snapshot"):
        text += f"; {p['memory_snapshot']} (pytorch.org/memory_viz)"
    return text


def phases_text(phases: dict) -> str:
    """train.phase_seconds as shares of the measured steps' time, largest first."""
    total = sum(phases.values())
    if not total:
        return "-"
    ranked = sorted(phases.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v / total:.1%}" for k, v in ranked if v > 0)


def _why_rows(t: dict, mem: dict) -> list[tuple[str, str]]:
    rows = []
    if mem.get("components"):
        rows.append(("memory by part", parts_text(mem["components"])))
    if t.get("phase_seconds"):
        rows.append(("time by phase", phases_text(t["phase_seconds"])))
    return rows


def outside_warning(t: dict) -> str | None:
    """The headline samples/s (measured samples over measured time) outside the interquartile range
    of its own steps' rates: some steps were far slower (or faster) than the rest."""
    rate, i = t.get("samples_per_s"), t.get("samples_per_s_interval")
    if rate is None or not i or i[0] <= rate <= i[1]:
        return None
    side = "below" if rate < i[0] else "above"
    return (
        f"samples/s {rate:.2f} lies {side} the middle half of its own steps' rates ({i[0]:.1f}-{i[1]:.1f}): "
        f"a few steps were far {'slower' if side == 'below' else 'faster'} than the rest (another job, a "
        f"pause, the widest batches); see the step times in train_history.jsonl"
    )


def busy_warning(machine: dict | None) -> str | None:
    """One line for the summary and the reports when the timing was taken on a busy machine."""
    if not machine or not machine.get("busy"):
        return None
    parts = []
    worst = machine.get("other_runnable_threads_worst_stretch", machine.get("other_runnable_threads_mean"))
    if worst is not None:
        mean = machine.get("other_runnable_threads_mean") or 0
        parts.append(
            f"{worst:.1f} runnable threads of other processes on {machine['cores']} cores over the worst "
            f"stretch of the measured steps ({mean:.1f} on average)"
        )
    if machine.get("other_gpu_processes"):
        parts.append(f"{machine['other_gpu_processes']} other process(es) on the GPU")
    return (
        "timed on a busy machine (" + ", ".join(parts) + "): its samples/s is lower than the "
        "configuration's own; measure again when nothing else runs"
    )


def _pipeline_rows(m: dict, ev: dict) -> list[tuple[str, str]]:
    """The pipeline features a run used: quality filter, augmentation, TTA, K-fold and ensemble."""
    rows: list[tuple[str, str]] = []
    if m.get("data_quality"):
        dq = m["data_quality"]
        if dq.get("filtered", True):
            rows.append(
                (
                    "data quality",
                    f"{dq['train_dropped']} training samples under {dq['threshold']} left out (data_quality.csv)",
                )
            )
        else:
            rows.append(
                (
                    "data quality",
                    f"{dq['train_dropped']} training samples under {dq['threshold']} used as "
                    f"they are (data.validate=false; data_quality.csv)",
                )
            )
    if m.get("augmentation"):
        a = m["augmentation"]
        rows.append(
            (
                "augmentation",
                ", ".join(f"{k} +{v}" for k, v in a["added"].items()) + "".join(f", {k} skipped" for k in a["skipped"]),
            )
        )
    if ev.get("tta"):
        t = ev["tta"]
        rows.append(
            (
                "ROUGE mean with TTA",
                f"{t['rouge_mean']:.4f} ({'+'.join(t['methods'])} x{t['num_aug']}, "
                f"+{t['extra_ms_per_sample']:.0f} ms/sample)",
            )
        )
    if m.get("kfold"):
        kf, ens = m["kfold"], ev.get("ensemble") or {}
        rows.append(
            (
                "k-fold",
                f"{kf['k']} folds: ROUGE mean {_fmt(kf['rouge_mean']['mean'], '.4f')} "
                f"+/- {_fmt(kf['rouge_mean']['std'], '.4f')}; samples/s "
                f"{_fmt(kf['samples_per_s']['mean'], '.1f')}",
            )
        )
        if ens:
            rows.append(
                (
                    "ensemble",
                    f"{ens['strategy']}: ROUGE mean {_fmt(ev.get('rouge_mean'), '.4f')} (members "
                    + ", ".join(_fmt(r, ".4f") for r in ens["members_rouge_mean"])
                    + ")",
                )
            )
    return rows
