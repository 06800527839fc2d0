"""Shared by the benchmark scripts: contenders alternate (A B, B A, ...) after a warm-up, and the
figures are medians, so a machine's drift hits every contender alike."""
from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from summ.app import register as register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf")):
        return hydra_compose(config_name="config", overrides=overrides)


def alternate(contenders: dict[str, Callable[[], dict]], rounds: int, warmup: int = 1) -> dict[str, list[dict]]:
    """Run each contender `warmup` times (discarded), then `rounds` times interleaved, the order
    reversed every other round (A B, B A, A B ...): whatever running first or second does to a
    contender (the state the other left in the allocator and the caches) falls on both alike."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    results: dict[str, list[dict]] = {name: [] for name in contenders}
    for r in range(rounds):
        order = list(contenders.items())
        for name, fn in order if r % 2 == 0 else order[::-1]:
            res = fn()
            results[name].append(res)
            print(f"  round {r + 1}: {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in res.items()), flush=True)
    return results


def median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def paired_ratio(a: list[dict], b: list[dict], key: str) -> float:
    """Median over rounds of a/b within each round: contenders of one round ran back to back,
    so the machine's drift across rounds cancels."""
    return statistics.median(x[key] / y[key] for x, y in zip(a, b))


def machine() -> str:
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), "-+-".join("-" * w for w in widths)] + [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(lines)




def summ_loop(overrides: list[str], steps: int) -> dict:
    """summ's own loop (train()) for `steps` measured steps: samples/s and the last step's loss."""
    import tempfile

    from summ.pipeline import run_job

    with tempfile.TemporaryDirectory() as tmp:
        m = run_job(compose(overrides + [f"measure.steps={steps}"]), tmp)
    return {"samples_per_s": m.train.samples_per_s, "final_loss": m.train.final_loss}


def same_inputs(overrides: list[str], steps: int):
    """What summ's loop would train on, for a contender: (config, tokenizer, tokenized train set,
    loaded model), the model initialised with the same seed."""
    import torch
    from omegaconf import OmegaConf

    from summ.data.splits import load_splits
    from summ.data.tokenize import Encoder, TokenizedDataset
    from summ.modeling import models

    cfg = OmegaConf.to_object(compose(overrides + [f"measure.steps={steps}"]))
    tok = models.load_tokenizer(cfg.model)
    enc = Encoder(tok, cfg.model.kind, cfg.model.prompt_template, cfg.data.encoder_max_len, cfg.data.decoder_max_len)
    ds = TokenizedDataset(load_splits(cfg.data).train, enc)
    return cfg, tok, ds, models.load(cfg.model, tok, cfg.train.seed, torch.device("cpu"))



def duel(doc: str, name: str, label: str, short: str, contender, overrides: list[str], setting: str,
         target: str) -> None:
    """summ's loop against one contender: parse --rounds/--steps, alternate the two, and print
    the medians, both ratios (of medians, and the median of per-round ratios) and the loss gap."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)  # 5 could not resolve a few percent on 2 cores
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for both contenders, e.g. --set measure.cpu_live_memory=false")
    args = ap.parse_args()
    overrides.extend(args.set)  # in place: the contender composes from the same list object
    print(f"machine: {machine()}\ntiny_bart, synthetic data, micro-batch 16, {setting}{args.steps} measured steps, "
          f"{args.rounds} rounds A B, B A, ... after one warm-up round" + (f", {' '.join(args.set)}" if args.set else ""))
    res = alternate({"summ": lambda: summ_loop(overrides, args.steps), name: lambda: contender(args.steps)},
                    args.rounds)
    s, c = median(res["summ"], "samples_per_s"), median(res[name], "samples_per_s")
    ls, lc = res["summ"][-1]["final_loss"], res[name][-1]["final_loss"]
    print()
    print(table([["summ loop", f"{s:.1f}", f"{ls:.4f}"], [label, f"{c:.1f}", f"{lc:.4f}"]],
                ["contender", "median samples/s", f"loss at step {args.steps + 3}"]))
    print(f"\nratio summ / {short} = {s / c:.3f} (target {target}); median of per-round ratios "
          f"{paired_ratio(res['summ'], res[name], 'samples_per_s'):.3f}; loss difference {abs(ls - lc):.2e}")


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
