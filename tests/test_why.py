"""The knee report's "why": one sentence per step of the grid, its cause ranked by the evidence the
cells' figures carry. Replayed on recorded tables shaped like the original report's two cases."""

from __future__ import annotations

from summ.reports.knee_report import build_report
from summ.reports.why import grid_steps, why_lines

from .conftest import job_folder

GIB = 2**30


def cell(root, num, bs, ga, step_s, model="llama", parts=None, phases=None, pad=0.2, **memory):
    """A job folder whose measured steps took `step_s` seconds each (10 steps); `phases`: seconds of
    each phase per step; `parts`: memory components in GiB."""
    samples = 10 * bs * ga
    m = {
        "status": "ok",
        "model": model,
        "batch_size": bs,
        "gradient_accumulation_steps": ga,
        "effective_batch_size": bs * ga,
        "gradient_checkpointing": memory.pop("checkpointing", False),
        "train": {
            "samples": samples,
            "seconds": 10 * step_s,
            "samples_per_s": samples / (10 * step_s),
            "seconds_per_sample": 10 * step_s / samples,
            "pad_fraction": pad,
            "phase_seconds": {k: 10 * v for k, v in (phases or {}).items()} or None,
        },
        "memory": {
            "budget_bytes": 24 * GIB,
            "components": {k: int(v * GIB) for k, v in (parts or {}).items()} or None,
            **memory,
        },
        "mfu": memory.pop("mfu", None),
    }
    overrides = [f"batch.batch_size={bs}", f"batch.gradient_accumulation_steps={ga}"]
    return job_folder(root, num, overrides, m)


def _line(lines, start):
    (found,) = [line for line in lines if line.startswith(start)]
    return found


def test_llama_qlora_slowdown_is_memory_pressure_with_the_parts_that_grew(tmp_path):
    """Llama-3.2-3B QLoRA on a 24 GB card: 3.3 s/step at micro-batch 8, 8.0 s/step at 16, the
    allocator retrying at 16; activations and the 128k-vocabulary logits doubled, the weights
    and the optimizer state (LoRA's: a few hundred MB) did not."""
    static = {"weights_bytes": 2.6, "gradients_bytes": 0.09, "optimizer_state_bytes": 0.18}
    cell(
        tmp_path,
        0,
        8,
        2,
        3.3,
        parts={**static, "activations_bytes": 9.5, "logits_bytes": 1.34},
        peak_bytes=int(12.4 * GIB),
    )
    cell(
        tmp_path,
        1,
        16,
        2,
        8.0,
        parts={**static, "activations_bytes": 19.1, "logits_bytes": 2.68},
        peak_bytes=int(22.0 * GIB),
        alloc_retries=37,
    )
    a = build_report(tmp_path)
    line = _line(why_lines(a.cells, a.tolerance), "micro-batch 8 -> 16 at accumulation 2")
    assert "per-sample cost rose 21%" in line
    assert "memory pressure (37 allocator retries)" in line
    assert "activations 9.5 GiB -> 19.1 GiB" in line and "logits 1.34 GiB -> 2.68 GiB" in line
    assert "optimizer" not in line and "weights" not in line  # what did not grow is not named
    assert "## Why" in (tmp_path / "knee_report.md").read_text() and line in (tmp_path / "knee_report.md").read_text()


def test_kobart_speedup_is_the_per_step_cost_amortised(tmp_path):
    """KoBART: 99 -> 165 samples/s from micro-batch 8 to 16. The optimizer step and the data take
    the same time per step at both sizes: per sample they halve."""
    small = {
        "data": 0.004,
        "copy": 0.001,
        "forward": 0.020,
        "backward": 0.035,
        "optimizer": 0.020,
        "bookkeeping": 0.0008,
    }
    large = {
        "data": 0.005,
        "copy": 0.002,
        "forward": 0.027,
        "backward": 0.042,
        "optimizer": 0.020,
        "bookkeeping": 0.0010,
    }
    cell(tmp_path, 0, 8, 1, 8 / 99, model="kobart", phases=small)
    cell(tmp_path, 1, 16, 1, 16 / 165, model="kobart", phases=large)
    (line,) = why_lines(build_report(tmp_path).cells, 0.05)
    assert line.startswith("micro-batch 8 -> 16 at accumulation 1: per-sample cost fell 40%")
    assert "amortised per-step cost" in line
    # the step's fixed part solved from the two step times: 2 x 80.8 ms - 97.0 ms = 64.6 ms
    assert "a fixed cost of 64.6 ms per step" in line
    assert "optimizer 2.5 -> 1.25" in line  # ms per sample: the step's optimizer time over twice the samples


def test_a_slowdown_without_evidence_is_not_explained_by_a_guess(tmp_path):
    cell(tmp_path, 0, 4, 1, 1.0, peak_bytes=1 * GIB)
    cell(tmp_path, 1, 8, 1, 2.6, peak_bytes=2 * GIB)
    (line,) = why_lines(build_report(tmp_path).cells, 0.05)
    assert "per-sample cost rose 30%" in line and "no cause found in the figures" in line


def test_padding_then_a_phase_then_saturation(tmp_path):
    """Each cause where the figures show it, and only there: padding that grew, a backward pass
    (recompute included under checkpointing) that grew faster than the work, a flat MFU."""
    per = {"forward": 0.1, "backward": 0.2, "optimizer": 0.05}
    cell(tmp_path, 0, 2, 1, 0.35, pad=0.10, phases=per, checkpointing=True, mfu=0.40)
    cell(tmp_path, 1, 4, 1, 0.90, pad=0.30, phases={**per, "backward": 0.65}, checkpointing=True, mfu=0.30)
    cell(tmp_path, 2, 8, 1, 2.20, pad=0.30, phases={**per, "backward": 1.9}, checkpointing=True, mfu=0.25)
    cell(tmp_path, 3, 16, 1, 4.35, pad=0.30, phases={**per, "backward": 3.8}, checkpointing=True, mfu=0.25)
    lines = why_lines(build_report(tmp_path).cells, 0.05)
    assert "padding: 10% -> 30%" in _line(lines, "micro-batch 2 -> 4")
    phase = _line(lines, "micro-batch 4 -> 8")
    assert "the backward pass, its recompute included, grew faster than the work" in phase
    assert "backward 162 -> 238 ms per sample" in phase
    assert "compute saturated: MFU 25% -> 25% flat" in _line(lines, "micro-batch 8 -> 16")


def test_one_sentence_per_step_of_the_grid(tmp_path):
    """Doublings at each accumulation, and splits of each effective batch: a 3 x 2 grid has 4 + 2."""
    for num, (bs, ga) in enumerate((b, g) for b in (2, 4, 8) for g in (1, 2)):
        cell(tmp_path, num, bs, ga, 0.1 * bs * ga)
    a = build_report(tmp_path)
    steps = grid_steps(a.cells)
    assert sorted((s.kind, s.small.batch_size, s.small.gradient_accumulation_steps) for s in steps) == [
        ("doubling", 2, 1),
        ("doubling", 2, 2),
        ("doubling", 4, 1),
        ("doubling", 4, 2),
        ("split", 2, 2),
        ("split", 4, 2),
    ]
    assert len(why_lines(a.cells, a.tolerance)) == 6
