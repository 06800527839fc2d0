"""Settings that change what a figure means are said in the run and in the knee report; settings
that make a result meaningless are refused (issue 21, item 3)."""

from __future__ import annotations

import logging

import pytest

from summ.errors import DataError
from summ.reports.knee_report import build_report

from .conftest import job_folder


def test_probe_off_with_a_budget_is_a_caveat_in_the_run(run_job, caplog):
    with caplog.at_level(logging.WARNING, logger="summ.training.loop"):
        m, _ = run_job(
            "measure.memory_probe=false", "measure.memory_budget_gb=8", "measure.steps=2", "batch.batch_size=2"
        )
    assert m["status"] == "ok"
    [caveat] = m["caveats"]
    assert "memory_probe=false" in caveat and "memory budget (8 GiB) is judged without it" in caveat
    assert caveat in [r.getMessage() for r in caplog.records]


def test_probe_off_without_a_budget_still_says_the_peak_is_partial(run_job):
    m, _ = run_job("measure.memory_probe=false", "measure.steps=2", "batch.batch_size=2")
    [caveat] = m["caveats"]
    assert "not of the epoch's widest batch" in caveat and "budget" not in caveat


@pytest.mark.parametrize("samples,warmup,repeats", [(200, 8, 2), (96, 40, None), (300, 0, 3)])
def test_a_window_larger_than_the_training_set_is_said(run_job, samples, warmup, repeats):
    """120 bundled training samples: a window of warm-up + measured samples beyond them repeats samples."""
    m, _ = run_job(f"measure.samples={samples}", f"measure.warmup_samples={warmup}", "batch.batch_size=8")
    assert m["status"] == "ok"
    caveats = [c for c in (m["caveats"] or []) if "measured window" in c]
    if repeats is None:  # 96 + 40 > 120 too: the warm-up overlaps
        assert caveats and "larger than the 120 training samples" in caveats[0]
    else:
        assert len(caveats) == 1 and f"up to {repeats} times" in caveats[0]


def test_a_window_within_the_training_set_says_nothing(run_job):
    m, _ = run_job("measure.samples=64", "measure.warmup_samples=16", "batch.batch_size=8")
    assert m["status"] == "ok" and m["caveats"] is None


@pytest.mark.parametrize("k,n", [(5, 3), (4, 3), (121, None)])
def test_more_folds_than_samples_is_refused(run_job, k, n):
    overrides = [f"train.k_folds={k}", "measure.steps=1"] + ([f"data.max_train_samples={n}"] if n else [])
    with pytest.raises(DataError, match=rf"train.k_folds={k} is more than the {n or 120} training samples"):
        run_job(*overrides)


def test_caveats_reach_the_knee_report(tmp_path):
    for i, (bs, caveats) in enumerate([(2, ["A"]), (4, ["A", "B"]), (8, ["A"])]):
        metrics = {
            "status": "ok",
            "model": "kobart",
            "batch_size": bs,
            "gradient_accumulation_steps": 1,
            "effective_batch_size": bs,
            "train": {"samples_per_s": 10.0 * bs, "samples": 64},
            "memory": {"peak_bytes": bs * 2**20},
            "caveats": caveats,
        }
        job_folder(tmp_path, i, [f"batch.batch_size={bs}"], metrics)
    a = build_report(tmp_path)
    assert "all 3 cells: A" in a.warnings and "job 1: B" in a.warnings
    md = (tmp_path / "knee_report.md").read_text()
    assert "- all 3 cells: A" in md and "- job 1: B" in md
