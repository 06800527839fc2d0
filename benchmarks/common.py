"""Shared by the benchmark scripts: contenders alternate (A B, B A, ...) after a warm-up, and the
figures are medians, so a machine's drift hits every contender alike. Here too: the one table of
real models' shapes (random-init stand-ins of the same size) and the one bare reference loop that
summ's loop is held against."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from timers import SyncWatch, WindowTimer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def run_cli(folder: Path, overrides: list[str]) -> dict:
    """`python run.py OVERRIDES hydra.run.dir=FOLDER` in a fresh process, as a user types it; its
    metrics.json. A run that fails stops the benchmark with its exit code and the end of its stderr."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *overrides, f"hydra.run.dir={folder}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}): {' '.join(overrides)}\n{proc.stderr[-2000:]}")
    return json.loads((Path(folder) / "metrics.json").read_text())


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from summ.app import register as register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf")):
        return hydra_compose(config_name="config", overrides=overrides)


# --------------------------------------------------------------------------- alternating contenders


def round_order(names: list[str], r: int) -> list[str]:
    """Round r's order (from 0): as given on even rounds, reversed on odd ones (A B, B A, A B ...):
    whatever running first or second does to a contender (the state the other left in the
    allocator and the caches) falls on both alike."""
    return list(names) if r % 2 == 0 else list(names)[::-1]


def alternate(contenders: dict[str, Callable[[], dict]], rounds: int, warmup: int = 1) -> dict[str, list[dict]]:
    """Run each contender `warmup` times (discarded), then `rounds` times in round_order."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    results: dict[str, list[dict]] = {name: [] for name in contenders}
    for r in range(rounds):
        for name in round_order(list(contenders), r):
            res = contenders[name]()
            results[name].append(res)
            print(f"  round {r + 1}: {name}: " + ", ".join(f"{k}={fmt(v, '.4g')}" for k, v in res.items()), flush=True)
    return results


def median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def paired_ratio(a: list[dict], b: list[dict], key: str) -> float:
    """Median over rounds of a/b within each round: contenders of one round ran back to back,
    so the machine's drift across rounds cancels."""
    return statistics.median(x[key] / y[key] for x, y in zip(a, b, strict=False))


# --------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class Shape:
    """A published model's architecture: summ's tiny_bart / tiny_llama built at this size (random
    init, no download), or a hub-shaped folder's config."""

    name: str  # model.name of the stand-in
    arch: str  # bart (layers per stack: encoder and decoder each) | llama
    d_model: int
    layers: int
    heads: int
    ffn_dim: int
    vocab_size: int
    max_positions: int
    kv_heads: int | None = None  # llama: grouped-query attention
    source: str = ""

    def toy(self, layers: int = 2) -> Shape:
        """The same architecture and vocabulary at toy width and depth: --cpu-smoke's stand-in (its
        figures mean nothing; it checks a script's plumbing)."""
        return replace(
            self,
            name=self.name.replace("_shaped", "_toy"),
            d_model=64,
            layers=layers,
            heads=4,
            ffn_dim=128,
            kv_heads=2 if self.kv_heads else None,
        )

    def overrides(self) -> list[str]:
        """The config overrides that make summ build this shape (model=tiny_<arch>)."""
        tiny = {
            "d_model": self.d_model,
            "layers": self.layers,
            "heads": self.heads,
            "ffn_dim": self.ffn_dim,
            "vocab_size": self.vocab_size,
            "max_positions": self.max_positions,
        }
        if self.kv_heads:
            tiny["kv_heads"] = self.kv_heads
        return [f"model=tiny_{self.arch}", f"model.name={self.name}", *(f"model.tiny.{k}={v}" for k, v in tiny.items())]

    def hf_config(self, tok):
        """The transformers config of a hub-shaped folder, the special ids from `tok`."""
        from transformers import BartConfig, LlamaConfig

        ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        if self.arch == "bart":
            return BartConfig(
                vocab_size=self.vocab_size,
                d_model=self.d_model,
                encoder_layers=self.layers,
                decoder_layers=self.layers,
                encoder_attention_heads=self.heads,
                decoder_attention_heads=self.heads,
                encoder_ffn_dim=self.ffn_dim,
                decoder_ffn_dim=self.ffn_dim,
                max_position_embeddings=self.max_positions,
                decoder_start_token_id=tok.eos_token_id,
                forced_eos_token_id=tok.eos_token_id,
                **ids,
            )
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.d_model,
            intermediate_size=self.ffn_dim,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=self.max_positions,
            rope_theta=500000.0,
            tie_word_embeddings=True,
            **ids,
        )


SHAPES = {
    "kobart": Shape(
        "kobart_shaped",
        "bart",
        d_model=768,
        layers=6,
        heads=16,
        ffn_dim=3072,
        vocab_size=30000,
        max_positions=1026,
        source="gogamza/kobart-base-v2's model card and config.json (124M)",
    ),
    # max_positions 2048, not the published 131,072: rotary positions hold no weights, and no run
    # here is longer
    "llama_3b": Shape(
        "llama_3b_shaped",
        "llama",
        d_model=3072,
        layers=28,
        heads=24,
        kv_heads=8,
        ffn_dim=8192,
        vocab_size=128256,
        max_positions=2048,
        source="meta-llama/Llama-3.2-3B's config.json",
    ),
}


# --------------------------------------------------------------------------- the bare reference loop


@dataclass
class Inputs:
    """What summ's loop trains on for a config: the tokenizer, tokenized train set and collator
    (summ's padding), and the model as summ initialises it (same seed), on the CPU."""

    cfg: Any
    tokenizer: Any
    dataset: Any
    collator: Any
    model: Any


def same_inputs(overrides: list[str]) -> Inputs:
    import torch
    from omegaconf import OmegaConf

    from summ.data.splits import load_splits
    from summ.data.tokenize import Collator, Encoder, TokenizedDataset
    from summ.modeling import models

    cfg = OmegaConf.to_object(compose(overrides))
    tok = models.load_tokenizer(cfg.model)
    enc = Encoder(tok, cfg.model.kind, cfg.model.prompt_template, cfg.data.encoder_max_len, cfg.data.decoder_max_len)
    loaded = models.load(cfg.model, tok, cfg.train.seed, torch.device("cpu"))
    widths = enc.max_widths() if cfg.data.padding == "max_length" else (None, None)
    return Inputs(
        cfg,
        tok,
        TokenizedDataset(load_splits(cfg.data).train, enc),
        Collator(tok.pad_token_id, cfg.model.kind, loaded.decoder_start_token_id, *widths),
        loaded.model,
    )


def bare_loop(inputs: Inputs, device, bs: int, steps: int, warmup_steps: int, windowed: bool) -> dict:
    """A plain PyTorch loop on `inputs`: a copy of the same init, the same samples in the same
    order (summ's sampler; `windowed`: the trial window of measure.samples, else the epoch's order
    of measure.steps), the same batch shapes, AdamW (fused) with the same parameter groups, schedule,
    clipping, autocast and summed token loss. No Accelerate, no measurement, and nothing read back
    from the device: counts come from the host, the loss stays on the device until the end. Timed
    over the `steps` measured steps after `warmup_steps`, as one window (WindowTimer)."""
    import copy

    import torch

    from summ.modeling.loss import model_inputs, summed_token_loss

    cfg, cuda, train = inputs.cfg, device.type == "cuda", inputs.cfg.train
    torch.manual_seed(train.seed)
    model = copy.deepcopy(inputs.model).to(device).train()
    loader = _loader(inputs, bs, steps, warmup_steps, windowed, cuda)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = _optimizer(params, train, warmup_steps + steps)
    timer, samples, last, syncs = WindowTimer(device), 0, None, None
    batches = iter(loader)
    for step in range(warmup_steps + steps):
        if step == warmup_steps:
            timer.start()
        # the last warm-up step runs under CUDA's sync debug mode: the host syncs the model itself
        # makes (this loop makes none), counted outside the timed window
        watch = SyncWatch() if cuda and step == warmup_steps - 1 else None
        batch = next(batches)
        counts = batch["counts"]
        labels = batch["labels"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=str(train.mixed_precision) == "bf16"):
            logits = model(**{k: v.to(device, non_blocking=True) for k, v in model_inputs(batch).items()}).logits
        loss = summed_token_loss(logits, labels, cfg.model.kind, train.label_smoothing, counts.label_tokens) / max(
            counts.label_tokens, 1
        )
        loss.backward()
        if train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
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
    return {
        "samples_per_s": samples / seconds,
        "seconds": seconds,
        "wall_seconds": wall,
        "final_loss": final,
        "model_syncs_per_step": syncs,
    }


def _loader(inputs: Inputs, bs: int, steps: int, warmup_steps: int, windowed: bool, cuda: bool):
    """summ's sampler and loader settings at micro-batch `bs` (workers, pinned memory)."""
    import torch

    from summ.data.sampler import EpochSampler, Window

    cfg = inputs.cfg
    window = Window(warmup=warmup_steps * bs, measured=steps * bs) if windowed else None
    sampler = EpochSampler(
        inputs.dataset.lengths(),
        seed=cfg.train.seed,
        group_by_length=cfg.data.group_by_length,
        batch_size=bs,
        window=window,
    )
    workers = cfg.data.num_workers if cfg.data.num_workers is not None else (2 if cuda else 0)
    return torch.utils.data.DataLoader(
        inputs.dataset,
        batch_size=bs,
        sampler=sampler,
        drop_last=True,
        collate_fn=inputs.collator,
        num_workers=workers,
        pin_memory=cuda,
        persistent_workers=workers > 0,
    )


def _optimizer(params: list, train, total_steps: int) -> tuple:
    """Fused AdamW with summ's parameter groups (no weight decay on biases and norms), and the
    schedule over `total_steps`."""
    import math

    import torch
    from transformers import get_scheduler

    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": train.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=train.learning_rate,
        eps=train.adam_epsilon,
        fused=True,
    )
    sched = get_scheduler(
        str(train.scheduler),
        opt,
        num_warmup_steps=math.ceil(train.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    return opt, sched


# --------------------------------------------------------------------------- summ's side, and printing


def summ_loop(overrides: list[str], steps: int) -> dict:
    """summ's own loop (run_job) for `steps` measured steps: samples/s and the last step's loss."""
    import tempfile

    from summ.pipeline import run_job

    with tempfile.TemporaryDirectory() as tmp:
        m = run_job(compose(overrides + [f"measure.steps={steps}"]), tmp)
    return {"samples_per_s": m.train.samples_per_s, "final_loss": m.train.final_loss}


# The duels' setting (bench_overhead, bench_hf_trainer): tiny BART on synthetic competition-shaped
# data, micro-batch 16, no evaluation, three warm-up steps
DUEL_OVERRIDES = [
    "data=synthetic",
    "data.synthetic_train_size=2000",
    "batch.batch_size=16",
    "eval.enabled=false",
    "measure.warmup_steps=3",
]


def duel(
    doc: str, name: str, label: str, short: str, contender, overrides: list[str], setting: str, target: str
) -> None:
    """summ's loop against one contender: parse --rounds/--steps, alternate the two, and print
    the medians, both ratios (of medians, and the median of per-round ratios) and the loss gap."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)  # 5 could not resolve a few percent on 2 cores
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for both contenders, e.g. --set measure.cpu_live_memory=false",
    )
    args = ap.parse_args()
    overrides.extend(args.set)  # in place: the contender composes from the same list object
    extra = f", {' '.join(args.set)}" if args.set else ""
    print(
        f"machine: {machine()}\ntiny_bart, synthetic data, micro-batch 16, {setting}{args.steps} measured steps, "
        f"{args.rounds} rounds A B, B A, ... after one warm-up round{extra}"
    )
    res = alternate(
        {"summ": lambda: summ_loop(overrides, args.steps), name: lambda: contender(args.steps)}, args.rounds
    )
    s, c = median(res["summ"], "samples_per_s"), median(res[name], "samples_per_s")
    ls, lc = res["summ"][-1]["final_loss"], res[name][-1]["final_loss"]
    print()
    print(
        table(
            [["summ loop", f"{s:.1f}", f"{ls:.4f}"], [label, f"{c:.1f}", f"{lc:.4f}"]],
            ["contender", "median samples/s", f"loss at step {args.steps + 3}"],
        )
    )
    print(
        f"\nratio summ / {short} = {s / c:.3f} (target {target}); median of per-round ratios "
        f"{paired_ratio(res['summ'], res[name], 'samples_per_s'):.3f}; loss difference {abs(ls - lc):.2e}"
    )


def machine() -> str:
    import torch

    device = "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {device}"
    )


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    line = " | ".join(f"{{:<{w}}}" for w in widths)
    lines = [line.format(*header), "-+-".join("-" * w for w in widths)] + [line.format(*map(str, r)) for r in rows]
    return "\n".join(lines)


def release() -> None:
    """Freed memory handed back between runs (the collector, then CUDA's cache)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)
