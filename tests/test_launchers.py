"""Hydra launchers for parallel sweeps: local worker processes (hydra-joblib-launcher, the
parallel_joblib preset) and SLURM job arrays (hydra-submitit-launcher, the slurm preset)."""

from __future__ import annotations

import csv
import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from summ.app import register as register_configs

from .conftest import ROOT, cli

SMALL = ["data.synthetic_train_size=600", "measure.steps=2", "measure.warmup_steps=1"]


def compose_with_hydra(overrides):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf")):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("preset", ["parallel_joblib", "slurm"])
def test_launcher_presets_say_how_to_use_them(preset):
    lines = (ROOT / "multirun_presets" / f"{preset}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"
    assert lines[1].startswith(f"# python run.py -m preset={preset} ")  # alone ...
    assert f",{preset}]'" in lines[1]  # ... and after a sweep preset


def test_slurm_preset_composes_with_a_search_and_keeps_it():
    cfg = compose_with_hydra(
        [
            "preset=[optuna_step_time,slurm]",
            "hydra.launcher.partition=gpu",
            "hydra.sweep.dir=/scratch/sweep",
            "+hydra.launcher.additional_parameters.reservation=r1",
        ]
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 1, 1)
    assert launcher.submitit_folder == "/scratch/sweep/.submitit/%j"
    assert launcher.additional_parameters == {"reservation": "r1"}
    # the search itself is untouched: Optuna sweeper, its space and its objective
    assert "OptunaSweeper" in cfg.hydra.sweeper._target_ and "batch.batch_size" in cfg.hydra.sweeper.params
    assert cfg.objective == "train_seconds_per_sample"


def test_parallel_joblib_preset_composes_with_a_grid_and_keeps_it():
    cfg = compose_with_hydra(["preset=[knee_grid,parallel_joblib]", "hydra.launcher.n_jobs=3"])
    assert cfg.hydra.launcher._target_ == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert cfg.hydra.launcher.n_jobs == 3
    assert cfg.hydra.sweeper.params["batch.batch_size"] == "2,4,8,16,32" and cfg.data.name == "synthetic"


@pytest.mark.slow
def test_joblib_launcher_runs_a_knee_grid_two_jobs_at_a_time(tmp_path):
    sweep = tmp_path / "jl"
    proc = cli(
        "-m",
        "preset=[knee_grid,parallel_joblib]",
        "batch.batch_size=1,2",
        "batch.gradient_accumulation_steps=1,2",
        f"hydra.sweep.dir={sweep}",
        *SMALL,
        code=0,
    )
    # two jobs at a time, the 2 cores divided between them (OpenMP threads would otherwise spin against each other)
    from summ.config import threads_per_job

    assert threads_per_job(2) == max(1, len(os.sched_getaffinity(0)) // 2)
    assert (
        f"joblib.parallel_backend(loky,inner_max_num_threads={threads_per_job(2)},n_jobs=2)"
        in proc.stdout + proc.stderr
    )
    with open(sweep / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows), [
        (r["job"], r["status"], r["error"]) for r in rows
    ]
    assert any("recommended" in r["flags"].split(";") for r in rows)  # beside any other flag of that cell
    assert (sweep / "knee_report.md").is_file() and (sweep / "knee.png").is_file()
    # jobs 0 and 1 ran side by side: each started before the other had written its metrics
    start = {j: (sweep / str(j) / ".hydra" / "config.yaml").stat().st_mtime for j in (0, 1)}
    end = {j: (sweep / str(j) / "metrics.json").stat().st_mtime for j in (0, 1)}
    assert start[0] < end[1] and start[1] < end[0], (start, end)
