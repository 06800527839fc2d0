"""Section 2 of the GPU check (benchmarks/gpu_check.py runs it): the Llama-3.2-3B-shaped QLoRA
run's FLOPs per token and MFU against 6N and 4N counted from its shape."""

from __future__ import annotations

import contextlib
import json
import time

from common import compose, fmt, gib, release, table
from gpu_check_runs import Context, llama_3b, mem_dict, summ_run, window

from summ.errors import Status

WHY = (
    "Why about 0.67: 6N assumes that backward computes both input and weight gradients (4N). LoRA "
    "freezes the base weights, so backward computes only the input gradients (2N): model FLOPs are about "
    "4N per token. Attention's own FLOPs add a little. summ's MFU counts those model FLOPs and no "
    "gradient-checkpointing recompute, so mfu / analytic(6N) = flops_per_token / 6N, by construction "
    "(same tokens/s, same peak). HFU counts recompute and padding."
)


def llama_params(d: int, layers: int, ffn: int, heads: int, kv_heads: int, vocab: int) -> int:
    """Parameters of a Llama from its shape, the tied embedding counted once (it is also the LM
    head, whose matmul is in 6N); a 4-bit model's own count is of packed storage."""
    kv = kv_heads * (d // heads)
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * ffn + 2 * d  # q, o; k, v; gate, up, down; two RMSNorms
    return vocab * d + layers * per_layer + d


def qlora_mfu(ctx: Context) -> dict:
    from summ.measure import flops
    from summ.run_folder import read_metrics

    found = read_metrics(ctx.user_llama_run).record if ctx.user_llama_run is not None else None
    if found is not None and found.status == Status.ok:  # section 0's run of the hub-shaped folder
        m, build_s, run_s = found, None, None
        ctx.runs.append(("s2 = s0 llama (run.py)", m))
        config = json.loads((ctx.hub_folders["llama"] / "config.json").read_text())
        n = llama_params(
            config["hidden_size"],
            config["num_hidden_layers"],
            config["intermediate_size"],
            config["num_attention_heads"],
            config["num_key_value_heads"],
            config["vocab_size"],
        )
        layers, micro_batch = config["num_hidden_layers"], m.batch_size
        precision, configured = flops.compute_precision(m.mixed_precision, m.quantization, "bfloat16"), None
        print(f"from section 0's run.py run of the Llama-3.2-3B-shaped folder: {ctx.user_llama_run}", flush=True)
    else:
        m, n, layers, precision, configured, build_s, run_s = own_qlora_run(ctx)
        micro_batch = ctx.args.qlora_batch
    t = m.train
    peak = flops.peak_flops(ctx.device, precision, configured)
    tps, fpt = t.tokens_per_s, t.flops_per_token
    analytic6 = 6 * n * tps / peak if peak and tps else None
    analytic4 = 4 * n * tps / peak if peak and tps else None
    fig = {
        "micro_batch": micro_batch,
        "layers": layers,
        "params_from_config": n,
        "total_params_metrics": m.total_params,
        "trainable_params": m.trainable_params,
        "precision": precision,
        "peak_flops": peak,
        "tokens_per_s": tps,
        "samples_per_s": t.samples_per_s,
        "measured_steps": t.optimizer_steps,
        "step_time_s_median": t.step_time_s_median,
        "flops_per_token": fpt,
        "hardware_flops_per_position": t.hardware_flops_per_position,
        "six_n": 6 * n,
        "flops_per_token_over_6n": fpt / (6 * n) if fpt else None,
        "mfu": m.mfu,
        "hfu": m.hfu,
        "analytic_mfu_6n": analytic6,
        "analytic_mfu_4n": analytic4,
        "mfu_over_analytic_6n": m.mfu / analytic6 if m.mfu and analytic6 else None,
        "mfu_over_analytic_4n": m.mfu / analytic4 if m.mfu and analytic4 else None,
        "pad_fraction": t.pad_fraction,
        "peak_bytes": m.memory.peak_bytes if m.memory else None,
        "weights_build_s": build_s,
        "run_s": run_s,
        "memory": mem_dict(m),
    }
    print(table([[str(x) for x in r] for r in rows(ctx, m, fig)], ["figure", "value"]))
    print(WHY)
    return fig


def rows(ctx: Context, m, fig: dict) -> list[list]:
    """Section 2's table: the figures of `fig` and the run's metrics `m`, one per row."""
    import torch

    t, n, peak = m.train, fig["params_from_config"], fig["peak_flops"]
    fpt, hw = fig["flops_per_token"], t.hardware_flops_per_position
    device = torch.cuda.get_device_name() if ctx.device.type == "cuda" else "cpu"
    return [
        ["micro-batch x measured steps", f"{fig['micro_batch']} x {t.optimizer_steps}"],
        ["layers (28 = Llama-3.2-3B)", fig["layers"]],
        ["N from the config (tied embedding once)", f"{n:,}"],
        ["total_params in metrics (4-bit packed)", f"{m.total_params or 0:,}"],
        ["trainable (LoRA)", f"{m.trainable_params or 0:,}"],
        [f"peak ({fig['precision']}, {device})", f"{peak / 1e12:g} TFLOP/s" if peak else "-"],
        ["tokens/s (non-pad) | samples/s", f"{fmt(fig['tokens_per_s'], '.0f')} | {fmt(t.samples_per_s, '.2f')}"],
        ["step time median (s)", fmt(t.step_time_s_median)],
        ["train.flops_per_token (summ, counted)", f"{fpt / 1e9:.4g} GFLOP" if fpt else "-"],
        ["6N", f"{6 * n / 1e9:.4g} GFLOP"],
        ["flops_per_token / 6N (expect ~0.67, LoRA)", fmt(fig["flops_per_token_over_6n"])],
        ["metrics.mfu", fmt(m.mfu, ".4f")],
        ["analytic MFU = 6N x tokens/s / peak", fmt(fig["analytic_mfu_6n"], ".4f")],
        ["mfu / analytic(6N)", fmt(fig["mfu_over_analytic_6n"])],
        ["analytic MFU with 4N (LoRA model FLOPs)", fmt(fig["analytic_mfu_4n"], ".4f")],
        ["mfu / analytic(4N) (expect ~1)", fmt(fig["mfu_over_analytic_4n"])],
        ["metrics.hfu (recompute and padding in)", fmt(m.hfu, ".4f")],
        ["hardware FLOPs per position", f"{hw / 1e9:.4g} GFLOP" if hw else "-"],
        ["pad fraction", fmt(t.pad_fraction)],
        ["peak GiB", gib(fig["peak_bytes"])],
    ]


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


def own_qlora_run(ctx: Context) -> tuple:
    """Section 2 without section 0: the Llama-3.2-3B-shaped QLoRA model as a tiny_llama, its random
    weights built on the device, one run_job."""
    from omegaconf import OmegaConf

    from summ.measure import flops
    from summ.modeling import models

    a = ctx.args
    if ctx.left() < a.qlora_min_s:
        raise RuntimeError(f"skipped: {ctx.left():.0f} s left of --budget-s, under --qlora-min-s {a.qlora_min_s:.0f}")
    overrides = (
        llama_3b(a)
        + [f"data.synthetic_train_size={a.qlora_train_size}"]
        + window(a.qlora_batch, a.qlora_steps, a.qlora_warmup_steps)
    )
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
    n = llama_params(
        t.d_model, t.layers, t.ffn_dim, t.heads, t.kv_heads, models.padded_vocabulary(max(len(tok), t.vocab_size or 0))
    )
    precision = flops.compute_precision(
        str(obj.train.mixed_precision), str(obj.model.quantization), str(obj.model.dtype)
    )
    return m, n, obj.model.tiny.layers, precision, obj.measure.peak_tflops, build_s, run_s
