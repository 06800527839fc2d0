"""What a new user met and should not: failures that exited 0, wrong results reported as fine,
tracebacks and lost work. Each case ends in one line, a documented non-zero exit code (summ/errors.py)
and nothing already computed is lost."""

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
import torch
from omegaconf import OmegaConf

from summ.config import run_name
from summ.data.samples import Sample, bundled_sample_dir
from summ.data.splits import load_splits
from summ.data.tokenize import Encoder
from summ.errors import ConfigError, DataError, WeightsNotFound
from summ.modeling import models
from summ.validation import validate

from .conftest import CONF, ROOT, assert_one_error_line, cli, compose_cfg

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
QUICK = ["measure.steps=2", "measure.warmup_steps=1", "eval.enabled=false", "data.max_train_samples=40"]


# --------------------------------------------------------------------------- no silent acceptance


@pytest.mark.parametrize(
    "override,says",
    [
        ("+batch.batchsize=16", "batch.batchsize is not a setting"),
        ("+model.lora.rank=4", "model.lora.rank is not a setting"),
        ("+learning_rate=1e-4", "learning_rate is not a setting"),
        ("knee.tolerance=2", "knee.tolerance=2.0 is a fraction"),
        ("knee.tolerance=-0.1", "knee.tolerance=-0.1 is invalid"),
        ("data.encoder_max_len=1", "data.encoder_max_len=1 is too short"),
        ("data.decoder_max_len=0", "data.decoder_max_len=0"),
        ("data.encoder_max_len=2000", "do not fit the model's 1024 positions"),
        # NaN passed every "> 0" check and failed in the optimizer; inf trained to `diverged` (exit 3)
        ("train.learning_rate=nan", "train.learning_rate=nan is not a number a run can use"),
        ("train.learning_rate=inf", "train.learning_rate=inf is not a number"),
        ("train.max_grad_norm=inf", "train.max_grad_norm=inf is not a number"),
        ("measure.memory_budget_gb=nan", "measure.memory_budget_gb=nan is not a number"),
        ("measure.headroom=nan", "measure.headroom=nan is not a number"),
        ("inference.temperature=-inf", "inference.temperature=-inf is not a number"),
        ("sweep.trial_collective_timeout_s=inf", "sweep.trial_collective_timeout_s=inf is not a number"),
        ("solar.backoff_s=nan", "solar.backoff_s=nan is not a number"),
    ],
)
def test_values_outside_their_range_and_unknown_keys_are_refused(override, says):
    with pytest.raises(ConfigError, match=says.replace(".", "[.]").replace("(", "[(]")):
        validate(compose_cfg([override]))


def test_truncation_holds_even_where_the_tokenizer_would_not_truncate():
    tok = models.tiny_tokenizer()
    enc = Encoder(tok, compose_cfg([]).model.kind, "{dialogue}", encoder_max_len=2, decoder_max_len=2)
    feats = enc.encode(Sample("f", "#Person1#: 안녕하세요 오늘 날씨가 좋네요", ["요약 문장입니다"]))
    assert len(feats.input_ids) == 2 and len(feats.labels) == 2
    assert feats.input_ids[-1] == tok.eos_token_id


def test_run_folders_are_named_after_what_ran(tmp_path):
    assert run_name("train", "tiny_bart", "seq2seq", 32, 2) == "train_tiny_bart_bs32x2"
    assert run_name("train", "tiny_bart", "seq2seq", 8, 1, 32) == "train_tiny_bart_bs8x4"  # effective batch given
    assert run_name("train", "tiny_bart", "seq2seq", 8, 1, None, 5) == "train_tiny_bart_bs8x1_k5"
    assert run_name("predict", "tiny_bart", "seq2seq", 8, 1) == "predict_tiny_bart"
    llama_run = tmp_path / "run" / "model"
    llama_run.mkdir(parents=True)
    (llama_run / "summ_config.yaml").write_text("model:\n  name: tiny_llama\n")
    # the model the run trained, not the default group the command line left alone
    assert run_name("predict", "tiny_bart", "seq2seq", 8, 1, None, 1, str(tmp_path / "run")) == "predict_tiny_llama"
    assert run_name("train", "solar_api", "ModelKind.api", 8, 1) == "eval_solar_api"
    cfg = compose_cfg(["batch.batch_size=32", "batch.gradient_accumulation_steps=2"], return_hydra_config=True)
    assert cfg.hydra.run.dir.endswith("_train_tiny_bart_bs32x2")


def test_a_tiny_model_given_model_path_starts_from_those_weights(tmp_path):
    model_cfg = OmegaConf.to_object(compose_cfg([]).model)
    tok = models.tiny_tokenizer()
    saved = models.tiny_model(model_cfg, tok, seed=7)
    saved.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    given = OmegaConf.to_object(compose_cfg([f"model.path={tmp_path}"]).model)
    loaded = models.load(given, models.load_tokenizer(given), seed=0, device=torch.device("cpu")).model
    name = "model.encoder.layers.0.fc1.weight"
    assert torch.equal(loaded.state_dict()[name], saved.state_dict()[name])  # not a random init from seed 0


def test_data_mistakes_get_the_right_advice(tmp_path):
    as_file = tmp_path / "train.csv"
    as_file.write_text("fname,dialogue,summary\n")
    with pytest.raises(DataError, match="is a file, not a folder"):
        load_splits(OmegaConf.to_object(compose_cfg(["data=dialogsum_ko", f"data.dir={as_file}"]).data))
    long_dialogue = "#Person1#: " + "가" * 1_000_000
    folder = tmp_path / "long"
    folder.mkdir()
    with (folder / "train.csv").open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["fname", "dialogue", "summary"], ["t1", long_dialogue, "요약"]])
    shutil.copy(folder / "train.csv", folder / "dev.csv")
    splits = load_splits(OmegaConf.to_object(compose_cfg(["data=dialogsum_ko", f"data.dir={folder}"]).data))
    assert len(splits.train[0].dialogue) == len(long_dialogue)  # a 1 MB field is read, not called "not UTF-8"
    (folder / "train.csv").unlink()  # predict needs no training set
    assert (
        load_splits(
            OmegaConf.to_object(compose_cfg(["data=dialogsum_ko", f"data.dir={folder}"]).data), need_train=False
        ).train
        == []
    )


def test_a_corrupt_config_json_is_one_line_for_train_and_predict(tmp_path):
    (tmp_path / "config.json").write_text("{ not json")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(WeightsNotFound, match=r"config\.json is unreadable"):
        models.load_tokenizer(OmegaConf.to_object(compose_cfg(["model=kobart", f"model.path={tmp_path}"]).model))
    from summ.modeling.saved import locate

    with pytest.raises(WeightsNotFound, match=r"config\.json is unreadable"):
        locate(OmegaConf.to_object(compose_cfg(["mode=predict", f"model.path={tmp_path}"])))


def test_help_names_every_group_option_and_no_internal_group():
    proc = cli("--help", timeout=60)
    assert proc.returncode == 0
    text = proc.stdout
    assert "model_base" not in text and len(text.splitlines()) < 60
    for group in ("data", "model", "batch", "inference", "augmentation", "tta", "tracking", "preset"):
        for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
            assert option in text, f"{group}={option} missing from --help"
    assert "python run.py -m preset=knee_grid" in text and "Exit codes" in text


# --------------------------------------------------------------------------- exit codes a scheduler can trust


@pytest.mark.slow
def test_failures_exit_non_zero_with_one_line(tmp_path):
    bad = tmp_path / "bad_model"
    bad.mkdir()
    (bad / "config.json").write_text("{ not json")
    proc = cli("model=kobart", f"model.path={bad}", f"hydra.run.dir={tmp_path / 'a'}")
    assert_one_error_line(proc, "config.json is unreadable", 2)
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["status"] == "failed"

    proc = cli("batch.batch_size=0", f"hydra.run.dir={tmp_path / 'b'}")  # refused by validation: still says why
    assert_one_error_line(proc, "batch.batch_size=0", 2)
    refused = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert refused["status"] == "failed" and "batch.batch_size=0" in refused["error"]

    # predict with no test set: refused, not an empty submission
    folder = tmp_path / "no_test"
    folder.mkdir()
    for name in ("train.csv", "dev.csv"):
        shutil.copy(bundled_sample_dir() / name, folder / name)
    proc = cli(
        "mode=predict",
        f"model.path={bad}",
        "data=dialogsum_ko",
        f"data.dir={folder}",
        f"hydra.run.dir={tmp_path / 'c'}",
    )
    assert_one_error_line(proc, "test.csv is missing or empty", 2)
    assert not (tmp_path / "c" / "submission.csv").exists()

    # a sweep in which every job was refused for the same input exits 2, after writing its report
    proc = cli("-m", "model=kobart", "batch.batch_size=2,4", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    line = assert_one_error_line(proc, "every job of the sweep was refused", 2)
    assert line.startswith("error: every job of the sweep was refused: model=kobart: weights")
    assert (tmp_path / "sweep" / "knee_report.md").is_file()

    proc = cli("-m", "preset=optuna_step_time", "hydra.sweeper.n_trials=-1", f"hydra.sweep.dir={tmp_path / 'o'}")
    assert_one_error_line(proc, "hydra.sweeper.n_trials=-1 is invalid", 2)


@pytest.mark.parametrize(
    "args,says",
    [
        (["model=3"], "Config group override must be a string"),  # a group given a number: Hydra's ValueError
        (["-m", "batch.batch_size=2,abc", *QUICK], "batch.batch_size=abc"),  # not "no job ended ok"
        (["-m", "preset=optuna_step_time", "hydra.sweeper.storage=notadb://x"], "is not a database Optuna can keep"),
        (
            ["-m", "preset=optuna_step_time", "hydra.sweeper.storage=postgresql://u:secret@127.0.0.1:9/db"],
            "cannot open the Optuna storage hydra.sweeper.storage=postgresql://u:***@127.0.0.1:9/db",
        ),
    ],
    ids=["group_given_a_number", "bad_value_in_a_sweep_list", "storage_not_a_database", "storage_unreachable"],
)
def test_what_hydra_or_optuna_refuse_before_any_job_is_one_line_and_exit_2(tmp_path, args, says):
    proc = cli(*args, cwd=tmp_path)
    assert_one_error_line(proc, says, 2)
    assert "secret" not in proc.stderr


@pytest.mark.slow
def test_an_over_budget_run_exits_3(tmp_path):
    proc = cli(*QUICK, "measure.memory_budget_gb=0.001", f"hydra.run.dir={tmp_path}")
    assert_one_error_line(proc, "over_budget", 3)
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "over_budget"


# --------------------------------------------------------------------------- nothing lost


@pytest.mark.slow
def test_resume_under_a_changed_config_keeps_the_earlier_figures(tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli("-m", "batch.batch_size=2", *QUICK, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = json.loads((sweep / "0" / "metrics.json").read_text())
    proc = cli(
        "-m", "batch.batch_size=2", *QUICK, "train.learning_rate=1e-3", "sweep.resume=true", f"hydra.sweep.dir={sweep}"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (kept,) = sweep.joinpath("0").glob("superseded_*/metrics.json")
    assert json.loads(kept.read_text()) == first  # moved aside, not overwritten
    assert json.loads((sweep / "0" / "metrics.json").read_text())["config_hash"] != first["config_hash"]
    assert "moved to" in proc.stdout + proc.stderr + (sweep / "0" / "run.log").read_text()


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
        ).returncode
        == 0
    )


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a filesystem of the given size (a tmpfs; needs root, as CI has)."""
    mounted = []

    def make(size: str) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        if not _mount_tmpfs(where, size):
            pytest.skip("cannot mount a tmpfs here (not root)")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", str(where)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_no_partial_model(small_disk):
    disk = small_disk("1m")  # room for the run's small files, not for the 2 MB of weights
    proc = cli("train.epochs=1", "eval.enabled=false", f"hydra.run.dir={disk}/run")
    assert_one_error_line(proc, "No space left on device", 2)
    run = disk / "run"
    assert not (run / "model").exists() and not list(run.glob(".model*"))  # a complete model folder or none
    assert json.loads((run / "metrics.json").read_text())["status"] == "failed"

    tiny = small_disk("4k")  # not even Hydra's own .hydra/config.yaml fits
    proc = cli("-m", "batch.batch_size=2,4", *QUICK, f"hydra.sweep.dir={tiny}/sweep")
    assert_one_error_line(proc, "No space left on device", 2)


@pytest.mark.slow
def test_ctrl_c_twice_and_a_closed_pipe_end_cleanly(tmp_path):
    """SIGINT, then SIGINT again while the checkpoint is written (a second Ctrl-C used to break
    torch.save), with stdout and stderr going to a pipe whose reader is gone (| tee, killed by the
    same Ctrl-C): exit 130, no traceback, and any checkpoint left is complete."""
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "run.py"),
            "data=synthetic",
            "data.max_train_samples=4000",
            "measure.steps=400",
            "eval.enabled=false",
            "train.save_every_steps=1000",
            f"hydra.run.dir={run}",
        ],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 240
    while not (run / "train_history.jsonl").exists() and not (run / "run.log").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    while "optimizer steps" not in (run / "run.log").read_text():  # training has started
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1.0)
    proc.stdout.close()  # the reader is gone
    proc.send_signal(signal.SIGINT)
    time.sleep(0.15)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    log = (run / "run.log").read_text()
    assert "Traceback" not in log
    folder = run / "checkpoints"
    assert not list(folder.glob(".step_*.tmp")) if folder.exists() else True
    for ckpt in folder.glob("step_*") if folder.exists() else []:
        assert (ckpt / "summ_state.json").is_file()
    assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"


@pytest.mark.slow
def test_solar_failures_exit_non_zero(tmp_path):
    from .test_solar import KEY, FakeSolar

    server = FakeSolar()
    server.script = [(500, {}, {"error": {"message": "boom"}}, 0.0)] * 50
    try:
        proc = cli(
            "model=solar_api",
            f"solar.base_url={server.base_url}",
            "solar.max_retries=1",
            "solar.backoff_s=0.01",
            "data.max_eval_samples=2",
            "solar.cache_dir=null",
            f"hydra.run.dir={tmp_path / 'a'}",
            env={"UPSTAGE_API_KEY": KEY},
        )
    finally:
        server.close()
    assert_one_error_line(proc, "HTTP 500", 1)
    start = time.monotonic()
    proc = cli(
        "model=solar_api",
        "solar.base_url=http://127.0.0.1:9/v1",
        "data.max_eval_samples=2",
        "solar.cache_dir=null",
        f"hydra.run.dir={tmp_path / 'b'}",
        env={"UPSTAGE_API_KEY": KEY},
    )
    assert_one_error_line(proc, "solar.base_url", 1)  # a service down (README, Exit codes)
    assert time.monotonic() - start < 30  # no half minute of retries against a closed port
