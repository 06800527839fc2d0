"""Past one process and past interruptions: `accelerate launch` with two CPU processes (DDP over
gloo), checkpoints, SIGINT / SIGTERM, and resume equivalence, all through the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT, assert_one_error_line, cli, free_port, launch_two_processes

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
STEPS = ["train.max_steps=40", "eval.enabled=false", "train.log_every_steps=1"]


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_history.jsonl").read_text().splitlines()]


def interrupt(run: Path, signum: int, *extra) -> subprocess.CompletedProcess:
    """Start a run, send `signum` once its first checkpoint exists (mid-training), wait for it."""
    proc = subprocess.Popen(
        [sys.executable, "run.py", f"hydra.run.dir={run}", "train.save_every_steps=5", *STEPS, *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "step_5").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_a_run_interrupted_by_sigint_and_resumed_ends_as_if_never_interrupted(tmp_path):
    cli(f"hydra.run.dir={tmp_path / 'straight'}", *STEPS, timeout=600, code=0)
    run = tmp_path / "interrupted"
    proc = interrupt(run, signal.SIGINT)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr[-2000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "interrupted" and "SIGINT" in m["error"]
    stopped_at = len(history(run))
    assert 5 <= stopped_at < 40 and Path(m["checkpoint"]).name == f"step_{stopped_at}"
    assert f"train.resume_from={m['checkpoint']}" in proc.stderr
    # the same command again, told to resume from this run folder's newest checkpoint
    cli(f"hydra.run.dir={run}", "train.save_every_steps=5", *STEPS, "train.resume_from=latest", timeout=600, code=0)
    resumed, straight = (
        json.loads((run / "metrics.json").read_text()),
        json.loads((tmp_path / "straight" / "metrics.json").read_text()),
    )
    assert resumed["status"] == "ok" and resumed["resumed_from"]["step"] == stopped_at
    assert resumed["train"]["total_optimizer_steps"] == straight["train"]["total_optimizer_steps"] == 40
    assert [h["step"] for h in history(run)] == list(range(1, 41))
    # same data order, schedule position, dropout draws and optimizer state: the same losses
    assert [h["lr"] for h in history(run)] == [h["lr"] for h in history(tmp_path / "straight")]
    assert [round(h["loss"], 5) for h in history(run)] == [round(h["loss"], 5) for h in history(tmp_path / "straight")]
    assert len(list((run / "checkpoints").glob("step_*"))) <= 2  # train.keep_checkpoints


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_records_interrupted(tmp_path):
    run = tmp_path / "run"
    proc = interrupt(run, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "interrupted" and Path(m["checkpoint"], "summ_state.json").is_file()
    assert not list((run / "checkpoints").glob(".step_*"))  # no half-written checkpoint left


@pytest.mark.slow
@pytest.mark.parametrize("value,expect", [("latest", "holds no checkpoint"), ("/nonexistent", "neither a checkpoint")])
def test_resume_from_nothing_is_one_line(tmp_path, value, expect):
    proc = cli(f"hydra.run.dir={tmp_path}", f"train.resume_from={value}", "eval.enabled=false", timeout=600)
    assert_one_error_line(proc, expect, 2)


@pytest.mark.slow
def test_accelerate_launch_with_two_cpu_processes(tmp_path):
    proc, run = launch_two_processes(
        tmp_path, "measure.steps=5", "eval.enabled=true", "inference=greedy", "inference.max_new_tokens=8"
    )
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "ok" and m["num_processes"] == 2 and m["effective_batch_size"] == 16
    t = m["train"]
    assert t["samples_per_s_per_process"] == pytest.approx(t["samples_per_s"] / 2)  # samples/s counts both
    assert t["samples"] == 5 * 16
    peaks = m["memory"]["peak_bytes_per_process"]
    assert len(peaks) == 2 and m["memory"]["peak_bytes"] == max(peaks)
    assert m["eval"]["n"] == 30 and len((run / "dev_predictions.csv").read_text().splitlines()) == 31
    assert proc.stdout.count("model / device") == 1  # one summary: process 0's
    assert not list(run.glob("error*.log"))


@pytest.mark.slow
def test_a_checkpoint_of_another_config_is_refused(tmp_path):
    cli(
        f"hydra.run.dir={tmp_path / 'a'}",
        "train.max_steps=8",
        "train.save_every_steps=4",
        "eval.enabled=false",
        timeout=600,
        code=0,
    )
    proc = cli(
        f"hydra.run.dir={tmp_path / 'b'}",
        "train.max_steps=8",
        "batch.batch_size=4",
        "eval.enabled=false",
        f"train.resume_from={tmp_path / 'a'}",
        timeout=600,
    )
    assert_one_error_line(proc, "another config", 2)
    # the same config (where and how often it saves aside) resumes
    cli(
        f"hydra.run.dir={tmp_path / 'c'}",
        "train.max_steps=8",
        "eval.enabled=false",
        f"train.resume_from={tmp_path / 'a'}",
        timeout=600,
        code=0,
    )
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["resumed_from"]["step"] == 4


@pytest.mark.slow
def test_a_failure_on_one_process_ends_the_cell_on_all_and_the_sweep_goes_on(tmp_path):
    """Two processes (DDP over gloo); process 1 alone fails (SUMM_FAILPOINTS, rank=1): out of memory
    in the memory probe, in a forward (an accumulating micro-step and the synchronising one) and in a
    backward; a plain error in the optimizer step and in a forward. Without the agreement, process 0
    waits for good in the next collective."""
    port = free_port()
    # one failpoint per cell of the grid micro-batch 1..4 x accumulation 1,2; the last cell trains
    plan = [
        "oom@probe:micro_batch=1:accumulation=1",
        "oom@forward:micro_batch=1:accumulation=2:step=3:micro_step=1",  # accumulating: no collective
        "oom@forward:micro_batch=2:accumulation=1:step=3",  # the micro-step that syncs
        "oom@backward:micro_batch=2:accumulation=2:step=3:micro_step=2",
        "oom@backward:micro_batch=3:accumulation=1:step=3",
        "error@optimizer:micro_batch=3:accumulation=2:step=3",
        "error@forward:micro_batch=4:accumulation=1:step=3",
    ]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(port),
            str(ROOT / "run.py"),
            "-m",
            "batch.batch_size=1,2,3,4",
            "batch.gradient_accumulation_steps=1,2",
            "measure.steps=3",
            "measure.warmup_steps=1",
            "eval.enabled=false",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**ENV, "SUMM_FAILPOINTS": ",".join(f"{fp}:rank=1" for fp in plan), "ACCELERATE_USE_CPU": "true"},
    )
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("a process waited for good after another failed")
    assert proc.returncode == 0, err[-3000:]  # a sweep with an ok cell
    (sweep,) = (tmp_path / "outputs" / "multirun").iterdir()
    cells = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in range(len(plan) + 1)]
    assert [(c["batch_size"], c["gradient_accumulation_steps"]) for c in cells] == [
        (1, 1),
        (1, 2),
        (2, 1),
        (2, 2),
        (3, 1),
        (3, 2),
        (4, 1),
        (4, 2),
    ]
    where = ["the memory probe"] + ["optimizer step 3"] * 6
    for cell, at, fp in zip(cells[:-1], where, plan):
        kind, point = fp.split(":")[0].split("@")
        said = "ran out of memory" if kind == "oom" else "failed"
        assert cell["status"] == ("oom" if kind == "oom" else "failed"), cell
        assert f"process 1 of 2 {said} in {at}" in cell["error"] and f"failpoint {kind}@{point}" in cell["error"], (
            fp,
            cell["error"],
        )
    assert cells[-1]["status"] == "ok" and cells[-1]["train"]["samples"] == 3 * 4 * 2 * 2  # the group still works
    assert "5 cell(s) did not fit" in (sweep / "knee_report.md").read_text()  # the report of both processes' cells


@pytest.mark.slow
def test_a_failure_the_other_process_cannot_hear_of_stops_the_launch_with_a_line_not_a_hang(tmp_path):
    """Process 1 fails saving the model (outside the step's agreement) while process 0 waits for it
    at the save's barrier: the launch ends in seconds, not at torch's 30-minute timeout, with one line
    that says how to go on, and the next cell never runs out of step."""
    port = free_port()
    started = time.monotonic()
    proc = cli(
        "--nproc_per_node",
        "2",
        "--master_port",
        port,
        ROOT / "run.py",
        "-m",
        "batch.batch_size=1,2",
        "measure.steps=2",
        "measure.warmup_steps=1",
        "eval.enabled=false",
        "train.save_model=true",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        module="torch.distributed.run",
        cwd=tmp_path,
        timeout=600,
        env={"SUMM_FAILPOINTS": "error@save:rank=1", "ACCELERATE_USE_CPU": "true"},
    )
    # failed (README, Exit codes): torch.distributed.run ends a launch whose process failed with 1
    assert proc.returncode == 1 and time.monotonic() - started < 240, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert any("process 1 of 2 failed in" in line and "sweep.resume=true" in line for line in lines), lines
    assert "injected error" in (tmp_path / "sweep" / "0" / "error.rank1.log").read_text()
    record = json.loads((tmp_path / "sweep" / "0" / "metrics.json").read_text())  # written by process 1
    assert record["status"] == "failed" and record["error"].startswith("process 1 of 2 failed in save: RuntimeError")
    assert not (tmp_path / "sweep" / "1" / "metrics.json").exists()  # no cell measured out of step
