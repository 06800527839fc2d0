"""The real CLI in a subprocess, as a user runs it (the default run: tests/test_user_commands.py)."""
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
    if override.startswith("model="):  # Hydra cannot compose it: no run folder at all
        assert not tmp_path.exists() or not (tmp_path / "metrics.json").exists()
    else:  # refused before any compute; the run folder still says why
        m = json.loads((tmp_path / "metrics.json").read_text())
        assert m["status"] == "failed" and expect in m["error"] and m.get("train") is None
