"""Multirun sweeps through the real CLI: cells over budget, the knee report, and resume."""

from __future__ import annotations

import csv
import json

import pytest

from .conftest import CONF, cli, compose_cfg

SMALL_GRID = [
    "preset=knee_grid",
    "batch.gradient_accumulation_steps=1",
    "measure.steps=3",
    "measure.warmup_steps=1",
    "data.synthetic_train_size=1000",
]


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "preset").glob("*.yaml")))
def test_every_preset_composes_and_opens_with_its_command(preset):
    cfg = compose_cfg([f"preset={preset}"])
    assert cfg.batch.batch_size > 0
    lines = (CONF / "preset" / f"{preset}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"  # Hydra reads the header only above other comments
    assert lines[1].startswith(f"# python run.py -m preset={preset}")


def test_original_report_scenarios():
    fast = compose_cfg(["preset=fast_functional"])
    assert (fast.batch.batch_size, fast.batch.gradient_accumulation_steps, fast.data.max_train_samples) == (8, 1, 6000)
    medium = compose_cfg(["preset=medium"])
    assert (medium.batch.batch_size, medium.batch.gradient_accumulation_steps, medium.data.max_train_samples) == (
        8,
        1,
        None,
    )
    exact = compose_cfg(["preset=exact_eval"])
    assert (exact.batch.batch_size, exact.batch.gradient_accumulation_steps) == (8, 2) and exact.sweep.evaluate


@pytest.mark.slow
def test_grid_with_a_small_budget_marks_over_budget_and_recommends_within_it(tmp_path):
    sweep = tmp_path / "sweep"
    cli("-m", f"hydra.sweep.dir={sweep}", *SMALL_GRID, "measure.memory_budget_gb=0.5", timeout=600, code=0)
    rows = list(csv.DictReader((sweep / "sweep.csv").open()))
    assert len(rows) == 5
    by_bs = {int(r["batch_size"]): r for r in rows}
    assert by_bs[32]["status"] == "over_budget"
    assert all(by_bs[b]["status"] == "ok" for b in (2, 4, 8))
    md = (sweep / "knee_report.md").read_text()
    rec = next(r for r in rows if "recommended" in r["flags"])
    assert rec["status"] == "ok" and int(rec["batch_size"]) < 32
    assert (sweep / "knee.png").stat().st_size > 10_000
    # the memory model's largest fitting micro-batch is within one grid step of the measured one
    from summ.reports.knee_report import build_report
    from summ.reports.memory_model import fit_memory_model

    a = build_report(sweep)
    measured = a.measured_largest_fitting
    assert measured / 2 <= a.predicted_largest_fitting < measured * 4
    assert "over_budget" in md
    # two held-out cells predicted by the memory model of two others within 10% of their measured
    # peaks: 4 between them, 16 beyond them (stopped over budget, after its probe measured its peak)
    cells = {c.batch_size: c for c in a.cells}
    model = fit_memory_model([cells[2], cells[8]])
    errors = {b: model.predict(b) / cells[b].peak_bytes - 1 for b in (4, 16)}
    assert all(abs(e) < 0.10 for e in errors.values()), errors
    # the why: one sentence per doubling between ok cells, each with its cause; a column per part and phase
    why = md.split("## Why")[1].split("## Cells")[0]
    assert [line.split(":")[0] for line in why.splitlines() if line.startswith("- ")] == [
        f"- micro-batch {b} -> {2 * b} at accumulation 1" for b in (2, 4)
    ]
    assert {"memory_activations_bytes", "memory_optimizer_state_bytes", "backward_s_per_sample"} <= set(rows[0])
    assert int(by_bs[8]["memory_optimizer_state_bytes"]) > 0
    # each job measured only 3 steps, without evaluation (multirun jobs are measurement trials)
    m = json.loads((sweep / "0" / "metrics.json").read_text())
    assert m["train"]["optimizer_steps"] == 3 and m["eval"] is None


@pytest.mark.slow
def test_resume_reuses_complete_cells(tmp_path):
    sweep = tmp_path / "sweep"
    overrides = ["batch.batch_size=2,4", "measure.steps=2", "measure.warmup_steps=1", "data.max_train_samples=40"]
    cli("-m", f"hydra.sweep.dir={sweep}", *overrides, timeout=600, code=0)
    first = {d.name: (d / "metrics.json").read_text() for d in sweep.iterdir() if d.name.isdigit()}
    (sweep / "1" / "metrics.json").write_text("{ broken")  # an interrupted write would look like this
    proc = cli("-m", f"hydra.sweep.dir={sweep}", *overrides, "sweep.resume=true", timeout=600, code=0)
    assert (sweep / "0" / "metrics.json").read_text() == first["0"]  # reused as it was
    again = json.loads((sweep / "1" / "metrics.json").read_text())
    assert again["status"] == "ok"  # measured again
    assert "not measured again" in proc.stdout + proc.stderr + (sweep / "0" / "run.log").read_text()
    rows = list(csv.DictReader((sweep / "sweep.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "ok"]
