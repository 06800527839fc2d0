"""train.compile: compiled in a warm-up before the loop, so that no measured step compiles; the
same update as eager; evaluation and the next cell run eagerly."""

from __future__ import annotations

import json

import pytest

from summ.training.compiled import CompileWatch, warmup_indices
from summ.validation import unused_settings

from .conftest import compose_cfg

STEPS = ["measure.steps=4", "eval.enabled=false", "train.save_model=false"]


def test_the_warm_up_runs_each_kind_of_micro_batch_once():
    order = [[0, 1], [2, 3], [4], [5, 6], [7]]
    assert warmup_indices(order) == [[0, 1], [2, 3], [4], [7]]
    assert warmup_indices([[0, 1]]) == [[0, 1]]


def test_compile_on_a_cpu_without_a_cpp_compiler_is_refused(monkeypatch):
    import shutil

    from summ.errors import ConfigError
    from summ.validation import validate

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ConfigError, match="train.compile=true on the CPU needs a C\\+\\+ compiler"):
        validate(compose_cfg(["train.compile=true", "train.cpu=true"]))


def test_a_compile_mode_without_compile_is_said():
    said = unused_settings(compose_cfg(["train.compile_mode=max-autotune"]))
    assert any("train.compile_mode=max-autotune" in s and "train.compile=false" in s for s in said)


@pytest.mark.slow
def test_no_measured_step_compiles_the_update_is_eagers_and_the_next_run_is_eager(run_job):
    """A token budget's micro-batches change both width and sample count from step to step: the
    warm-up compiles them all, the losses follow eager's, and nothing compiled runs afterwards."""
    common = ["model=tiny_llama", "model.tiny.dropout=0", "batch.max_tokens=1024", *STEPS]
    eager, _ = run_job(*common)
    m, out = run_job(*common, "train.compile=true")
    assert m["status"] == "ok", m["error"]
    t = m["train"]
    assert t["recompiles"] == 0 and t["compile_seconds"] > 0 and t["warmup_optimizer_steps"] == 1
    # compiling took seconds; no step holds any of it, the warm-up step included
    steps = [json.loads(line)["step_time_s"] for line in (out / "train_history.jsonl").read_text().splitlines()]
    assert max(steps) < t["compile_seconds"] / 10 and t["seconds"] < t["compile_seconds"]
    assert eager["train"]["compile_seconds"] is None and eager["train"]["recompiles"] is None
    assert t["final_loss"] == pytest.approx(eager["train"]["final_loss"], rel=1e-3)
    assert t["flops_per_token"] == pytest.approx(eager["train"]["flops_per_token"])  # counted on the eager model
    assert t["samples"] == eager["train"]["samples"] and t["tokens"] == eager["train"]["tokens"]

    watch = CompileWatch()
    try:
        after, _ = run_job("model=tiny_llama", "eval.generate=false", *STEPS[:1])  # evaluation on
    finally:
        watch.close()
    assert after["status"] == "ok" and after["eval"]["loss"] > 0
    assert watch.compiles == 0  # nothing compiled, nothing guarded: the eager model ran
