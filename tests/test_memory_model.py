"""What would fit: the memory model from the parts (static counted, activations fitted), its
intervals, its check against held-out cells, and gradient checkpointing's factor, on recorded
tables and on tiny_llama trained both ways."""

from __future__ import annotations

import json

import pytest

from summ.reports.knee_report import build_report
from summ.reports.memory_model import checkpointing_factor, fit_memory_model, held_out_checks

from .conftest import cli, job_folder

MIB = 2**20
STATIC = {"weights_bytes": 300 * MIB, "gradients_bytes": 20 * MIB, "optimizer_state_bytes": 40 * MIB}


def cell(root, num, bs, activations, checkpointing=False, backward_s=None, positions_per_sample=500):
    """A job whose peak is the static parts plus `activations` MiB, measured at `bs` x positions."""
    act = int(activations * MIB)
    peak = sum(STATIC.values()) + act
    overrides = [f"batch.batch_size={bs}", "batch.gradient_accumulation_steps=1"]
    overrides += [f"model.gradient_checkpointing={checkpointing}"]
    m = {
        "status": "ok",
        "model": "llama",
        "batch_size": bs,
        "gradient_accumulation_steps": 1,
        "effective_batch_size": bs,
        "gradient_checkpointing": checkpointing,
        "train": {
            "samples": 10 * bs,
            "samples_per_s": 10.0,
            "max_micro_batch_positions": bs * positions_per_sample,
            "phase_seconds": {"backward": backward_s * 10 * bs} if backward_s else None,
        },
        "memory": {
            "peak_bytes": peak,
            "budget_bytes": 24 * 2**30,
            "limit_bytes": int(0.9 * 24 * 2**30),
            "components": {**STATIC, "activations_bytes": act},
        },
    }
    return job_folder(root, num, overrides, m)


def test_the_fit_is_of_the_activations_with_the_counted_parts_added(tmp_path):
    for i, bs in enumerate((2, 4, 8, 16)):
        cell(tmp_path, i, bs, 10 + 5 * bs * 1.02 ** (i % 2))  # near a line: a small wobble
    a = build_report(tmp_path)
    mm = a.memory_model
    assert mm.fitted == "activations" and mm.static_bytes == sum(STATIC.values())
    assert 0.99 < mm.r2 < 1 and mm.predicts
    low, high = mm.interval(32)
    assert low < mm.predict(32) < high and high - low < 0.1 * mm.predict(32)
    assert mm.activations(32) == pytest.approx(mm.predict(32) - sum(STATIC.values()))
    checks = held_out_checks(a.cells)
    assert len(checks) == 4 and all(abs(h.error) < 0.05 for h in checks)
    md = (tmp_path / "knee_report.md").read_text()
    assert "R^2 = " in md and "counted (weights, gradients, optimizer state) + activations" in md
    assert "Checked: each measured cell against the model fitted on the others" in md
    assert "| 32 |" in md  # predicted, not measured, with its interval


def test_a_poor_line_predicts_nothing_and_two_points_no_interval(tmp_path):
    cell(tmp_path, 0, 2, 100)
    cell(tmp_path, 1, 4, 10)
    mm = fit_memory_model(build_report(tmp_path).cells)
    assert mm.interval(8) is None and not mm.predicts


def test_checkpointing_factor_and_the_switch_predicted(tmp_path):
    """Pairs at the same micro-batch, one with checkpointing: the factor on activations is measured
    from them, and the switched cell's peak predicted with the counted parts unchanged."""
    for i, bs in enumerate((2, 4, 8)):
        cell(tmp_path, i, bs, 40 * bs, backward_s=0.010)
        cell(tmp_path, 10 + i, bs, 12 * bs, checkpointing=True, backward_s=0.013)
    a = build_report(tmp_path)
    f = checkpointing_factor(a.cells)
    assert f.factor == pytest.approx(0.3) and f.backward_ratio == pytest.approx(1.3) and len(f.pairs) == 3
    md = (tmp_path / "knee_report.md").read_text()
    assert "Gradient checkpointing multiplies the activations by 0.30 (measured on 3 pair(s)" in md
    assert "backward pass (its recompute) by 1.30 per sample" in md
    switched = "switched on" if not a.recommended.gradient_checkpointing else "switched off"
    assert f"checkpointing {switched}" in md


@pytest.mark.slow
def test_tiny_llamas_activations_fall_under_checkpointing(tmp_path):
    """Trained both ways at micro-batch 8: checkpointing keeps the layer inputs and recomputes the
    rest in backward, so the activations fall, though not below what it cannot drop (the logits
    of the micro-batch), and the backward pass executes the recomputed forward too (counted in
    FLOPs: its time per sample, about 1.7x alone, is within the noise of the suite's two workers).
    Each in a fresh process, as a user runs it: a test worker's heap, fragmented by earlier tests,
    would be reused and read as resident memory."""
    runs = {}
    for on in (False, True):
        folder = tmp_path / f"checkpointing_{on}"
        overrides = ["model=tiny_llama", "batch.batch_size=8", f"model.gradient_checkpointing={on}"]
        cli(f"hydra.run.dir={folder}", *overrides, "measure.steps=3", "eval.enabled=false", code=0)
        runs[on] = json.loads((folder / "metrics.json").read_text())
    off, on = (runs[k]["memory"]["components"] for k in (False, True))
    assert off["weights_bytes"] == on["weights_bytes"] and off["optimizer_state_bytes"] == on["optimizer_state_bytes"]
    assert on["logits_bytes"] == off["logits_bytes"] <= on["activations_bytes"] < 0.85 * off["activations_bytes"]
    executed = {k: runs[k]["train"]["hardware_flops_per_position"] for k in runs}
    assert executed[True] > 1.1 * executed[False]  # the layers' forward again, inside backward
