"""Fault injection: a sweep killed with SIGKILL in the middle of a job and resumed, corrupt result
files in a real sweep folder, and a job whose result folder cannot exist."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from summ.files import WriteFailed

from .conftest import ROOT, cli, compose_cfg

# Three cells; 60 measured steps make job 1 last seconds, long enough to be killed inside it.
GRID = [
    "batch.batch_size=2,4,8",
    "data=synthetic",
    "data.synthetic_train_size=600",
    "measure.steps=60",
    "measure.warmup_steps=1",
]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _files(folder: Path) -> dict[str, float]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _kill_inside_job_1(sweep: Path, log: Path) -> None:
    """Start the grid in its own process group and SIGKILL the group once job 0 has finished and
    job 1 has started (its folder exists, its metrics.json does not)."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "run.py", "-m", f"hydra.sweep.dir={sweep}", *GRID],
            cwd=ROOT,
            env=ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 240
        try:
            while not (
                (sweep / "0" / "metrics.json").exists()
                and (sweep / "1").is_dir()
                and not (sweep / "1" / "metrics.json").exists()
            ):
                assert proc.poll() is None, f"the sweep ended before job 1 was killed:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"job 1 never started:\n{log.read_text()[-3000:]}"
                time.sleep(0.02)
            os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group id is the leader's pid
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """(sweep folder, files after the kill, job 0's metrics.json bytes after the kill, resume process)."""
    root = tmp_path_factory.mktemp("killed")
    sweep = root / "sweep"
    _kill_inside_job_1(sweep, root / "first.log")
    after_kill = _files(sweep)
    job0 = (sweep / "0" / "metrics.json").read_bytes()
    resumed = cli("-m", f"hydra.sweep.dir={sweep}", *GRID, "sweep.resume=true", code=0)
    return sweep, after_kill, job0, resumed


@pytest.mark.slow
def test_sigkill_inside_a_job_then_resume_measures_only_the_rest(killed_and_resumed):
    sweep, after_kill, job0, resumed = killed_and_resumed
    # What the kill left: job 0 whole, job 1 without a result, job 2 not started, no temporary files.
    first = json.loads(job0)
    assert first["status"] == "ok" and first["batch_size"] == 2 and first["train"]["samples_per_s"] > 0
    assert not any(name.endswith(".tmp") for name in after_kill), sorted(after_kill)
    assert "1/metrics.json" not in after_kill and not any(name.startswith("2/") for name in after_kill)
    assert {name.split("/")[0] for name in after_kill} <= {"0", "1", "multirun.yaml"}
    # The resume: job 0 reused as it was (same bytes, not rewritten), jobs 1 and 2 measured.
    assert (sweep / "0" / "metrics.json").read_bytes() == job0
    assert (sweep / "0" / "metrics.json").stat().st_mtime_ns == after_kill["0/metrics.json"]
    assert (sweep / "0" / "train_history.jsonl").stat().st_mtime_ns == after_kill["0/train_history.jsonl"]
    log = resumed.stdout + resumed.stderr + (sweep / "0" / "run.log").read_text()
    assert "resume:" in log and "not measured again" in log
    cells = {j: json.loads((sweep / j / "metrics.json").read_text()) for j in ("0", "1", "2")}
    assert {j: (m["status"], m["batch_size"]) for j, m in cells.items()} == {
        "0": ("ok", 2),
        "1": ("ok", 4),
        "2": ("ok", 8),
    }
    assert cells["1"]["config_hash"] != cells["0"]["config_hash"]
    assert not list(sweep.rglob("*.tmp"))
    # sweep.csv: exactly the three cells, as their job folders hold them.
    rows = list(csv.DictReader((sweep / "sweep.csv").open()))
    assert [(r["job"], r["status"], int(r["batch_size"])) for r in rows] == [
        ("0", "ok", 2),
        ("1", "ok", 4),
        ("2", "ok", 8),
    ]
    for r in rows:
        assert float(r["samples_per_s"]) == pytest.approx(cells[r["job"]]["train"]["samples_per_s"])
    report = cli(sweep, module="summ.reports.knee_report", code=0)
    assert "recommended" in report.stdout.lower() and "warning" not in report.stderr


@pytest.mark.slow
def test_a_truncated_metrics_json_in_a_real_sweep_is_a_warning(killed_and_resumed, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(killed_and_resumed[0], sweep)
    text = (sweep / "2" / "metrics.json").read_text()
    (sweep / "2" / "metrics.json").write_text(text[: len(text) // 2])  # what a torn write would leave
    report = cli(sweep, module="summ.reports.knee_report", code=0)
    assert "Traceback" not in report.stderr, report.stderr[-2000:]
    assert "job 2: metrics.json is corrupt" in report.stderr
    rows = {r["job"]: r for r in csv.DictReader((sweep / "sweep.csv").open())}
    assert (rows["0"]["status"], rows["1"]["status"], rows["2"]["status"]) == ("ok", "ok", "corrupt")
    assert rows["2"]["batch_size"] == "8"  # read back from the job's .hydra/config.yaml
    compare = cli(sweep, "--format", "csv", module="summ.reports.compare", code=0)
    assert "Traceback" not in compare.stderr, compare.stderr[-2000:]
    warnings = compare.stderr.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning: ")
    assert "job 2: metrics.json is corrupt" in warnings[0]
    statuses = [r["status"] for r in csv.DictReader(compare.stdout.splitlines())]
    assert statuses == ["ok", "ok", "corrupt"]


def test_a_job_whose_folder_cannot_exist_fails_with_one_line(tmp_path):
    from summ.pipeline import run_job as train

    blocker = tmp_path / "outputs"
    blocker.write_text("a file where the run folder's parent should be\n")
    cfg = compose_cfg(
        [
            "data.max_train_samples=16",
            "measure.steps=1",
            "measure.warmup_steps=0",
            "eval.enabled=false",
            "train.save_model=false",
        ]
    )
    with pytest.raises(WriteFailed) as info:
        train(cfg, blocker / "run")
    message = str(info.value)
    assert "\n" not in message and f"{blocker} is a file, not a folder" in message
    assert message.startswith(f"cannot write {blocker / 'run'}")
    assert [p.name for p in tmp_path.iterdir()] == ["outputs"]  # nothing partial, no temporary file
