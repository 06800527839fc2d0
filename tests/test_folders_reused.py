"""A run folder or a sweep folder belongs to one run or one launch (issue 21, items 4 and 11):
what an earlier one left is moved aside before Hydra writes into it, unless this one resumes it,
and a resume with nothing to resume is refused."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from summ.distributed import STAMP_ENV
from summ.errors import ConfigError
from summ.run_folder import job_dirs
from summ.sweeps.callbacks import one_launch_per_folder, one_run_per_folder

from .conftest import assert_one_error_line, cli

QUICK = ["measure.steps=1", "measure.warmup_steps=1", "eval.enabled=false", "train.save_model=false"]


def config(tmp_path, run_dir=None, sweep_dir=None, resume=False, resume_from=None, model_path=None, reuse_from=None):
    return OmegaConf.create(
        {
            "hydra": {
                "run": {"dir": str(run_dir or tmp_path / "run")},
                "sweep": {"dir": str(sweep_dir or tmp_path / "sweep")},
            },
            "sweep": {"resume": resume, "reuse_from": reuse_from},
            "train": {"resume_from": resume_from},
            "model": {"path": model_path},
        }
    )


def earlier_sweep(folder: Path, jobs=(0, 1)) -> None:
    for j in jobs:
        (folder / str(j) / ".hydra").mkdir(parents=True)
        (folder / str(j) / "metrics.json").write_text(json.dumps({"status": "ok", "batch_size": j + 2}))
    for name in ("knee_report.md", "sweep.csv", "multirun.yaml", "knee.png", "best_overrides.txt"):
        (folder / name).write_text("earlier")
    (folder / "notes.md").write_text("the user's own")  # not ours: stays


@pytest.fixture
def launched_now(monkeypatch):
    monkeypatch.setenv(STAMP_ENV, repr(time.time() + 1))


def test_an_earlier_launch_is_moved_aside_whole(tmp_path, launched_now):
    sweep = tmp_path / "sweep"
    earlier_sweep(sweep)
    one_launch_per_folder(config(tmp_path))
    aside = sweep / "superseded_launch"
    assert sorted(p.name for p in aside.iterdir()) == sorted(
        ["0", "1", "knee_report.md", "sweep.csv", "multirun.yaml", "knee.png", "best_overrides.txt"]
    )
    assert job_dirs(sweep) == [] and (sweep / "notes.md").read_text() == "the user's own"
    earlier_sweep(sweep, jobs=(0,))  # and a third launch: beside the second's, nothing overwritten
    one_launch_per_folder(config(tmp_path))
    assert (sweep / "superseded_launch_2" / "0" / "metrics.json").is_file()
    assert (aside / "1" / "metrics.json").is_file()


def test_what_this_launch_wrote_is_not_moved(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    monkeypatch.setenv(STAMP_ENV, repr(time.time() - 60))  # launched a minute ago; its files are newer
    earlier_sweep(sweep)
    one_launch_per_folder(config(tmp_path))
    assert len(job_dirs(sweep)) == 2 and not list(sweep.glob("superseded_*"))


@pytest.mark.parametrize("state", ["missing", "empty", "reports_only"])
def test_a_resume_with_nothing_to_resume_is_refused(tmp_path, launched_now, state):
    sweep = tmp_path / "sweep"
    if state != "missing":
        sweep.mkdir()
    if state == "reports_only":
        (sweep / "knee_report.md").write_text("x")
    with pytest.raises(ConfigError, match=r"sweep.resume=true: .* holds no job folders of an earlier sweep"):
        one_launch_per_folder(config(tmp_path, resume=True))


def test_a_resume_keeps_the_earlier_launch(tmp_path, launched_now):
    sweep = tmp_path / "sweep"
    earlier_sweep(sweep)
    one_launch_per_folder(config(tmp_path, resume=True))
    assert len(job_dirs(sweep)) == 2 and not list(sweep.glob("superseded_*"))


def test_other_processes_wait_for_process_0s_move(tmp_path, launched_now, monkeypatch):
    sweep = tmp_path / "sweep"
    earlier_sweep(sweep)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")

    def process_0_moves():
        (sweep / "0").rename(tmp_path / "gone0")
        (sweep / "1").rename(tmp_path / "gone1")
        for p in sweep.iterdir():
            if p.is_file() and p.name != "notes.md":
                p.unlink()

    mover = threading.Timer(0.6, process_0_moves)
    start = time.monotonic()
    mover.start()
    one_launch_per_folder(config(tmp_path))
    assert 0.5 <= time.monotonic() - start < 5 and not list(sweep.glob("superseded_*"))  # process 1 moved nothing


def earlier_run(folder: Path) -> None:
    for sub in (".hydra", "model", "checkpoints/step_2", "fold_0", "tracking"):
        (folder / sub).mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("earlier")
    (folder / "model" / "model.safetensors").write_text("weights")
    for name in ("metrics.json", "run.log", "dev_predictions.csv", "loss.png", "data_quality.csv"):
        (folder / name).write_text("earlier")
    (folder / "my_notes.txt").write_text("the user's own")


def test_a_run_folder_used_again_moves_everything_the_earlier_run_wrote(tmp_path):
    run = tmp_path / "run"
    earlier_run(run)
    one_run_per_folder(config(tmp_path))
    aside = run / "superseded_run"
    assert (aside / "model" / "model.safetensors").read_text() == "weights"
    assert (aside / ".hydra" / "config.yaml").read_text() == "earlier"
    assert {p.name for p in run.iterdir()} == {"superseded_run", "my_notes.txt"}
    assert {p.name for p in aside.iterdir()} == {
        ".hydra",
        "model",
        "checkpoints",
        "fold_0",
        "tracking",
        "metrics.json",
        "run.log",
        "dev_predictions.csv",
        "loss.png",
        "data_quality.csv",
    }


@pytest.mark.parametrize("how", ["resume_from", "resume"])
def test_a_resumed_run_keeps_its_folder(tmp_path, how):
    run = tmp_path / "run"
    earlier_run(run)
    one_run_per_folder(config(tmp_path, **({"resume_from": "latest"} if how == "resume_from" else {"resume": True})))
    assert not list(run.glob("superseded_*")) and (run / "checkpoints" / "step_2").is_dir()


def test_a_single_run_resume_with_no_result_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"sweep.resume=true: .*run holds no earlier result"):
        one_run_per_folder(config(tmp_path, resume=True))


@pytest.mark.parametrize("key", ["model_path", "reuse_from"])
def test_a_run_folder_that_holds_what_the_run_reads_is_refused(tmp_path, key):
    run = tmp_path / "run"
    earlier_run(run)
    with pytest.raises(ConfigError, match=r"holds what this run reads"):
        one_run_per_folder(config(tmp_path, **{key: str(run / "model" if key == "model_path" else run)}))
    assert (run / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_sweep_folder_used_twice_reports_the_second_launch_only(tmp_path):
    sweep = tmp_path / "sweep"
    cli("-m", "batch.batch_size=2,4", *QUICK, f"hydra.sweep.dir={sweep}", timeout=600, code=0)
    first = (sweep / "knee_report.md").read_text()
    proc = cli("-m", "batch.batch_size=8", *QUICK, f"hydra.sweep.dir={sweep}", timeout=600, code=0)
    assert "held an earlier launch (2 job folders" in proc.stderr
    report = (sweep / "knee_report.md").read_text()
    assert "Jobs: 1 (1 ok)" in report and "| 8 | 8 | 1 |" in report and "| 2 | 2 |" not in report
    assert (sweep / "superseded_launch" / "knee_report.md").read_text() == first
    assert json.loads((sweep / "superseded_launch" / "1" / "metrics.json").read_text())["batch_size"] == 4
    proc = cli(
        "-m", "batch.batch_size=2", *QUICK, "sweep.resume=true", f"hydra.sweep.dir={tmp_path / 'never'}", timeout=600
    )
    assert assert_one_error_line(proc, "", 2) == (
        f"error: sweep.resume=true: {tmp_path / 'never'} holds no job folders of an earlier sweep to resume; set "
        f"hydra.sweep.dir to that sweep's folder (outputs/multirun/<date_time>), or leave sweep.resume out"
    )
    assert not (tmp_path / "never").exists() or not job_dirs(tmp_path / "never")


@pytest.mark.slow
def test_a_run_folder_used_twice_keeps_the_first_runs_weights_and_config(tmp_path):
    run = tmp_path / "run"
    cli(*QUICK[:3], "train.save_model=true", f"hydra.run.dir={run}", timeout=600, code=0)
    weights = {p.name: p.read_bytes() for p in (run / "model").iterdir() if p.is_file()}
    first_config = (run / ".hydra" / "config.yaml").read_text()
    proc = cli(*QUICK[:3], "train.save_model=true", "batch.batch_size=4", f"hydra.run.dir={run}", timeout=600, code=0)
    assert "held an earlier run" in proc.stderr
    aside = run / "superseded_run"
    assert {p.name: p.read_bytes() for p in (aside / "model").iterdir() if p.is_file()} == weights
    assert (
        (aside / ".hydra" / "config.yaml").read_text() == first_config != (run / ".hydra" / "config.yaml").read_text()
    )
    assert json.loads((run / "metrics.json").read_text())["batch_size"] == 4
    assert "batch_size=4" in (run / ".hydra" / "overrides.yaml").read_text()
