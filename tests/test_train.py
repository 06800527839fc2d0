"""The training loop on tiny real models: metrics contract, accumulation equivalence, real
learning, exact step counts, and failures that leave the process able to run the next job."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from .conftest import compose_cfg

TRAIN_KEYS = {
    "optimizer_steps",
    "micro_steps",
    "samples",
    "tokens",
    "pad_tokens",
    "seconds",
    "samples_per_s",
    "tokens_per_s",
    "step_time_s_median",
    "step_time_s_p90",
    "micro_step_time_s_median",
    "final_loss",
}
TOP_KEYS = {
    "status",
    "error",
    "model",
    "device",
    "num_processes",
    "batch_size",
    "gradient_accumulation_steps",
    "effective_batch_size",
    "mixed_precision",
    "gradient_checkpointing",
    "train",
    "memory",
    "eval",
    "epoch_seconds_projected",
    "mfu",
}


def test_metrics_contract(run_job):
    m, out = run_job("train.epochs=2", "eval.generate=true", "inference=greedy", "data.max_eval_samples=6")
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["status"] == "ok" and on_disk["error"] is None
    assert TOP_KEYS <= set(on_disk)
    assert TRAIN_KEYS <= set(on_disk["train"])
    assert {"peak_bytes", "observed_peak_bytes", "reserved_peak_bytes", "capacity_bytes", "fraction", "source"} <= set(
        on_disk["memory"]
    )
    assert {"loss", "rouge1", "rouge2", "rougeL", "rouge_sum", "rouge_mean", "n"} <= set(on_disk["eval"])
    t = on_disk["train"]
    assert t["samples_per_s"] == pytest.approx(t["samples"] / t["seconds"])
    assert t["tokens_per_s"] == pytest.approx(t["tokens"] / t["seconds"])
    assert t["pad_tokens"] > 0 and t["tokens"] > t["samples"]
    assert on_disk["effective_batch_size"] == 8 and on_disk["num_processes"] == 1
    assert on_disk["memory"]["peak_bytes"] > 0 and 0 < on_disk["memory"]["fraction"] < 1
    # one epoch at the measured cost over the epoch's exact padded positions (a x steps + b x positions,
    # fitted over the measured steps): close to those positions at the measured positions/s
    assert t["epoch_positions"] > t["samples"]
    at_rate = t["epoch_positions"] / t["positions_per_s"]
    assert 0.75 < on_disk["epoch_seconds_projected"] / at_rate < 1.33
    ev = on_disk["eval"]
    assert ev["n"] == 6 and all(0.0 <= ev[k] <= 1.0 for k in ("rouge1", "rouge2", "rougeL"))
    assert ev["rouge_mean"] == pytest.approx(ev["rouge_sum"] / 3)
    assert (out / "dev_predictions.csv").is_file()
    history = [json.loads(line) for line in (out / "train_history.jsonl").read_text().splitlines()]
    assert len(history) == t["total_optimizer_steps"]


def test_measure_steps_counts_exactly(run_job):
    m, _ = run_job("batch=bs16_ga2", "measure.steps=5", "measure.warmup_steps=3", "eval.enabled=false")
    assert m["status"] == "ok"
    assert m["train"]["optimizer_steps"] == 5 and m["train"]["micro_steps"] == 10
    assert m["train"]["samples"] == 5 * 32
    assert m["train"]["warmup_optimizer_steps"] == 3 and m["eval"] is None


@pytest.mark.parametrize(
    "model,optimizer",
    [
        ("tiny_bart", "adamw"),
        ("tiny_llama", "adamw"),
        ("tiny_bart", "adamw_foreach"),
        ("tiny_bart", "adamw_8bit"),
        ("tiny_bart", "adafactor"),
    ],
)
def test_accumulation_splits_give_the_same_update(run_job, model, optimizer):
    """(8,1), (4,2) and (2,4): same loss and same parameters after one optimizer step, with each
    deterministic optimizer (train.optimizer; the paged one needs CUDA).

    Adam's first step is lr x sign(gradient) wherever |gradient| >> eps, which would hide a
    wrongly scaled gradient; eps = 1 makes the step proportional to the gradient, so the
    parameters check the gradient's scale (the window normalisation), not just its sign."""
    results = []
    for bs, ga in ((8, 1), (4, 2), (2, 4)):
        m, out = run_job(
            f"model={model}",
            f"batch.batch_size={bs}",
            f"batch.gradient_accumulation_steps={ga}",
            f"train.optimizer={optimizer}",
            "train.max_steps=1",
            "train.warmup_ratio=0",
            "model.tiny.dropout=0",
            "model.lora.dropout=0",
            "train.save_model=true",
            "eval.enabled=false",
            "train.learning_rate=1.0",
            "train.adam_epsilon=1.0",
            "train.weight_decay=0",
            "train.max_grad_norm=0",
        )
        assert m["status"] == "ok", m["error"]
        weights = {}
        for f in (out / "model").glob("*.safetensors"):
            weights.update(load_file(f))
        results.append((m["train"]["final_loss"], weights))
    # Adafactor divides each update by the gradient's own RMS (no eps = 1 to make it proportional),
    # so a near-zero gradient's last-bit difference between splits moves its weight by up to ~lr x 1e-5
    atol = 2e-5 if optimizer == "adafactor" else 1e-6
    loss0, w0 = results[0]
    for loss, w in results[1:]:
        assert loss == pytest.approx(loss0, rel=1e-5)
        assert w.keys() == w0.keys()
        for k in w0:
            torch.testing.assert_close(w[k], w0[k], rtol=1e-4, atol=atol)


def test_eval_loss_falls_with_training(run_job):
    """Real learning on the bundled sample: a short training lowers the dev loss."""
    before, _ = run_job("train.max_steps=1", "train.learning_rate=1e-9", "train.warmup_ratio=0")
    after, _ = run_job("train.epochs=12", "train.learning_rate=2e-3")
    assert before["status"] == after["status"] == "ok"
    assert after["eval"]["loss"] < 0.8 * before["eval"]["loss"]


def test_oom_is_recorded_and_the_next_job_runs(run_job):
    m, out = run_job("measure.steps=4", failpoint="oom@forward:step=3")
    assert m["status"] == "oom" and "train" in m["error"] and "failpoint oom@forward" in m["error"]
    assert m["train"]["optimizer_steps"] == 1  # the warm-up step and the first measured one ran
    assert json.loads((out / "metrics.json").read_text())["status"] == "oom"
    again, _ = run_job("measure.steps=4")
    assert again["status"] == "ok" and again["train"]["optimizer_steps"] == 4
    # the second job's peak does not carry the first job's memory
    assert again["memory"]["peak_bytes"] < 4 * max(m["memory"]["peak_bytes"], 1)


def test_nan_loss_is_diverged(run_job):
    """An absurd learning rate blows the weights up: the job stops as diverged, not ok."""
    m, _ = run_job("measure.steps=3", "train.learning_rate=1e30", "train.warmup_ratio=0", "train.max_grad_norm=0")
    assert m["status"] == "diverged", m


def test_tiny_llama_lora(run_job):
    m, _ = run_job(
        "model=tiny_llama",
        "measure.steps=3",
        "eval.generate=true",
        "inference=greedy",
        "data.max_eval_samples=4",
        "inference.max_new_tokens=8",
    )
    assert m["status"] == "ok", m["error"]
    assert m["lora"] and m["trainable_params"] < m["total_params"]


def test_tiny_llama_qlora_4bit(run_job, monkeypatch):
    """The model the run trained holds its linear layers in 4 bits: bitsandbytes' Linear4bit, each
    weight a Params4bit packed with its quantization state, under the LoRA adapters that train."""
    import bitsandbytes as bnb

    from summ.modeling import models

    trained, with_adapters = [], models.with_adapters
    monkeypatch.setattr(models, "with_adapters", lambda *args: trained.append(with_adapters(*args)) or trained[-1])
    m, _ = run_job("model=tiny_llama", "model.quantization=4bit", "measure.steps=2", "eval.enabled=false")
    assert m["status"] == "ok", m["error"]
    assert m["quantization"] == "4bit"
    (loaded,) = trained
    four_bit = {name: module for name, module in loaded.model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    targets = set(compose_cfg(["model=tiny_llama"]).model.lora.target_modules)  # every projection of each layer
    assert {name.rsplit(".", 2)[-2] for name in four_bit} >= targets, sorted(four_bit)
    for name, module in four_bit.items():
        weight = module.weight
        assert isinstance(weight, bnb.nn.Params4bit) and weight.quant_state is not None, name
        assert weight.dtype == torch.uint8 and weight.quant_state.quant_type == "nf4", name
        assert not weight.requires_grad, name  # frozen: the adapters train
    assert any(p.requires_grad for n, p in loaded.model.named_parameters() if "lora_" in n)
