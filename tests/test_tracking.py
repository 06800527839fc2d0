"""Experiment tracking through Accelerate's trackers: what a run logs is read back from the
trackers' own stores (TensorBoard event files, an MLflow SQLite store, a wandb offline run)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
import yaml
from accelerate import Accelerator

from summ.config import TrackingConfig
from summ.training import tracking
from summ.training.cleanup import reset_accelerate

from .conftest import cli

CONFIG = {
    "batch": {"batch_size": 8, "effective_batch_size": None},
    "model": {
        "name": "tiny_bart",
        "lora": {"target_modules": ["q_proj", "v_proj"]},
        "prompt_template": "요약: {dialogue}" + "x" * 7000,
    },
    "train": {"learning_rate": 2e-3, "cpu": True},
}
METRICS = {
    "status": "ok",
    "error": None,
    "model": "tiny_bart",
    "batch_size": 8,
    "lora": False,
    "train": {"samples_per_s": 4.75, "tokens_per_s": 798.8, "final_loss": 7.8},
    "memory": {"peak_bytes": 275099648, "fraction": 0.011, "source": "cpu_peak_rss_above_baseline"},
    "eval": {"loss": 7.74, "rouge1": 0.25, "rouge2": 0.1, "rougeL": 0.2, "rouge_mean": 0.18, "tta": None},
    "epoch_seconds_projected": 25.3,
    "mfu": None,
    "folds": [{"fold": 0}],
}


def steps(n: int) -> list[dict]:
    return [
        {
            "step": s,
            "loss": 10.0 / s,
            "lr": 1e-3 * s,
            "samples_per_s": 100.0 + s,
            "tokens_per_s": 1000.0 * s,
            "step_time_s": 0.5,
            "peak_mem_bytes": 2**20 * s,
        }
        for s in range(1, n + 1)
    ]


@pytest.fixture(autouse=True)
def clean_accelerate():
    reset_accelerate()
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    reset_accelerate()
    # mlflow.set_tracking_uri also sets this variable for the process: later runs would inherit it
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def run(tcfg: TrackingConfig, run_dir: Path, run_name="job", group=None, n_steps=5, metrics=METRICS):
    """One tracked run as summ/training/loop.py wires it: accelerator, start, a step per record, then finish
    after the job has closed (its status is known only then)."""
    reset_accelerate()
    acc = Accelerator(cpu=True, **tracking.accelerator_kwargs(tcfg, run_dir))
    t = tracking.start(acc, tcfg, CONFIG, run_name, group)
    for record in steps(n_steps):
        t.log_step(record, record["step"])
    acc.free_memory()  # Job.close()
    reset_accelerate()
    t.finish(metrics)
    return t


# ----------------------------------------------------------------------------- pure helpers


def test_hyperparameters_are_flat_scalars_within_the_limit():
    hp = tracking.hyperparameters(CONFIG, max_value_len=100)
    assert hp["batch.batch_size"] == 8 and hp["batch.effective_batch_size"] == "null"
    assert hp["model.lora.target_modules"] == '["q_proj", "v_proj"]'
    assert len(hp["model.prompt_template"]) == 100 and hp["model.prompt_template"].startswith("요약: {dialogue}")
    assert all(isinstance(v, (bool, int, float, str)) for v in hp.values())


def test_hyperparameters_of_the_composed_config(cfg_factory):
    from omegaconf import OmegaConf

    cfg = cfg_factory(["tracking=mlflow"])
    hp = tracking.hyperparameters(cfg)
    assert hp["tracking.name"] == "mlflow" and hp["train.scheduler"] == "linear"
    assert hp["train.mixed_precision"] == "no" and hp["data.source"] == "bundled"
    assert tracking.hyperparameters(OmegaConf.to_object(cfg)) == hp  # the typed Config object gives the same


def test_final_figures_keep_numbers_only():
    f = tracking.final_figures(METRICS)
    assert f["train/samples_per_s"] == 4.75 and f["memory/peak_bytes"] == 275099648
    assert {"eval/rouge1", "eval/rouge2", "eval/rougeL", "eval/rouge_mean", "epoch_seconds_projected"} <= set(f)
    assert not {"status", "error", "model", "lora", "mfu", "memory/source", "eval/tta", "folds"} & set(f)


def test_defaults_for_local_stores(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    t = TrackingConfig(name="mlflow")
    assert tracking.mlflow_tracking_uri(t) == "sqlite:///outputs/mlflow.db"
    assert tracking.wandb_mode(t) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert tracking.wandb_mode(t) == "online"
    assert tracking.wandb_mode(TrackingConfig(wandb_mode="disabled")) == "disabled"
    assert tracking.accelerator_kwargs(TrackingConfig(name="none"), Path("r")) == {}
    assert tracking.accelerator_kwargs(TrackingConfig(name="tensorboard"), Path("r")) == {
        "log_with": "tensorboard",
        "project_dir": str(Path("r") / "tracking"),
    }
    from hydra.errors import ConfigCompositionException

    from .conftest import compose_cfg

    with pytest.raises(ConfigCompositionException):  # a closed choice: refused at composition
        compose_cfg(["tracking.name=tensorbord"])


# ----------------------------------------------------------------------------- TensorBoard


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def test_tensorboard_logs_every_step_and_the_final_figures(tmp_path):
    t = run(TrackingConfig(name="tensorboard"), tmp_path / "run", run_name="job")
    assert not t.active  # finished
    logdir = tmp_path / "run" / "tracking" / "job"
    s = _scalars(logdir)
    assert s["step/loss"] == [(i, pytest.approx(10.0 / i)) for i in range(1, 6)]
    assert s["step/samples_per_s"] == [(i, pytest.approx(100.0 + i)) for i in range(1, 6)]
    assert [v for _, v in s["step/tokens_per_s"]] == pytest.approx([1000.0 * i for i in range(1, 6)])
    assert {"step/lr", "step/peak_mem_bytes", "step/step_time_s"} <= set(s)
    assert s["train/samples_per_s"] == [(5, pytest.approx(4.75))]
    assert s["memory/peak_bytes"] == [(5, pytest.approx(275099648))]
    assert s["eval/rouge1"] == [(5, pytest.approx(0.25))] and "eval/rouge_mean" in s
    (hparams,) = logdir.glob("*/hparams.yml")
    hp = yaml.safe_load(hparams.read_text(encoding="utf-8"))
    assert hp["batch.batch_size"] == 8 and hp["model.lora.target_modules"] == '["q_proj", "v_proj"]'


def test_log_every_steps_keeps_the_first_and_last_step(tmp_path):
    run(TrackingConfig(name="tensorboard", log_every_steps=3), tmp_path / "run", run_name="job", n_steps=7)
    s = _scalars(tmp_path / "run" / "tracking" / "job")
    assert [step for step, _ in s["step/loss"]] == [1, 3, 6, 7]
    assert s["train/samples_per_s"] == [(7, pytest.approx(4.75))]


def test_a_shared_tensorboard_dir_groups_a_sweep(tmp_path):
    shared = tmp_path / "tb"
    for job in ("0", "1"):
        run(TrackingConfig(name="tensorboard", dir=str(shared)), tmp_path / "sweep" / job, run_name=job, group="sweep")
    assert {p.name for p in (shared / "sweep").iterdir()} == {"0", "1"}
    assert len(_scalars(shared / "sweep" / "1")["step/loss"]) == 5


def test_a_tracker_that_cannot_start_warns_once_and_the_run_goes_on(tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="summ.training.tracking"):
        t = run(TrackingConfig(name="tensorboard", dir=str(blocker / "tb")), tmp_path / "run")
    assert not t.active
    lines = [r.getMessage() for r in caplog.records if r.name == "summ.training.tracking"]
    assert len(lines) == 1 and "tracking (tensorboard) failed while starting" in lines[0]


# ----------------------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """One SQLite store for the module: creating its tables takes seconds."""
    return "sqlite:///" + str(tmp_path_factory.mktemp("mlflow") / "mlflow.db")


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_mlflow_params_metrics_and_status(tmp_path, mlflow_uri):
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    run(
        TrackingConfig(name="mlflow", project="single", mlflow_tracking_uri=mlflow_uri),
        tmp_path / "run",
        run_name="solo",
        group=None,
    )
    c = _client(mlflow_uri)
    (r,) = c.search_runs([c.get_experiment_by_name("single").experiment_id])
    assert r.info.run_name == "solo" and r.info.status == "FINISHED"
    assert r.data.params["batch.batch_size"] == "8" and r.data.params["batch.effective_batch_size"] == "null"
    assert len(r.data.params["model.prompt_template"]) == MAX_PARAM_VAL_LENGTH  # cut, not dropped
    assert r.data.tags["status"] == "ok"
    assert r.data.metrics["train/samples_per_s"] == pytest.approx(4.75)
    assert r.data.metrics["memory/peak_bytes"] == pytest.approx(275099648)
    assert r.data.metrics["eval/rougeL"] == pytest.approx(0.2)
    loss = c.get_metric_history(r.info.run_id, "step/loss")
    assert [(m.step, m.value) for m in loss] == [(i, pytest.approx(10.0 / i)) for i in range(1, 6)]
    assert len(c.get_metric_history(r.info.run_id, "step/samples_per_s")) == 5


def test_mlflow_runs_of_a_sweep_share_one_experiment(tmp_path, mlflow_uri):
    tcfg = TrackingConfig(name="mlflow", mlflow_tracking_uri=mlflow_uri)
    for job in ("0", "1"):
        run(tcfg, tmp_path / "sweep" / job, run_name=f"batch.batch_size={job}", group="2026-01-01_00-00-00", n_steps=2)
    c = _client(mlflow_uri)
    runs = c.search_runs([c.get_experiment_by_name("2026-01-01_00-00-00").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["batch.batch_size=0", "batch.batch_size=1"]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_an_mlflow_failure_mid_run_warns_once_and_ends_the_run(tmp_path, mlflow_uri, caplog):
    bad = {**METRICS, "eval": {"rouge1": 0.3, "bad key!": 1.0}}  # MLflow refuses the key
    with caplog.at_level(logging.WARNING, logger="summ.training.tracking"):
        t = run(
            TrackingConfig(name="mlflow", project="failing", mlflow_tracking_uri=mlflow_uri),
            tmp_path / "run",
            run_name="broken",
            metrics=bad,
        )
        t.log_step(steps(1)[0], 9)  # inactive now: a no-op
        t.finish(METRICS)
    lines = [r.getMessage() for r in caplog.records if r.name == "summ.training.tracking"]
    assert len(lines) == 1 and "failed while logging the final metrics" in lines[0]
    c = _client(mlflow_uri)
    (r,) = c.search_runs([c.get_experiment_by_name("failing").experiment_id])
    assert r.info.status == "FINISHED" and len(c.get_metric_history(r.info.run_id, "step/loss")) == 5
    # the next run in this process starts clean
    run(
        TrackingConfig(name="mlflow", project="failing", mlflow_tracking_uri=mlflow_uri),
        tmp_path / "next",
        run_name="next",
        n_steps=1,
    )
    assert len(c.search_runs([c.get_experiment_by_name("failing").experiment_id])) == 2


@pytest.mark.parametrize("uri", ["nosuchscheme://nowhere", "sqlite:////proc/summ-denied/mlflow.db"])
def test_an_mlflow_store_that_cannot_be_used_warns_and_the_calls_do_not_raise(tmp_path, uri, caplog):
    with caplog.at_level(logging.WARNING, logger="summ.training.tracking"):
        t = run(TrackingConfig(name="mlflow", mlflow_tracking_uri=uri), tmp_path / "run")
    assert not t.active
    lines = [r.getMessage() for r in caplog.records if r.name == "summ.training.tracking"]
    assert len(lines) == 1 and "tracking (mlflow) failed while starting" in lines[0]


def test_an_mlflow_server_that_does_not_answer_is_said_at_once_and_leaves_no_store_behind(
    tmp_path, monkeypatch, caplog
):
    """Port 9 refuses: one warning within seconds (the client's own retries took minutes), and no
    ./mlflow.db made by ending a run that never started."""
    import time

    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="summ.training.tracking"):
        t = run(TrackingConfig(name="mlflow", mlflow_tracking_uri="http://127.0.0.1:9"), tmp_path / "run")
    assert not t.active and time.monotonic() - started < 60
    lines = [r.getMessage() for r in caplog.records if r.name == "summ.training.tracking"]
    assert len(lines) == 1 and "does not answer" in lines[0] and "tracking.mlflow_tracking_uri" in lines[0]
    assert not (tmp_path / "mlflow.db").exists()


def test_a_missing_package_gives_one_warning_and_no_tracking(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    tcfg = TrackingConfig(name="mlflow", mlflow_tracking_uri="sqlite:///" + str(tmp_path / "never.db"))
    with caplog.at_level(logging.WARNING, logger="summ.training.tracking"):
        t = run(tcfg, tmp_path / "run")
    lines = [r.getMessage() for r in caplog.records if r.name == "summ.training.tracking"]
    assert len(lines) == 1 and "needs the mlflow package (pip install mlflow" in lines[0]
    assert not t.active and not (tmp_path / "never.db").exists()


# ----------------------------------------------------------------------------- Weights & Biases


def test_wandb_offline_run_named_and_grouped(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")  # optional extra: the missing-package path is tested above
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    tcfg = TrackingConfig(name="wandb", project="summ-test", dir=str(tmp_path / "wb"))
    reset_accelerate()
    acc = Accelerator(cpu=True, **tracking.accelerator_kwargs(tcfg, tmp_path / "run"))
    t = tracking.start(acc, tcfg, CONFIG, "job3", "sweep-x")
    r = acc.get_tracker("wandb", unwrap=True)
    assert (r.name, r.group, r.project, r.offline) == ("job3", "sweep-x", "summ-test", True)
    assert r.config["batch.batch_size"] == 8
    for record in steps(3):
        t.log_step(record, record["step"])
    t.finish(METRICS)
    assert wandb.run is None and list((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))


# ----------------------------------------------------------------------------- through the CLI


def no_mlflow_variables() -> dict:
    """What `cli(env=...)` takes for a run with the default tracker store, as a user has it."""
    return {k: None for k in os.environ if k.startswith("MLFLOW_")}


@pytest.mark.slow
def test_cli_tensorboard_run_logs_loss_and_samples_per_s_per_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli(
        "tracking=tensorboard",
        "hydra.run.dir=run",
        "train.max_steps=6",
        "eval.generate=false",
        cwd=tmp_path,
        env=no_mlflow_variables(),
        timeout=600,
        code=0,
    )
    (events,) = (tmp_path / "run" / "tracking").glob("*/events.out.tfevents.*")  # hparams sit in subfolders
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    for tag in ("step/loss", "step/samples_per_s", "step/tokens_per_s", "train/samples_per_s", "eval/loss"):
        assert tag in scalars, scalars
    assert [e.step for e in acc.Scalars("step/loss")] == list(range(1, 7))


@pytest.mark.slow
def test_cli_mlflow_default_store_single_run_and_a_grouped_sweep_then_compare(tmp_path):
    from mlflow.tracking import MlflowClient

    cli(
        "tracking=mlflow",
        "hydra.run.dir=single",
        "train.max_steps=4",
        "eval.generate=false",
        cwd=tmp_path,
        env=no_mlflow_variables(),
        timeout=600,
        code=0,
    )
    cli(
        "-m",
        "batch.batch_size=2,4",
        "tracking=mlflow",
        "hydra.sweep.dir=sweeps/s1",
        "measure.steps=2",
        cwd=tmp_path,
        env=no_mlflow_variables(),
        timeout=600,
        code=0,
    )
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/outputs/mlflow.db")  # the default local store
    (single,) = client.search_runs([client.get_experiment_by_name("summ").experiment_id])
    assert single.data.params["train.max_steps"] == "4" and single.data.tags["status"] == "ok"
    assert "eval/loss" in single.data.metrics and len(client.get_metric_history(single.info.run_id, "step/loss")) == 4
    grouped = client.search_runs([client.get_experiment_by_name("s1").experiment_id])  # the sweep folder's name
    assert sorted(r.data.params["batch.batch_size"] for r in grouped) == ["2", "4"]
    assert all(r.info.status == "FINISHED" and "train/samples_per_s" in r.data.metrics for r in grouped)
    out = cli(
        tmp_path / "sweeps" / "s1", "--sort", "batch_size", module="summ.reports.compare", timeout=120, code=0
    ).stdout
    lines = [line for line in out.splitlines() if line.startswith("|")]
    assert "samples_per_s" in lines[0] and len(lines) == 4  # header, rule, two jobs
    assert [line.split("|")[5].strip() for line in lines[2:]] == ["2", "4"]
