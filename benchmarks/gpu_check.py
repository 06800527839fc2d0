"""GPU check: what a user runs first on a GPU, and summ's loop, MFU and memory figures against
independent references, on one GPU.

    python benchmarks/gpu_check.py [--quick]

About 8 minutes on one H100 (--quick: about 3, for a first smoke); every size is a flag (--help).
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
1. Loop overhead. A KoBART-shaped BART (d_model 768, 6+6 layers, FFN 3072, vocabulary 30,000,
   bf16 autocast) at micro-batch 8, 32 and 128. summ's loop (run_job, a measure.samples window,
   the memory probe on, as sweeps run it) runs against a bare PyTorch loop: same init, same samples
   in the same order and batch shapes, fused AdamW, non_blocking copies from pinned memory,
   DataLoader workers, and no host sync per step. The bare loop is timed with CUDA events and one
   synchronize at the end of its window. The two alternate A B, B A. Prints median samples/s per
   contender and the ratio summ/bare (target >= 0.98: a probe billed to the first measured step,
   or any added sync, shows here first).
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

The runs go in the order 0, 5, 1, 3, 4 (capped run), 2, then the table of section 4. Where CUDA is
absent the script says so and exits 0. --cpu-smoke runs every section at toy size on the CPU
instead. Its figures mean nothing; it only checks the script's plumbing.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gpu_check_user as user
from common import compose, fmt, gib, machine, median, paired_ratio, release, table


# Sizes: full run, then what --quick and --cpu-smoke change (a flag given on the command line wins).
DEFAULTS: dict[str, Any] = {
    "sections": "0,1,2,3,4,5", "budget_s": 480.0,
    "user_train_size": 512, "user_steps": 5, "user_trial_samples": 32, "user_trial_warmup_samples": 16,
    "isolation_small": 8, "isolation_big": 64, "isolation_cap_gb": 6.0,
    "overhead_sizes": "8,32,128", "overhead_rounds": 2, "overhead_steps": 30, "overhead_warmup_steps": 3,
    "overhead_train_size": 3000, "overhead_max_s": 120.0, "bart_heads": 12,
    "qlora_batch": 4, "qlora_steps": 8, "qlora_warmup_steps": 2, "qlora_layers": 28, "qlora_train_size": 256,
    "qlora_min_s": 100.0,
    "probe_batch": 32, "probe_steps": 10, "epoch_train_size": 2000,
    "budget_gb": 24.0, "budget_batch": 256, "budget_control_batch": 32,
}
QUICK: dict[str, Any] = {
    "budget_s": 180.0, "user_train_size": 128, "user_steps": 3,
    "overhead_sizes": "8,32", "overhead_rounds": 1, "overhead_steps": 10, "overhead_train_size": 1000,
    "overhead_max_s": 40.0, "qlora_layers": 4, "qlora_steps": 3, "qlora_min_s": 40.0, "probe_steps": 4,
    "epoch_train_size": 640,
}
SMOKE: dict[str, Any] = {
    **QUICK, "budget_s": 480.0, "user_train_size": 24, "user_steps": 1, "user_trial_samples": 4,
    "user_trial_warmup_samples": 2, "isolation_small": 2, "isolation_big": 4, "isolation_cap_gb": 0.001,
    "overhead_sizes": "4", "overhead_steps": 3, "overhead_warmup_steps": 1, "overhead_train_size": 48,
    "qlora_batch": 2, "qlora_steps": 2, "qlora_warmup_steps": 1, "qlora_layers": 2, "qlora_train_size": 16,
    "probe_batch": 4, "probe_steps": 2, "epoch_train_size": 24, "budget_gb": 0.001, "budget_batch": 4,
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
    "bart_heads": "attention heads of the KoBART-shaped BART (the published KoBART config has 16)",
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

SECTION_TITLES = {"0": "0. the README's GPU commands on hub-shaped folders",
                  "5": "5. a failed cell leaves nothing behind for the next",
                  "1": "1. loop overhead: summ vs a bare asynchronous loop",
                  "2": "2. QLoRA MFU: summ's counted FLOPs vs analytic 6N",
                  "3": "3. memory: trial (probe) peak vs a full epoch's observed peak",
                  "4b": "4. memory budget: allocator cap at measure.memory_budget_gb",
                  "4": "4. context and fragmentation, every run above"}


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Sections:\n" + __doc__[__doc__.index("1. Loop overhead"):])
    ap.add_argument("--quick", action="store_true", help="shrink every section for a first smoke on a GPU (~3 min)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run every section at toy size on the CPU (checks the script, figures mean nothing)")
    ap.add_argument("--json", default=None, help="where the figures go (default: $OUT/gpu_check.json, else "
                                                 "./gpu_check.json)")
    for name, default in DEFAULTS.items():
        kind = type(default) if not isinstance(default, str) else str
        ap.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                        help=f"{HELP[name]} (default {default}; --quick {QUICK.get(name, default)})")
    args = ap.parse_args(argv)
    preset = SMOKE if args.cpu_smoke else QUICK if args.quick else {}
    for name, default in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, preset.get(name, default))
    args.overhead_sizes = [int(x) for x in str(args.overhead_sizes).split(",") if x.strip()]
    args.sections = {x.strip() for x in str(args.sections).split(",") if x.strip()}
    return args


# --------------------------------------------------------------------------- model shapes


def kobart(a) -> list[str]:
    """The KoBART-shaped BART (random init); --cpu-smoke keeps tiny_bart's toy size."""
    common = ["model=tiny_bart", "data=synthetic", "data.synthetic_eval_size=16", "train.mixed_precision=bf16",
              "eval.enabled=false", "train.save_model=false"]
    if a.cpu_smoke:
        return common + ["model.name=kobart_toy", "train.cpu=true"]
    return common + ["model.name=kobart_shaped", "model.tiny.d_model=768", "model.tiny.layers=6",
                     f"model.tiny.heads={a.bart_heads}", "model.tiny.ffn_dim=3072", "model.tiny.vocab_size=30000",
                     "model.tiny.max_positions=1024"]


def llama_3b(a) -> list[str]:
    """The Llama-3.2-3B-shaped model with QLoRA (the tiny_llama preset's LoRA), random init."""
    common = ["model=tiny_llama", "model.quantization=4bit", "model.gradient_checkpointing=true",
              "model.dtype=bfloat16", "data=synthetic", "data.synthetic_eval_size=16", "train.mixed_precision=bf16",
              "train.learning_rate=1e-4", "eval.enabled=false", "train.save_model=false"]
    if a.cpu_smoke:
        return common + ["model.name=llama_toy", f"model.tiny.layers={a.qlora_layers}", "train.cpu=true",
                         "measure.peak_tflops=1.0"]  # the CPU has no table entry: any peak exercises the figures
    return common + ["model.name=llama_3b_shaped", "model.tiny.d_model=3072", f"model.tiny.layers={a.qlora_layers}",
                     "model.tiny.heads=24", "model.tiny.kv_heads=8", "model.tiny.ffn_dim=8192",
                     "model.tiny.vocab_size=128256", "model.tiny.max_positions=2048"]


def window(bs: int, steps: int, warmup_steps: int) -> list[str]:
    return [f"batch.batch_size={bs}", "batch.gradient_accumulation_steps=1", f"measure.samples={steps * bs}",
            f"measure.warmup_samples={warmup_steps * bs}"]


def llama_params(d: int, layers: int, ffn: int, heads: int, kv_heads: int, vocab: int) -> int:
    """Parameters of a Llama from its shape, the tied embedding counted once (it is also the LM
    head, whose matmul is in 6N); a 4-bit model's own count is of packed storage."""
    kv = kv_heads * (d // heads)
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * ffn + 2 * d  # q, o; k, v; gate, up, down; two RMSNorms
    return vocab * d + layers * per_layer + d


# --------------------------------------------------------------------------- plumbing


class Context:
    def __init__(self, args, device, json_path: Path):
        self.args, self.device, self.json_path = args, device, json_path
        self.started = time.perf_counter()
        self.runs: list[tuple[str, Any]] = []  # (label, RunMetrics) of every summ run, for section 4
        self.report: dict[str, Any] = {"machine": machine(), "args": {k: (sorted(v) if isinstance(v, set) else v)
                                                                       for k, v in vars(args).items()},
                                       "sections": {}}

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.args.budget_s - self.elapsed()

    def save(self) -> None:
        self.report["elapsed_s"] = round(self.elapsed(), 1)
        # every summ run's memory so far: kept even if a later section is cut short
        self.report["runs"] = [{"label": label, "status": m.status, "error": m.error, "memory": mem_dict(m)}
                               for label, m in self.runs]
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_name(self.json_path.name + ".tmp")
        tmp.write_text(json.dumps(self.report, indent=1, default=str))
        tmp.replace(self.json_path)


def section(ctx: Context, key: str, fn: Callable[[Context], dict]) -> bool:
    """Run one section: header, elapsed time, its figures into the JSON; a failure is reported
    and recorded, and the next section runs."""
    print(f"\n=== {SECTION_TITLES[key]}  (t+{ctx.elapsed():.0f} s)", flush=True)
    start = time.perf_counter()
    record: dict[str, Any]
    try:
        record = {"status": "ok", **fn(ctx)}
        if record.get("target_met") is False and not ctx.args.cpu_smoke:  # toy figures meet nothing
            record["status"] = "missed its target"
    except Exception as exc:  # noqa: BLE001 (a failed section is reported; the next one runs)
        tb = traceback.format_exc()
        print("\n".join(tb.splitlines()[-15:]))
        record = {"status": "failed", "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500],
                  "traceback_tail": tb.splitlines()[-15:]}
    finally:
        release()
    record["elapsed_s"] = round(time.perf_counter() - start, 1)
    ctx.report["sections"][key] = record
    ctx.save()
    print(f"--- section {key}: {record['status']} in {record['elapsed_s']:.0f} s", flush=True)
    return record["status"] == "ok"


def summ_run(ctx: Context, label: str, overrides: list[str], expect_ok: bool = True):
    """One job through summ's own entry point (run_job); its metrics kept for section 4."""
    from summ.pipeline import run_job

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        m = run_job(compose(overrides), tmp)
    ctx.runs.append((label, m))
    if expect_ok and m.status != "ok":
        raise RuntimeError(f"{label}: summ run ended {m.status}: {m.error}")
    return m


def mem_dict(m) -> dict | None:
    import dataclasses

    return dataclasses.asdict(m.memory) if m.memory is not None else None


# --------------------------------------------------------------------------- section 1


class WindowTimer:
    """The bare loop's stopwatch: CUDA events, the device synchronised once before the window
    (outside it) and once at its end; the clock on the CPU."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.begin = self.torch.cuda.Event(enable_timing=True)
            self.begin.record()
        self.wall0 = time.perf_counter()

    def stop(self) -> tuple[float, float]:
        """(seconds by the events, or the clock on CPU; wall seconds)."""
        if self.cuda:
            end = self.torch.cuda.Event(enable_timing=True)
            end.record()
            self.torch.cuda.synchronize()  # the window's one synchronize
            wall = time.perf_counter() - self.wall0
            return self.begin.elapsed_time(end) / 1000.0, wall
        wall = time.perf_counter() - self.wall0
        return wall, wall


class SyncWatch:
    """Counts the host syncs CUDA's sync debug mode reports until stop() (None where it cannot):
    a diagnostic only, so it never fails the run it watches."""

    def __init__(self):
        import torch

        self.torch, self.seen, self._caught = torch, None, None
        try:
            self._caught = warnings.catch_warnings(record=True)
            self.seen = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        except Exception:  # noqa: BLE001
            self.stop()
            self.seen = None

    def stop(self) -> int | None:
        with contextlib.suppress(Exception):
            self.torch.cuda.set_sync_debug_mode("default")
        if self._caught is not None:
            self._caught.__exit__(None, None, None)
            self._caught = None
        if self.seen is None:
            return None
        return sum("synchroniz" in str(w.message).lower() for w in self.seen)


class BareLoop:
    """A plain PyTorch loop on what summ trains on: the same config, tokenized train set, seeded
    init (built once, copied per run), sampler window and collator, hence the same samples in the
    same order and the same batch shapes."""

    def __init__(self, overrides: list[str], device):
        import torch
        from omegaconf import OmegaConf

        from summ.data.splits import load_splits
        from summ.data.tokenize import Collator, Encoder, TokenizedDataset
        from summ.modeling import models

        self.device = device
        self.cfg = cfg = OmegaConf.to_object(compose(overrides))
        tok = models.load_tokenizer(cfg.model)
        enc = Encoder(tok, cfg.model.kind, cfg.model.prompt_template, cfg.data.encoder_max_len, cfg.data.decoder_max_len)
        self.ds = TokenizedDataset(load_splits(cfg.data).train, enc)
        loaded = models.load(cfg.model, tok, cfg.train.seed, torch.device("cpu"))  # summ's init: same seed, CPU
        self.model_cpu = loaded.model
        self.collator = Collator(tok.pad_token_id, cfg.model.kind, loaded.decoder_start_token_id)
        cuda = device.type == "cuda"
        self.workers = cfg.data.num_workers if cfg.data.num_workers is not None else (2 if cuda else 0)

    def run(self, bs: int, steps: int, warmup_steps: int) -> dict:
        import copy
        import math

        import torch
        import torch.nn.functional as F
        from transformers import get_scheduler

        from summ.data.sampler import EpochSampler, Window

        cfg, device, cuda = self.cfg, self.device, self.device.type == "cuda"
        torch.manual_seed(cfg.train.seed)
        model = copy.deepcopy(self.model_cpu).to(device).train()
        sampler = EpochSampler(self.ds.lengths(), seed=cfg.train.seed, group_by_length=cfg.data.group_by_length,
                               batch_size=bs, window=Window(warmup=warmup_steps * bs, measured=steps * bs))
        loader = torch.utils.data.DataLoader(self.ds, batch_size=bs, sampler=sampler, drop_last=True,
                                             collate_fn=self.collator, num_workers=self.workers, pin_memory=cuda,
                                             persistent_workers=self.workers > 0)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.train.weight_decay},
                                 {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                lr=cfg.train.learning_rate, eps=cfg.train.adam_epsilon, fused=True)
        total = warmup_steps + steps
        sched = get_scheduler(str(cfg.train.scheduler), opt, num_warmup_steps=math.ceil(cfg.train.warmup_ratio * total),
                              num_training_steps=total)
        bf16 = str(cfg.train.mixed_precision) == "bf16"
        clip = cfg.train.max_grad_norm
        timer = WindowTimer(device)
        samples, last, syncs = 0, None, None
        batches = iter(loader)
        for step in range(total):
            if step == warmup_steps:
                timer.start()
            # the last warm-up step runs under CUDA's sync debug mode: the host syncs the model itself
            # makes (this loop makes none), counted outside the timed window
            watch = SyncWatch() if cuda and step == warmup_steps - 1 else None
            batch = next(batches)
            counts = batch["counts"]  # host-side: nothing is read back from the device
            inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
            labels = inputs.pop("labels")
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(**inputs).logits
            # summed token loss / label tokens, without summ's row selection (its nonzero() syncs)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                                   ignore_index=-100, reduction="sum") / max(counts.label_tokens, 1)
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            last = loss.detach()
            if watch is not None:
                syncs = watch.stop()
            if step >= warmup_steps:
                samples += counts.samples
        seconds, wall = timer.stop()
        final = float(last)
        del batches, loader, model, opt, sched, params, last
        release()
        return {"samples_per_s": samples / seconds, "seconds": seconds, "wall_seconds": wall, "final_loss": final,
                "model_syncs_per_step": syncs}


def overhead(ctx: Context) -> dict:
    a = ctx.args
    base = kobart(a) + [f"data.synthetic_train_size={a.overhead_train_size}"]
    t0 = time.perf_counter()
    bare = BareLoop(base, ctx.device)
    print(f"bare loop's data and model prepared in {time.perf_counter() - t0:.1f} s; "
          f"{a.overhead_steps} measured + {a.overhead_warmup_steps} warm-up steps per run, "
          f"up to {a.overhead_rounds} rounds A B per micro-batch", flush=True)

    def summ_contender(bs: int, steps: int, label: str) -> dict:
        m = summ_run(ctx, label, base + window(bs, steps, a.overhead_warmup_steps))
        return {"samples_per_s": m.train.samples_per_s, "seconds": m.train.seconds, "final_loss": m.train.final_loss,
                "step_time_s_median": m.train.step_time_s_median}

    # once per process, both sides: CUDA context, cuBLAS handles, allocator, worker start-up
    t0 = time.perf_counter()
    first = a.overhead_sizes[0]
    summ_contender(first, 2, "s1 process warm-up")
    bare.run(first, 2, 1)
    print(f"process warm-up (discarded) {time.perf_counter() - t0:.1f} s", flush=True)
    ctx.runs = [r for r in ctx.runs if r[0] != "s1 process warm-up"]

    start, sizes, rows = time.perf_counter(), {}, []
    for bs in a.overhead_sizes:
        res: dict[str, list[dict]] = {"summ": [], "bare": []}
        error = None
        try:
            for r in range(a.overhead_rounds):
                if r > 0 and (time.perf_counter() - start > a.overhead_max_s or ctx.left() < 150):
                    print(f"  micro-batch {bs}: time is up after {r} round(s)", flush=True)
                    break
                for name in ("summ", "bare"):
                    out = (summ_contender(bs, a.overhead_steps, f"s1 summ bs{bs}") if name == "summ"
                           else bare.run(bs, a.overhead_steps, a.overhead_warmup_steps))
                    res[name].append(out)
                    print(f"  bs {bs} round {r + 1}: {name}: {out['samples_per_s']:.1f} samples/s "
                          f"({out['seconds']:.2f} s measured, loss {out['final_loss']:.4f})", flush=True)
        except Exception as exc:  # noqa: BLE001 one micro-batch (e.g. out of memory) must not cost the others
            error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            print(f"  micro-batch {bs} failed: {error}", flush=True)
            release()
        fig: dict[str, Any] = {"summ": res["summ"], "bare": res["bare"], "error": error}
        n = min(len(res["summ"]), len(res["bare"]))
        if n:
            s, b = median(res["summ"][:n], "samples_per_s"), median(res["bare"][:n], "samples_per_s")
            fig["bare_model_syncs_per_step"] = res["bare"][0].get("model_syncs_per_step")
            fig.update(rounds=n, summ_median=s, bare_median=b, ratio=s / b,
                       paired_ratio=paired_ratio(res["summ"][:n], res["bare"][:n], "samples_per_s"),
                       loss_difference=abs(res["summ"][n - 1]["final_loss"] - res["bare"][n - 1]["final_loss"]),
                       target_met=s / b >= 0.98)
            rows.append([bs, n, f"{s:.1f}", f"{b:.1f}", f"{s / b:.3f}", f"{fig['paired_ratio']:.3f}",
                         "yes" if s / b >= 0.98 else "NO", f"{fig['loss_difference']:.1e}",
                         "-" if fig["bare_model_syncs_per_step"] is None else fig["bare_model_syncs_per_step"]])
        else:
            rows.append([bs, 0, "-", "-", "-", "-", "-", error or "no round ran", "-"])
        sizes[str(bs)] = fig
    print()
    print(table(rows, ["micro-batch", "rounds", "summ samples/s", "bare samples/s", "summ/bare",
                       "median per-round", ">= 0.98", "last-step loss diff", "bare: model syncs/step"]))
    print("summ: run_job, samples/s over its measured steps (one sync per step). bare: CUDA events over the "
          "same window, one synchronize at its end; its own code never syncs, and the last column counts the "
          "host syncs the model's forward/backward makes by itself (CUDA sync debug mode, one warm-up step). "
          "Loss differences are bf16 and dropout noise, not data.")
    return {"per_micro_batch": sizes, "target": 0.98}


# --------------------------------------------------------------------------- section 2


@contextlib.contextmanager
def tiny_models_built_on(device):
    """summ builds a random-init model on the CPU (models.tiny_model); a 3B one is much faster to
    initialise on the GPU. Only this script's process is patched, only inside the block."""
    from summ.modeling import models

    original = models.tiny_model

    def on_device(cfg, tok, seed):
        with device:
            return original(cfg, tok, seed)

    models.tiny_model = on_device
    try:
        yield
    finally:
        models.tiny_model = original


def qlora_mfu(ctx: Context) -> dict:
    import torch

    from summ.measure import flops
    from summ.run_folder import read_metrics

    a = ctx.args
    run_dir = getattr(ctx, "user_llama_run", None)
    found = read_metrics(run_dir).record if run_dir is not None else None
    if found is not None and found.status == "ok":  # section 0's run of the hub-shaped folder
        m, build_s, run_s = found, None, None
        ctx.runs.append(("s2 = s0 llama (run.py)", m))
        config = json.loads((ctx.hub_folders["llama"] / "config.json").read_text())
        n = llama_params(config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"],
                         config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"])
        layers, micro_batch = config["num_hidden_layers"], m.batch_size
        precision, configured = flops.compute_precision(m.mixed_precision, m.quantization, "bfloat16"), None
        print(f"from section 0's run.py run of the Llama-3.2-3B-shaped folder: {run_dir}", flush=True)
    else:
        m, n, layers, precision, configured, build_s, run_s = own_qlora_run(ctx)
        micro_batch = a.qlora_batch
    t = m.train
    peak = flops.peak_flops(ctx.device, precision, configured)
    tps = t.tokens_per_s
    analytic6 = 6 * n * tps / peak if peak and tps else None
    analytic4 = 4 * n * tps / peak if peak and tps else None
    fpt = t.flops_per_token
    fig = {"micro_batch": micro_batch, "layers": layers, "params_from_config": n,
           "total_params_metrics": m.total_params, "trainable_params": m.trainable_params, "precision": precision,
           "peak_flops": peak, "tokens_per_s": tps, "samples_per_s": t.samples_per_s,
           "measured_steps": t.optimizer_steps, "step_time_s_median": t.step_time_s_median,
           "flops_per_token": fpt, "hardware_flops_per_position": t.hardware_flops_per_position,
           "six_n": 6 * n, "flops_per_token_over_6n": fpt / (6 * n) if fpt else None,
           "mfu": m.mfu, "hfu": m.hfu, "analytic_mfu_6n": analytic6, "analytic_mfu_4n": analytic4,
           "mfu_over_analytic_6n": m.mfu / analytic6 if m.mfu and analytic6 else None,
           "mfu_over_analytic_4n": m.mfu / analytic4 if m.mfu and analytic4 else None,
           "pad_fraction": t.pad_fraction, "peak_bytes": m.memory.peak_bytes if m.memory else None,
           "weights_build_s": build_s, "run_s": run_s, "memory": mem_dict(m)}
    rows = [
        ["micro-batch x measured steps", f"{micro_batch} x {t.optimizer_steps}"],
        ["layers (28 = Llama-3.2-3B)", layers],
        ["N from the config (tied embedding once)", f"{n:,}"],
        ["total_params in metrics (4-bit packed)", f"{m.total_params or 0:,}"],
        ["trainable (LoRA)", f"{m.trainable_params or 0:,}"],
        [f"peak ({precision}, {torch.cuda.get_device_name() if ctx.device.type == 'cuda' else 'cpu'})",
         f"{peak / 1e12:g} TFLOP/s" if peak else "-"],
        ["tokens/s (non-pad) | samples/s", f"{fmt(tps, '.0f')} | {fmt(t.samples_per_s, '.2f')}"],
        ["step time median (s)", fmt(t.step_time_s_median)],
        ["train.flops_per_token (summ, counted)", f"{fpt / 1e9:.4g} GFLOP" if fpt else "-"],
        ["6N", f"{6 * n / 1e9:.4g} GFLOP"],
        ["flops_per_token / 6N (expect ~0.67, LoRA)", fmt(fig["flops_per_token_over_6n"])],
        ["metrics.mfu", fmt(m.mfu, ".4f")],
        ["analytic MFU = 6N x tokens/s / peak", fmt(analytic6, ".4f")],
        ["mfu / analytic(6N)", fmt(fig["mfu_over_analytic_6n"])],
        ["analytic MFU with 4N (LoRA model FLOPs)", fmt(analytic4, ".4f")],
        ["mfu / analytic(4N) (expect ~1)", fmt(fig["mfu_over_analytic_4n"])],
        ["metrics.hfu (recompute and padding in)", fmt(m.hfu, ".4f")],
        ["hardware FLOPs per position", f"{t.hardware_flops_per_position / 1e9:.4g} GFLOP"
         if t.hardware_flops_per_position else "-"],
        ["pad fraction", fmt(t.pad_fraction)],
        ["peak GiB", gib(fig["peak_bytes"])],
    ]
    print(table([[str(x) for x in r] for r in rows], ["figure", "value"]))
    print("Why about 0.67: 6N assumes that backward computes both input and weight gradients (4N). LoRA "
          "freezes the base weights, so backward computes only the input gradients (2N): model FLOPs are about "
          "4N per token. Attention's own FLOPs add a little. summ's MFU counts those model FLOPs and no "
          "gradient-checkpointing recompute, so mfu / analytic(6N) = flops_per_token / 6N, by construction "
          "(same tokens/s, same peak). HFU counts recompute and padding.")
    return fig


def own_qlora_run(ctx: Context) -> tuple:
    """Section 2 without section 0: the Llama-3.2-3B-shaped QLoRA model as a tiny_llama, its random
    weights built on the device, one run_job."""
    from omegaconf import OmegaConf

    from summ.measure import flops
    from summ.modeling import models

    a = ctx.args
    if ctx.left() < a.qlora_min_s:
        raise RuntimeError(f"skipped: {ctx.left():.0f} s left of --budget-s, under --qlora-min-s {a.qlora_min_s:.0f}")
    overrides = (llama_3b(a) + [f"data.synthetic_train_size={a.qlora_train_size}"]
                 + window(a.qlora_batch, a.qlora_steps, a.qlora_warmup_steps))
    obj = OmegaConf.to_object(compose(overrides))
    tok = models.load_tokenizer(obj.model)
    # The random bf16 weights, built once on the device and saved where run_job's loader looks
    # for them (models.tiny_weights_dir caches per process), before the run's memory is counted.
    t0 = time.perf_counter()
    with tiny_models_built_on(ctx.device):
        models.tiny_weights_dir(obj.model, tok, obj.train.seed)
    release()
    build_s = time.perf_counter() - t0
    print(f"random bf16 weights built on {ctx.device.type} and saved in {build_s:.1f} s", flush=True)
    t0 = time.perf_counter()
    m = summ_run(ctx, f"s2 qlora bs{a.qlora_batch}", overrides)
    run_s = time.perf_counter() - t0
    t = obj.model.tiny
    n = llama_params(t.d_model, t.layers, t.ffn_dim, t.heads, t.kv_heads,
                     models.padded_vocabulary(max(len(tok), t.vocab_size or 0)))
    precision = flops.compute_precision(str(obj.train.mixed_precision), str(obj.model.quantization),
                                        str(obj.model.dtype))
    return m, n, obj.model.tiny.layers, precision, obj.measure.peak_tflops, build_s, run_s



# --------------------------------------------------------------------------- section 3


def probe_vs_epoch(ctx: Context) -> dict:
    a = ctx.args
    base = kobart(a) + [f"data.synthetic_train_size={a.epoch_train_size}", f"batch.batch_size={a.probe_batch}",
                        "batch.gradient_accumulation_steps=1"]
    trial = summ_run(ctx, f"s3 trial bs{a.probe_batch}", base + window(a.probe_batch, a.probe_steps, 3)
                     + ["measure.memory_probe=true"])
    epoch = summ_run(ctx, f"s3 epoch bs{a.probe_batch}", base + ["train.epochs=1", "measure.memory_probe=false"])
    tm, em = trial.memory, epoch.memory
    ratio = tm.peak_bytes / em.observed_peak_bytes if em.observed_peak_bytes else None
    observed = tm.observed_peak_bytes / em.observed_peak_bytes if em.observed_peak_bytes else None
    rows = [["trial memory.peak_bytes (worst of observed and probe)", gib(tm.peak_bytes)],
            ["trial memory.probe_peak_bytes", gib(tm.probe_peak_bytes)],
            ["trial memory.observed_peak_bytes", gib(tm.observed_peak_bytes)],
            [f"epoch observed_peak_bytes ({epoch.train.total_optimizer_steps} steps, probe off)",
             gib(em.observed_peak_bytes)],
            ["trial peak / epoch observed (target >= 0.95)", fmt(ratio)],
            ["trial observed only / epoch observed (no probe)", fmt(observed)],
            ["trial steps measured + warm-up", f"{trial.train.optimizer_steps} + {trial.train.warmup_optimizer_steps}"]]
    print(table(rows, ["figure", "value"]))
    print("The probe is one micro-batch at the training set's widest input and label. Without it, the trial "
          "sees only the batches it happened to draw; the last ratio shows how far that falls short of an epoch.")
    return {"trial": mem_dict(trial), "epoch": mem_dict(epoch), "trial_peak_over_epoch": ratio,
            "trial_observed_over_epoch": observed, "target": 0.95,
            "target_met": ratio is not None and ratio >= 0.95, "epoch_steps": epoch.train.total_optimizer_steps}


# --------------------------------------------------------------------------- section 4


def budget_cap(ctx: Context) -> dict:
    a = ctx.args
    base = kobart(a) + [f"data.synthetic_train_size={a.epoch_train_size}", f"measure.memory_budget_gb={a.budget_gb}"]
    out: dict[str, Any] = {"budget_gb": a.budget_gb}
    rows = []
    cells = ([("control", a.budget_control_batch, True)] if a.budget_control_batch else []) + [
        ("over-large", a.budget_batch, False)]
    for name, bs, expect in cells:
        m = summ_run(ctx, f"s4 cap {name} bs{bs}", base + window(bs, 2, 1), expect_ok=False)
        mem = m.memory
        out[name] = {"micro_batch": bs, "status": m.status, "error": m.error, "phase": m.phase, "memory": mem_dict(m)}
        rows.append([name, bs, m.status, gib(mem.budget_bytes if mem else None), gib(mem.limit_bytes if mem else None),
                     gib(mem.peak_bytes if mem else None), mem.num_ooms if mem else "-", (m.error or "")[:90]])
        if expect and m.status != "ok":
            out[f"{name}_unexpected"] = True
    uncapped = [(label, m.memory.peak_bytes) for label, m in ctx.runs
                if m.memory is not None and not label.startswith("s4 cap") and m.status == "ok"]
    print(table([[str(x) for x in r] for r in rows],
                ["run", "micro-batch", "status", "budget GiB", "limit GiB", "peak GiB", "ooms", "error"]))
    if uncapped:
        label, peak = max(uncapped, key=lambda x: x[1])
        print(f"largest uncapped peak so far: {gib(peak)} GiB ({label})")
        out["largest_uncapped_peak"] = {"label": label, "peak_bytes": peak}
    failed_as_card = out["over-large"]["status"] in ("oom", "over_budget")
    out["over_large_failed_as_expected"] = failed_as_card
    print(f"over-large micro-batch under the {a.budget_gb:g} GB cap: {out['over-large']['status']} "
          f"({'as a ' + format(a.budget_gb, 'g') + ' GB card would' if failed_as_card else 'NOT failed: raise --budget-batch'})")
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
        records.append({"label": label, "status": m.status, "context_bytes": mem.context_bytes,
                        "peak_bytes": mem.peak_bytes, "reserved_peak_bytes": mem.reserved_peak_bytes,
                        "fragmentation_bytes": frag, "fragmentation_fraction": frag / mem.reserved_peak_bytes
                        if frag is not None and mem.reserved_peak_bytes else None,
                        "alloc_retries": mem.alloc_retries, "num_ooms": mem.num_ooms, "source": mem.source})
        rows.append([label, m.status, gib(mem.context_bytes), gib(mem.peak_bytes), gib(mem.reserved_peak_bytes),
                     gib(frag), fmt(records[-1]["fragmentation_fraction"], ".1%"),
                     "-" if mem.alloc_retries is None else mem.alloc_retries])
    print(table([[str(x) for x in r] for r in rows], ["run", "status", "context GiB", "peak GiB", "reserved GiB",
                                                      "reserved-peak GiB", "of reserved", "alloc retries"]))
    print("context: device memory in use at the run's start that is not this process's allocator (CUDA context, "
          "other processes). reserved - peak: what the caching allocator held beyond the live peak (fragmentation).")
    return {"runs": records}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("CUDA is not available on this machine: the GPU check needs an NVIDIA GPU. Nothing was run "
              "(--cpu-smoke runs the sections at toy size on the CPU, to check the script).")
        return 0
    device = torch.device("cuda") if torch.cuda.is_available() and not args.cpu_smoke else torch.device("cpu")
    out = os.environ.get("OUT")
    json_path = Path(args.json) if args.json else (Path(out) if out else Path.cwd()) / "gpu_check.json"
    ctx = Context(args, device, json_path)
    mode = "--cpu-smoke (toy sizes, figures mean nothing)" if args.cpu_smoke else "--quick" if args.quick else "full"
    print(f"machine: {ctx.report['machine']}\nmode: {mode}; budget {args.budget_s:.0f} s; sections "
          f"{','.join(sorted(args.sections))}; figures -> {json_path}", flush=True)
    plan = [("0", user.readme_commands), ("5", lambda c: user.failed_cells_leave_nothing(c, kobart(c.args))),
            ("1", overhead), ("3", probe_vs_epoch), ("4b", budget_cap), ("2", qlora_mfu),
            ("4", context_and_fragmentation)]
    ok = True
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        ctx.scratch = Path(scratch)
        for key, fn in plan:
            if key.rstrip("b") in args.sections:
                ok = section(ctx, key, fn) and ok
    print(f"\n=== done in {ctx.elapsed():.0f} s: " + ", ".join(
        f"{k} {v['status']} ({v['elapsed_s']:.0f} s)" for k, v in ctx.report["sections"].items()))
    print(f"figures: {json_path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
