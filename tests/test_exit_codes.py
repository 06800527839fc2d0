"""README's exit-code table, row by row: each code is reached by the cases its row names, single
runs and sweeps alike (issue 21, item 14), and a sweep stopped with Ctrl-C says how to go on with
the command that works (item 12)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT, assert_one_error_line, cli

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
QUICK = [
    "measure.steps=1",
    "measure.warmup_steps=1",
    "eval.enabled=false",
    "train.save_model=false",
    "data.max_train_samples=40",
]


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


SOLAR = ["model=solar_api", "mode=predict", "solar.cache_dir=null", "data.max_eval_samples=2"]
# (README row, what the case is, arguments, extra environment)
CASES = [
    ("0", "a run that ends ok", QUICK, {}),
    (
        "0",
        "a sweep with one ok cell and one over budget",
        ["-m", "batch.batch_size=2,64", *QUICK, "measure.memory_budget_gb=0.3"],
        {},
    ),
    ("1", "a crash in the training step", QUICK, {"SUMM_FAILPOINTS": "error@forward"}),
    (
        "1",
        "a sweep whose every cell crashed",
        ["-m", "batch.batch_size=2,4", *QUICK],
        {"SUMM_FAILPOINTS": "error@forward"},
    ),
    (
        "1",
        "a service down (nothing answers at solar.base_url)",
        [*SOLAR, f"solar.base_url={_closed_port_url()}"],
        {"UPSTAGE_API_KEY": "up_test_key"},
    ),
    ("2", "a bad config value", ["batch.batch_size=0"], {}),
    ("2", "missing weights", ["model=kobart", *QUICK], {}),
    ("2", "a missing API key", SOLAR, {"UPSTAGE_API_KEY": ""}),
    (
        "2",
        "a sweep whose every cell has the same bad input",
        ["-m", "model=kobart", "batch.batch_size=2,4", *QUICK],
        {},
    ),
    ("2", "a folder that cannot take the files", QUICK, {}),  # hydra.run.dir under a file: set below
    ("3", "a run over its memory budget", [*QUICK, "measure.memory_budget_gb=0.001"], {}),
    (
        "3",
        "a sweep whose every cell is over budget",
        ["-m", "batch.batch_size=2,4", *QUICK, "measure.memory_budget_gb=0.001"],
        {},
    ),
]


def readme_rows() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text[text.index("| exit code | meaning |") :].split("\n\n")[0]
    return [m.group(1).strip() for m in re.finditer(r"^\|\s*([0-9][0-9 /]*)\|", table, re.M)]


def test_every_row_of_the_table_has_its_cases():
    rows = readme_rows()
    assert rows == ["0", "1", "2", "3", "130 / 143"], rows
    assert {c[0] for c in CASES} | {"130 / 143"} == set(rows)  # 130/143: the signal tests below


@pytest.mark.slow
@pytest.mark.parametrize("row,what,args,env", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_each_case_exits_with_its_rows_code(tmp_path, row, what, args, env):
    if what == "a folder that cannot take the files":
        (tmp_path / "a_file").write_text("")
        folder = [f"hydra.run.dir={tmp_path / 'a_file' / 'run'}"]
    else:
        folder = [f"hydra.{'sweep' if args[:1] == ['-m'] else 'run'}.dir={tmp_path / 'out'}"]
    proc = cli(*args, *folder, env=env)
    assert proc.returncode == int(row), f"{what}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    if row != "0":
        assert_one_error_line(proc, "", int(row))


def _start(args, log: Path):
    out = log.open("w")
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT
    ), out


def _wait_for(proc, check, what: str, log: Path, limit=240) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert proc.poll() is None, f"ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"never {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_in_a_run_exits_143_and_says_how_to_resume(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "out.log"
    proc, out = _start(
        [
            "data=synthetic",
            "data.synthetic_train_size=2000",
            "measure.steps=2000",
            "eval.enabled=false",
            f"hydra.run.dir={run_dir}",
        ],
        log,
    )
    with out:
        _wait_for(
            proc,
            lambda: (run_dir / "run.log").exists() and "optimizer steps" in (run_dir / "run.log").read_text(),
            "training started",
            log,
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
    text = log.read_text()
    assert "train.resume_from=" in text and "Traceback" not in text
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "interrupted"


@pytest.mark.slow
def test_ctrl_c_in_a_sweep_exits_130_and_its_advice_works(tmp_path):
    """The advice after Ctrl-C in a sweep is sweep.resume=true with the same folder (not
    train.resume_from, which would start every cell from one cell's checkpoint), and following it
    keeps the finished cells and measures the rest."""
    sweep, log = tmp_path / "sweep", tmp_path / "out.log"
    grid = [
        "-m",
        "batch.batch_size=2,4,8",
        "data=synthetic",
        "data.synthetic_train_size=600",
        "measure.steps=300",
        "measure.warmup_steps=1",
        f"hydra.sweep.dir={sweep}",
    ]
    proc, out = _start(grid, log)
    with out:
        _wait_for(
            proc,
            lambda: (
                (sweep / "0" / "metrics.json").exists()
                and (sweep / "1" / "run.log").exists()
                and "optimizer steps" in (sweep / "1" / "run.log").read_text()
            ),
            "job 1 trained",
            log,
        )
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    text = log.read_text()
    advice = [line for line in text.splitlines() if "sweep.resume=true" in line]
    assert advice and f"hydra.sweep.dir={sweep}" in advice[0] and "train.resume_from" not in text, text[-3000:]
    job0 = (sweep / "0" / "metrics.json").read_bytes()
    # what the advice used to be (the same command and train.resume_from) is refused before any cell starts
    for extra in (
        [f"train.resume_from={sweep / '1' / 'checkpoints'}"],
        ["train.resume_from=latest"],
        ["sweep.resume=true", f"train.resume_from={tmp_path / 'elsewhere'}"],
    ):
        refused = cli(*grid, *extra)
        assert refused.returncode == 2 and "in a sweep: it resumes one run" in refused.stderr, refused.stderr[-2000:]
    assert (sweep / "0" / "metrics.json").read_bytes() == job0 and not list(sweep.glob("superseded_*"))
    # the advice, followed: job 0 kept as it was, the others measured
    resumed = cli(*grid, "sweep.resume=true", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (sweep / "0" / "metrics.json").read_bytes() == job0
    statuses = [json.loads((sweep / str(j) / "metrics.json").read_text())["status"] for j in range(3)]
    assert statuses == ["ok", "ok", "ok"]
    assert "Jobs: 3 (3 ok)" in (sweep / "knee_report.md").read_text()
