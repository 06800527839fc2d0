"""The knee report from hand-made job folders: flags, recommendation, memory model, bad files."""

from __future__ import annotations

import json

import pytest

from summ.reports.cells import load_cells
from summ.reports.knee import analyse
from summ.reports.knee_report import build_report, main
from summ.reports.memory_model import fit_memory_model

from .conftest import job_folder

GB = 10**9


def job(
    root,
    num,
    bs,
    ga,
    status="ok",
    sps=None,
    peak=None,
    positions=None,
    budget=24 * GB,
    headroom=0.9,
    rouge=None,
    extra_overrides=(),
    alloc_retries=None,
    interval=None,
    busy=False,
    samples=None,
):
    overrides = [f"batch.batch_size={bs}", f"batch.gradient_accumulation_steps={ga}", *extra_overrides]
    m = {
        "status": status,
        "error": None if status == "ok" else f"{status} in train",
        "model": "llama",
        "batch_size": bs,
        "gradient_accumulation_steps": ga,
        "effective_batch_size": bs * ga,
        "mixed_precision": "no",
        "gradient_checkpointing": True,
        "train": {
            "samples_per_s": sps,
            "tokens_per_s": sps and sps * 300,
            "seconds_per_sample": sps and 1 / sps,
            "step_time_s_median": sps and bs * ga / sps,
            "max_micro_batch_positions": positions,
            "pad_fraction": 0.2,
            "samples_per_s_interval": interval,
            "samples": samples,
        },
        "memory": {
            "peak_bytes": peak,
            "budget_bytes": budget,
            "limit_bytes": int(budget * headroom),
            "fraction": peak and peak / budget,
            "alloc_retries": alloc_retries,
        },
        "machine": {"busy": busy},
        "eval": {"rouge_mean": rouge, "loss": 1.0} if rouge else None,
        "epoch_seconds_projected": sps and 12457 / sps,
    }
    return job_folder(root, num, overrides, m)


def test_memory_pressure_case_from_the_original_report(tmp_path):
    """Llama 3B, QLoRA: 3.3 s/step at batch 8 against 8.0 s/step at batch 16 (accumulation 2), the
    CUDA allocator retrying (freeing its cache to satisfy requests) at 16: memory pressure."""
    job(tmp_path, 0, 8, 2, sps=16 / 3.3, peak=19 * GB, positions=8 * 600)
    job(tmp_path, 1, 16, 2, sps=32 / 8.0, peak=21 * GB, positions=16 * 600, alloc_retries=37)
    job(tmp_path, 2, 4, 2, sps=8 / 1.9, peak=15 * GB, positions=4 * 600)
    a = build_report(tmp_path)
    by_bs = {c.batch_size: c for c in a.cells}
    assert "memory pressure" in by_bs[16].flags
    assert "memory pressure" not in by_bs[8].flags and "memory pressure" not in by_bs[4].flags
    assert a.recommended.batch_size == 8 and a.fastest is a.recommended
    assert "16 x 2" in a.reason
    md = (tmp_path / "knee_report.md").read_text()
    assert "**memory pressure**" in md and "**micro-batch 8 x accumulation 2**" in md
    assert (tmp_path / "knee.png").stat().st_size > 10_000
    rows = (tmp_path / "sweep.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("job,overrides,status")


def test_a_slowdown_without_evidence_is_not_called_memory_pressure(tmp_path):
    """The CPU knee grid's case: past the fastest cell every larger one is slower at a few % of the
    budget, because padding grows; no allocator retries, no peak near the budget."""
    job(tmp_path, 0, 8, 2, sps=16 / 3.3, peak=1 * GB, positions=8 * 600)
    job(tmp_path, 1, 16, 2, sps=32 / 8.0, peak=2 * GB, positions=16 * 600)
    a = build_report(tmp_path)
    assert not any("memory pressure" in c.flags for c in a.cells)
    assert "memory pressure" not in (tmp_path / "knee_report.md").read_text()
    near = tmp_path / "near"
    job(near, 0, 8, 2, sps=16 / 3.3, peak=19 * GB, positions=8 * 600)
    job(near, 1, 16, 2, sps=32 / 8.0, peak=int(22.5 * GB), positions=16 * 600, headroom=1.0)  # 94% of the budget
    assert "memory pressure" in {c.batch_size: c for c in build_report(near).cells}[16].flags


def test_overlapping_rates_are_ties_and_busy_or_uneven_cells_are_warned_about(tmp_path):
    job(tmp_path, 0, 4, 1, sps=90.0, interval=[80.0, 101.0], peak=2 * GB, positions=4 * 400, samples=192)
    job(tmp_path, 1, 8, 1, sps=100.0, interval=[96.0, 104.0], peak=3 * GB, positions=8 * 400, samples=192, busy=True)
    job(tmp_path, 2, 16, 1, sps=99.0, interval=[97.0, 101.0], peak=4 * GB, positions=16 * 400, samples=200)
    a = build_report(tmp_path)
    assert a.recommended.batch_size == 4  # 10% slower, but its rates overlap the fastest's: a tie
    assert "outside the 5% tolerance, but their per-step rates overlap" in a.reason
    md = (tmp_path / "knee_report.md").read_text()
    assert "busy machine" in md and "measured different samples" in md and "90.00 (80.0-101.0)" in md


def test_each_combination_of_other_settings_gets_its_own_knee(tmp_path):
    for i, (bs, sps, ckpt) in enumerate([(4, 50.0, "true"), (8, 70.0, "true"), (4, 80.0, "false"), (8, 60.0, "false")]):
        job(
            tmp_path,
            i,
            bs,
            1,
            sps=sps,
            peak=(i + 1) * GB,
            positions=bs * 400,
            extra_overrides=[f"model.gradient_checkpointing={ckpt}"],
        )
    a = build_report(tmp_path)
    assert a.recommended.batch_size == 4 and "model.gradient_checkpointing=false" in a.reason
    labels = {g.label: g.recommended.batch_size for g in a.groups}
    assert labels == {"model.gradient_checkpointing=true": 8, "model.gradient_checkpointing=false": 4}
    assert "has its own knee" in (tmp_path / "knee_report.md").read_text()


def test_a_poor_memory_fit_predicts_nothing(tmp_path):
    for i, (bs, peak) in enumerate([(2, 5), (4, 1), (8, 6), (16, 2)]):
        job(tmp_path, i, bs, 1, sps=10.0 * (i + 1), peak=peak * GB, positions=bs * 400)
    a = build_report(tmp_path)
    assert a.memory_model.r2 < 0.9 and a.predicted_largest_fitting is None
    assert "too poor to predict" in (tmp_path / "knee_report.md").read_text()


def test_recommendation_prefers_the_smallest_micro_batch_within_tolerance(tmp_path):
    job(tmp_path, 0, 4, 1, sps=97.0, peak=2 * GB, positions=4 * 400)
    job(tmp_path, 1, 8, 1, sps=100.0, peak=3 * GB, positions=8 * 400)
    job(tmp_path, 2, 4, 2, sps=98.0, peak=2 * GB, positions=4 * 400)
    job(tmp_path, 3, 2, 1, sps=80.0, peak=1.5 * GB, positions=2 * 400)
    a = analyse(load_cells(tmp_path)[0], tolerance=0.05)
    assert (a.recommended.batch_size, a.recommended.gradient_accumulation_steps) == (4, 1)  # ties: fewer steps
    assert a.fastest.batch_size == 8 and "fastest" in a.fastest.flags
    strict = analyse(load_cells(tmp_path)[0], tolerance=0.01)
    assert strict.recommended.batch_size == 8


def test_cells_that_did_not_fit_are_shown_and_excluded(tmp_path):
    job(tmp_path, 0, 4, 1, sps=50.0, peak=8 * GB, positions=4 * 500)
    job(tmp_path, 1, 8, 1, sps=60.0, peak=14 * GB, positions=8 * 500)
    job(tmp_path, 2, 16, 1, status="over_budget", peak=23 * GB)
    job(tmp_path, 3, 32, 1, status="oom")
    a = build_report(tmp_path)
    assert a.recommended.batch_size == 8
    assert "over_budget" in a.reason and "oom" in a.reason
    md = (tmp_path / "knee_report.md").read_text()
    assert "| 16 | 16 | 1 | over_budget |" in md and "| 32 | 32 | 1 | oom |" in md


def test_memory_model_fits_and_predicts_the_largest_fitting_batch(tmp_path):
    # exact line: 2 GB + 1 MB per position, 500 positions per sample
    for i, bs in enumerate((2, 4, 8)):
        job(
            tmp_path,
            i,
            bs,
            1,
            sps=10.0 * bs,
            peak=int(2 * GB + 1e6 * bs * 500),
            positions=bs * 500,
            budget=20 * GB,
            headroom=1.0,
        )
    cells, _ = load_cells(tmp_path)
    mm = fit_memory_model(cells)
    assert mm.r2 == pytest.approx(1.0) and mm.slope == pytest.approx(1e6)
    assert mm.predict(16) == pytest.approx(2 * GB + 1e6 * 16 * 500)
    a = analyse(cells)
    assert a.predicted_largest_fitting == 36  # (20 GB - 2 GB) / (1 MB x 500)
    md = build_report(tmp_path) and (tmp_path / "knee_report.md").read_text()
    assert "(predicted)" in md and "| 16 |" in md


def test_equal_effective_batch_cells_are_compared(tmp_path):
    job(tmp_path, 0, 8, 2, sps=40.0, peak=5 * GB, positions=8 * 300)
    job(tmp_path, 1, 16, 1, sps=30.0, peak=9 * GB, positions=16 * 300)
    md = (build_report(tmp_path), (tmp_path / "knee_report.md").read_text())[1]
    assert "effective 16: 8 x 2: 40.0 samples/s (100% of best)" in md
    assert "16 x 1: 30.0 samples/s (75% of best)" in md


def test_corrupt_and_missing_metrics_are_warnings_not_crashes(tmp_path, capsys):
    job(tmp_path, 0, 4, 1, sps=50.0, peak=2 * GB, positions=4 * 300)
    bad = job(tmp_path, 1, 8, 1, sps=60.0, peak=3 * GB, positions=8 * 300)
    (bad / "metrics.json").write_text('{"status": "ok", "train": {')  # cut short
    missing = job(tmp_path, 2, 16, 1, sps=1.0, peak=1)
    (missing / "metrics.json").unlink()
    assert main([str(tmp_path)]) == 0
    a = build_report(tmp_path)
    statuses = {c.job: c.status for c in a.cells}
    assert statuses == {"0": "ok", "1": "corrupt", "2": "missing"}
    assert any("job 1" in w and "corrupt" in w for w in a.warnings)
    assert any("job 2" in w for w in a.warnings)
    assert "## Warnings" in (tmp_path / "knee_report.md").read_text()


def test_report_cli_rejects_a_missing_folder(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "no such sweep folder" in capsys.readouterr().err


def test_report_cli_refuses_a_folder_with_no_jobs_and_writes_nothing_there(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a sweep")
    assert main([str(tmp_path)]) == 2
    assert "holds no job folders" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def patch(d, **fields):
    """Change a hand-made job's metrics: top-level fields, or `memory__x` / `train__x` inside."""
    m = json.loads((d / "metrics.json").read_text())
    for key, value in fields.items():
        section, _, name = key.partition("__")
        if name:
            m[section][name] = value
        else:
            m[key] = value
    (d / "metrics.json").write_text(json.dumps(m))


def test_the_report_says_where_the_budget_comes_from_and_small_shares_as_they_are(tmp_path):
    for i, bs in enumerate((2, 4)):
        patch(
            job(tmp_path, i, bs, 1, sps=10.0 * bs, peak=int(0.004 * 24 * GB) * bs // 2, positions=bs * 100),
            memory__budget_source="device capacity",
        )
    a = build_report(tmp_path)
    md = (tmp_path / "knee_report.md").read_text()
    assert "Memory budget: none set (measure.memory_budget_gb), so the device's own memory: 22.352 GiB" in md
    assert "| 0.4% |" in md and "| 0.8% |" in md and "| 0% |" not in md
    assert "0.8% of the memory budget (the device's memory: no budget was set)" in a.reason


@pytest.mark.parametrize(
    "fraction,text", [(0.37, "37%"), (0.004, "0.4%"), (0.0004, "<0.1%"), (0.0, "0.0%"), (None, "-"), (1.5, "150%")]
)
def test_percent_reads_as_people_read_it(fraction, text):
    from summ.reports.knee import percent

    assert percent(fraction) == text


def test_a_rate_outside_its_own_interval_is_flagged_and_explained(tmp_path):
    job(tmp_path, 0, 2, 1, sps=32.14, interval=[33.3, 38.6], peak=GB, positions=200)
    job(tmp_path, 1, 4, 1, sps=40.0, interval=[38.0, 42.0], peak=2 * GB, positions=400)
    a = build_report(tmp_path)
    by = {c.batch_size: c for c in a.cells}
    assert "outside its interval" in by[2].flags and "outside its interval" not in by[4].flags
    md = (tmp_path / "knee_report.md").read_text()
    assert "**outside its interval**: a few steps were far slower" in md


def test_a_cell_measured_again_shows_the_runs_range_and_the_header_counts_what_became_of_each_job(tmp_path):
    for i, (bs, sps) in enumerate([(2, 20.0), (4, 30.0), (4, 34.0)]):
        patch(
            job(tmp_path, i, bs, 1, sps=sps, interval=[sps - 1, sps + 1], peak=bs * GB, positions=bs * 100),
            config_hash=f"h{bs}",
        )
    build_report(tmp_path)
    md = (tmp_path / "knee_report.md").read_text()
    assert "Jobs: 3 (2 ok, 1 measured again later (merged into the last reading))" in md
    assert "32.00 (runs 30.0-34.0)" in md and "Cells: 3 (2 ok)" not in md


def test_an_optuna_trial_that_took_an_earlier_trials_result_is_the_copy_not_the_measurement(tmp_path):
    patch(job(tmp_path, 0, 4, 1, sps=30.0, interval=[29.0, 31.0], peak=GB, positions=400), config_hash="same")
    patch(
        job(tmp_path, 1, 4, 1, sps=30.0, interval=[29.0, 31.0], peak=GB, positions=400),
        config_hash="same",
        reused_from=str(tmp_path / "0"),
        reused_trial=0,
    )
    patch(job(tmp_path, 2, 8, 1, sps=31.0, interval=[30.0, 32.0], peak=2 * GB, positions=800), config_hash="other")
    a = build_report(tmp_path)
    by = {c.job: c for c in a.cells}
    assert by["0"].status == "ok" and by["1"].status == "reused" and "the result of job 0" in by["1"].flags[0]
    assert by["0"].samples_per_s_interval == [29.0, 31.0] and by["0"].interval_of == "steps"
    md = (tmp_path / "knee_report.md").read_text()
    assert "Jobs: 3 (2 ok, 1 took another job's result (same config))" in md


def test_a_recommendation_among_different_effective_batches_says_it_changes_the_training(tmp_path):
    job(tmp_path, 0, 4, 1, sps=30.0, peak=GB, positions=400)
    job(tmp_path, 1, 4, 2, sps=31.0, peak=GB, positions=400)
    assert "changes the training itself" in build_report(tmp_path).reason
    same = tmp_path / "same"
    job(same, 0, 4, 2, sps=30.0, peak=GB, positions=400)
    job(same, 1, 8, 1, sps=31.0, peak=2 * GB, positions=800)
    assert "changes the training itself" not in build_report(same).reason


@pytest.mark.parametrize(
    "lo,hi,says",
    [
        (2, 2, "the edge is micro-batch 2 itself"),
        (8, 16, "between micro-batch 8 and 16"),
        (4, None, "the edge is micro-batch 4 itself"),
        (None, None, "no cell fitted"),
    ],
)
def test_the_knee_searchs_log_says_where_the_edge_is(lo, hi, says):
    from hydra_plugins.summ_knee_sweeper.knee_sweeper import bracket

    assert says in bracket(lo, hi) and "between micro-batch 2 and 2" not in bracket(lo, hi)
