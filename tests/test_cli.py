"""The real CLI in a subprocess, as a user runs it."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=300):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    return proc, time.monotonic() - start


@pytest.mark.slow
def test_default_run_end_to_end(tmp_path):
    proc, _ = run_cli(f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["status"] == "ok"
    assert all(0.0 <= m["eval"][k] <= 1.0 for k in ("rouge1", "rouge2", "rougeL"))
    assert "samples/s" in proc.stdout and "ROUGE-1/2/L" in proc.stdout
    # (its time, about 30 s here, is measured by benchmarks/bench_startup.py, not asserted)


@pytest.mark.slow
def test_missing_weights_is_one_line_and_fast(tmp_path):
    proc, seconds = run_cli("model=kobart", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "model.path" in lines[0] and "Traceback" not in proc.stderr
    assert seconds < 30
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"


@pytest.mark.slow
@pytest.mark.parametrize("override,expect", [
    ("batch.batch_size=0", "batch.batch_size=0 is invalid"),
    ("model=nosuch", "nosuch"),
    ("sweep.reuse_from=/nonexistent/sweep", "sweep.reuse_from=/nonexistent/sweep is not a folder"),
])
def test_bad_config_fails_before_compute(tmp_path, override, expect):
    proc, _ = run_cli(override, f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert expect in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "metrics.json").exists()
