"""An Optuna study continued by a sweep must hold the same search, checked before any trial starts;
and no trial is left RUNNING when a sweep stops before telling the study (issue 21, item 10)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from summ.errors import ConfigError
from summ.sweeps.study import check_study, fail_unfinished_trials, name_objectives, search_space, watch_asked_trials

from .conftest import assert_one_error_line, cli, compose_cfg

ROOT = Path(__file__).resolve().parents[1]
NAME = "shared-study"


def preset(name, storage, *more):
    return compose_cfg(
        [f"preset={name}", f"hydra.sweeper.storage={storage}", f"hydra.sweeper.study_name={NAME}", *more],
        return_hydra_config=True,
    )


def one_trial(cfg) -> optuna.Study:
    """The study as the sweeper leaves it after one told trial of `cfg`'s search."""
    name_objectives(cfg)
    study = optuna.load_study(study_name=NAME, storage=cfg.hydra.sweeper.storage)
    trial = study.ask(search_space(cfg.hydra))
    study.tell(trial, [0.5] * len(study.directions))
    return study


def test_the_same_search_continues(tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    cfg = preset("optuna_step_time", storage)
    check_study(cfg)  # a new study
    one_trial(cfg)
    check_study(preset("optuna_step_time", storage, "hydra.sweeper.n_trials=3"))  # other settings, same search


def test_another_search_in_the_same_study_is_refused_naming_the_difference(tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    one_trial(preset("optuna_step_time", storage))
    with pytest.raises(ConfigError) as err:
        check_study(preset("optuna_pareto", storage))
    text = str(err.value)
    assert text.startswith(f"the Optuna study {NAME} in {storage} holds another search")
    assert "directions ['minimize'] in the study, ['minimize', 'maximize'] here" in text
    assert "batch.batch_size: choice(1,2,4,8,16,32) in the study, choice(2,4,8,16) here" in text
    assert (
        "train.learning_rate searched here only" in text
        and "model.gradient_checkpointing searched in the study only" in text
    )
    assert "hydra.sweeper.study_name=<new name>" in text


def _fewer_choices(cfg):
    cfg.hydra.sweeper.params["batch.batch_size"] = "choice(1,2,4)"


def _a_range(cfg):
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.hydra.sweeper.params["train.learning_rate"] = "interval(0.0001,0.01)"


@pytest.mark.parametrize(
    "change,says",
    [
        (_fewer_choices, "batch.batch_size: choice(1,2,4,8,16,32) in the study, choice(1,2,4) here"),
        (_a_range, "train.learning_rate searched here only"),
        ("hydra.sweeper.direction=maximize", "directions ['minimize'] in the study, ['maximize'] here"),
        (
            "objective=train_seconds_per_token",
            "objective ['train_seconds_per_sample'] in the study, ['train_seconds_per_token'] here",
        ),
    ],
)
def test_each_kind_of_difference_is_refused(tmp_path, change, says):
    storage = f"sqlite:///{tmp_path}/s.db"
    one_trial(preset("optuna_step_time", storage))
    cfg = preset("optuna_step_time", storage, *([change] if isinstance(change, str) else []))
    if callable(change):
        change(cfg)
    with pytest.raises(ConfigError, match="holds another search") as err:
        check_study(cfg)
    assert says in str(err.value)


def test_trials_asked_and_never_told_are_marked_failed(tmp_path):
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path}/s.db")
    original = optuna.study.Study.ask
    watch_asked_trials()
    try:
        told, left = study.ask(), study.ask()
        study.tell(told, 1.0)
    finally:
        assert fail_unfinished_trials() == [left.number]
    assert optuna.study.Study.ask is original  # recording stops
    states = [t.state for t in study.get_trials()]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
    assert fail_unfinished_trials() == []


SMALL = ["data.synthetic_train_size=600", "measure.steps=2", "measure.warmup_steps=1"]


@pytest.mark.slow
def test_two_presets_on_one_study_name_the_second_refused_before_a_trial(tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    shared = [f"hydra.sweeper.storage={storage}", f"hydra.sweeper.study_name={NAME}", "hydra.sweeper.n_trials=1"]
    cli("-m", "preset=optuna_step_time", *shared, *SMALL, f"hydra.sweep.dir={tmp_path / 'a'}", timeout=600, code=0)
    proc = cli(
        "-m",
        "preset=optuna_pareto",
        *shared,
        "train.total_samples=16",
        f"hydra.sweep.dir={tmp_path / 'b'}",
        timeout=600,
    )
    assert_one_error_line(proc, "holds another search", 2)
    study = optuna.load_study(study_name=NAME, storage=storage)
    assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.COMPLETE]
    assert study.metric_names == ["train_seconds_per_sample"]  # not renamed by the refused sweep


@pytest.mark.slow
def test_ctrl_c_in_an_optuna_sweep_leaves_no_trial_running(tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    sweep, log = tmp_path / "sweep", tmp_path / "out.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "run.py",
                "-m",
                "preset=optuna_step_time",
                f"hydra.sweeper.storage={storage}",
                f"hydra.sweeper.study_name={NAME}",
                "hydra.sweeper.n_trials=3",
                "measure.steps=400",
                "data.synthetic_train_size=600",
                f"hydra.sweep.dir={sweep}",
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        deadline = time.monotonic() + 240
        while not ((sweep / "0" / "run.log").exists() and "optimizer steps" in (sweep / "0" / "run.log").read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    study = optuna.load_study(study_name=NAME, storage=storage)
    assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.FAIL], log.read_text()[-3000:]


@pytest.mark.parametrize(
    "train,steps,says",
    [
        (
            {"epochs": 15, "max_steps": None, "total_samples": None},
            23_355,
            "train.epochs=15; 15 epochs of 12,457 samples",
        ),
        ({"epochs": 15, "max_steps": 500, "total_samples": None}, 500, "train.max_steps=500; 0.321 epochs"),
        ({"epochs": 15, "max_steps": None, "total_samples": 960}, 120, "train.total_samples=960"),
    ],
)
def test_the_best_command_says_what_it_will_run(tmp_path, train, steps, says):
    """best_overrides.txt: the schedule in steps and epochs and the time at the measured rate
    (issue 21, item 17: a command that trained 15 epochs, 1 h 39 min, without a word)."""
    import json

    from omegaconf import OmegaConf

    from summ.sweeps.best_command import what_it_runs

    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create({"train": train}), tmp_path / ".hydra" / "config.yaml")
    (tmp_path / "metrics.json").write_text(
        json.dumps(
            {
                "status": "ok",
                "batch_size": 4,
                "gradient_accumulation_steps": 2,
                "effective_batch_size": 8,
                "num_processes": 1,
                "train_set_size": 12_457,
                "train": {"samples_per_s": 44.1},
            }
        )
    )
    text = what_it_runs(tmp_path)
    assert text.startswith(f"it trains {steps:,} optimizer steps of 8 samples") and says in text
    seconds = steps * 8 / 44.1
    expected = (
        f"{seconds:.0f} s"
        if seconds < 90
        else f"{seconds / 60:.0f} min"
        if seconds < 5400
        else f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
    )
    assert f"about {expected} at the trial's 44.1 samples/s" in text


def test_no_plan_without_a_measured_rate(tmp_path):
    from omegaconf import OmegaConf

    from summ.sweeps.best_command import what_it_runs

    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create({"train": {"epochs": 1}}), tmp_path / ".hydra" / "config.yaml")
    (tmp_path / "metrics.json").write_text('{"status": "oom"}')
    assert what_it_runs(tmp_path) is None
