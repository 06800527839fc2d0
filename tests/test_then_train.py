"""sweep.then_train: a sweep that ends with its recommended cell trained and evaluated in
<sweep>/final, named in that run's metrics.json and linked from the knee report; resumed, it is
not trained again."""

from __future__ import annotations

import csv
import json

import pytest

from .conftest import cli

GRID = [
    "-m",
    "batch.batch_size=4,8",
    "sweep.trial_samples=32",
    "sweep.trial_warmup_samples=16",
    "sweep.then_train=true",
    "train.epochs=1",
    "data.max_eval_samples=8",
]


@pytest.mark.slow
def test_a_sweep_then_trains_its_recommended_cell(tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli(*GRID, f"hydra.sweep.dir={sweep}", timeout=900, code=0)
    final = json.loads((sweep / "final" / "metrics.json").read_text())
    rows = {r["job"]: r for r in csv.DictReader((sweep / "sweep.csv").open())}
    report = (sweep / "knee_report.md").read_text()
    recommended = next(job for job, r in rows.items() if "recommended" in (r.get("flags") or ""))
    assert set(rows) == {"0", "1"}  # the final run is no cell of the sweep
    assert final["status"] == "ok" and final["recommended_cell"]["job"] == recommended
    assert final["recommended_cell"]["sweep"] == str(sweep)
    assert final["batch_size"] == int(rows[recommended]["batch_size"])
    # its full schedule (one epoch of the 120 bundled samples), not the trial's window, then evaluated
    assert final["train"]["total_optimizer_steps"] == 120 // final["effective_batch_size"]
    assert final["eval"]["n"] == 8 and final["eval"]["rouge1"] is not None
    assert (sweep / "final" / "model").is_dir()
    # its own log, with the model its cells loaded, not appended to the last job's
    steps = final["train"]["total_optimizer_steps"]
    log = (sweep / "final" / "run.log").read_text()
    assert f"step {steps}/{steps}" in log and "model reused from an earlier cell" in log
    assert f"/{steps} " not in (sweep / "0" / "run.log").read_text() + (sweep / "1" / "run.log").read_text()
    assert "[`final/`](final/)" in report and f"(job {recommended}) trained" in report
    assert "final run:" in proc.stdout
    assert "[HYDRA] step" not in proc.stdout + proc.stderr  # the final run's lines read as a job's

    again = cli(*GRID, f"hydra.sweep.dir={sweep}", "sweep.resume=true", timeout=900, code=0)
    assert json.loads((sweep / "final" / "metrics.json").read_text()) == final  # not trained again
    assert "not trained again" in again.stdout + again.stderr


@pytest.mark.slow
def test_a_final_run_that_stopped_resumes_from_its_checkpoint_with_the_sweep(tmp_path):
    """The final run fails at step 20 (only it gets that far: the cells measure 12 steps or fewer),
    after a checkpoint at step 10; the same command with sweep.resume=true keeps the cells and
    continues the final run from that checkpoint."""
    sweep = tmp_path / "sweep"
    grid = [*GRID, "train.save_every_steps=10", f"hydra.sweep.dir={sweep}"]
    failed = cli(*grid, env={"SUMM_FAILPOINTS": "error@optimizer:step=20"}, timeout=900, code=1)
    stopped = json.loads((sweep / "final" / "metrics.json").read_text())
    assert stopped["status"] == "failed" and "final run:" in failed.stdout
    assert "ended failed" in (sweep / "knee_report.md").read_text()
    cells = {d: (sweep / d / "metrics.json").read_text() for d in ("0", "1")}
    cli(*grid, "sweep.resume=true", timeout=900, code=0)
    final = json.loads((sweep / "final" / "metrics.json").read_text())
    assert final["status"] == "ok" and final["resumed_from"]["step"] == 10
    assert final["train"]["total_optimizer_steps"] == 120 // final["effective_batch_size"] > 20
    history = [json.loads(line)["step"] for line in (sweep / "final" / "train_history.jsonl").read_text().splitlines()]
    assert history == list(range(1, final["train"]["total_optimizer_steps"] + 1))
    assert {d: (sweep / d / "metrics.json").read_text() for d in ("0", "1")} == cells  # not measured again
