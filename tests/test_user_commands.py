"""The README's commands exactly as a user types them: from an empty working folder, with the
default output folders and the default Optuna storage, nothing passed that the README does not
pass (no hydra.sweep.dir, no hydra.run.dir)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from .conftest import cli, compose_cfg

# Each command is typed in tmp_path, which holds no project files: run.py is this checkout's, every
# output lands under tmp_path/outputs as the defaults say.


def only_child(folder: Path) -> Path:
    children = sorted(folder.iterdir())
    assert len(children) == 1, children
    return children[0]


@pytest.mark.slow
def test_readme_knee_grid_and_report_from_an_empty_folder(tmp_path):
    proc = cli("-m", "preset=knee_grid", cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = only_child(tmp_path / "outputs" / "multirun")  # one folder for the whole multirun
    for name in ("sweep.csv", "knee_report.md", "knee.png"):
        assert (sweep / name).is_file(), name
    rows = list(csv.DictReader((sweep / "sweep.csv").open()))
    assert len(rows) == 10 and sum(r["status"] == "ok" for r in rows) == 10
    assert "knee report:" in proc.stdout and sum("recommended" in r["flags"] for r in rows) == 1
    # every cell measured the same samples and tokens; on a CPU nothing is memory pressure
    assert len({(r["samples"], r["tokens"]) for r in rows}) == 1
    assert not any("memory pressure" in r["flags"] for r in rows)

    again = cli(
        sweep, module="summ.reports.knee_report", cwd=tmp_path, timeout=900
    )  # summ-report outputs/multirun/<time>
    assert again.returncode == 0, again.stderr[-2000:]
    assert "## Recommendation" in again.stdout
    bad = cli(sweep, "--tolerance", "-1", module="summ.reports.knee_report", cwd=tmp_path, timeout=900)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "not a fraction" in bad.stderr


def _trials(db: Path):
    import optuna

    (name,) = optuna.get_all_study_names(storage=f"sqlite:///{db}")
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}")


@pytest.mark.slow
def test_readme_optuna_search_twice_continues_the_study_and_measures_nothing_twice(tmp_path):
    for n_trials in (3, 2):  # the same command again, asking for fewer trials
        proc = cli("-m", "preset=optuna_step_time", f"hydra.sweeper.n_trials={n_trials}", cwd=tmp_path, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    sweeps = sorted((tmp_path / "outputs" / "multirun").iterdir())
    assert len(sweeps) == 2
    study = _trials(tmp_path / "outputs" / "optuna.db")
    assert study.metric_names == ["train_seconds_per_sample"]
    trials = study.trials
    assert len(trials) == 5 and all(t.state.name == "COMPLETE" for t in trials)
    measured = [t.user_attrs["config_hash"] for t in trials if t.user_attrs.get("reused_from") is None]
    assert len(measured) == len(set(measured))  # no configuration measured twice
    for t in trials:
        if t.user_attrs.get("reused_from") is not None:  # answered from the earlier trial, not measured
            source = trials[t.user_attrs["reused_from"]]
            assert t.value == source.value and t.user_attrs["config_hash"] == source.user_attrs["config_hash"]
    for sweep in sweeps:
        assert (sweep / "best_overrides.txt").is_file() and (sweep / "knee_report.md").is_file()
        jobs = [
            dict(o.split("=", 1) for o in OmegaConf.load(d / ".hydra" / "overrides.yaml") if "=" in o)
            for d in sweep.iterdir()
            if d.name.isdigit()
        ]
        varied = {
            k for k in ("model.gradient_checkpointing", "train.mixed_precision") if len({j.get(k) for j in jobs}) > 1
        }
        report = (sweep / "knee_report.md").read_text()
        assert all(f"{k}=" in report for k in varied)  # every setting that varies is shown with each cell
        assert "| failed |" not in report

    # the best command trains the cell the study measured: its data and every setting it varied
    best = study.best_trial
    command = (sweeps[-1] / "best_overrides.txt").read_text().splitlines()[-1]
    assert command.startswith("python run.py ") and "data=synthetic" in command
    overrides = command.split()[2:]
    composed = OmegaConf.to_container(compose_cfg(overrides), resolve=True, enum_to_str=True)
    measured_cfg = OmegaConf.to_container(
        OmegaConf.load(Path(best.user_attrs["job_dir"]) / ".hydra" / "config.yaml"), resolve=True, enum_to_str=True
    )
    for section in ("data", "model", "batch", "train", "inference", "eval"):
        assert composed[section] == measured_cfg[section], section
    for key, value in best.params.items():
        assert f"{key}={str(value).lower() if isinstance(value, bool) else value}" in overrides


@pytest.mark.slow
def test_readme_default_run_then_predict_from_an_empty_folder(tmp_path):
    proc = cli(cwd=tmp_path, timeout=900)  # python run.py
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_child(tmp_path / "outputs" / "runs")
    assert run.name.endswith("_train_tiny_bart_bs8x1")  # named after what ran
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "ok" and all(0.0 <= m["eval"][k] <= 1.0 for k in ("rouge1", "rouge2", "rougeL"))
    assert "samples/s" in proc.stdout and "ROUGE-1/2/L" in proc.stdout
    assert "randomly initialised test-size model" in proc.stdout  # why ROUGE is near zero
    # output to a pipe, not a terminal: progress lines instead of a bar; no third-party noise
    log = (run / "run.log").read_text()
    assert "step 10/225 | loss" in log and "ETA" in log
    for noise in (
        "Writing model shards",
        "Loading weights",
        "is_gradient_checkpointing",
        "Removed shared tensor",
        "it/s]",
        "publisher trust check",
    ):  # the last: bitsandbytes' `kernels`, on every run (issue 21)
        assert noise not in proc.stderr + proc.stdout, noise

    pred = cli("mode=predict", f"model.path=outputs/runs/{run.name}", cwd=tmp_path, timeout=900)
    assert pred.returncode == 0, pred.stderr[-3000:]
    (predicted,) = [d for d in (tmp_path / "outputs" / "runs").iterdir() if d != run]
    assert predicted.name.endswith("_predict_tiny_bart")
    assert (predicted / "submission.csv").read_text().startswith("fname,summary")
    assert "Loading weights" not in pred.stderr
