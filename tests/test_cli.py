"""The real CLI in a subprocess, as a user runs it (the default run: tests/test_user_commands.py)."""

from __future__ import annotations

import json
import time

import pytest

from .conftest import assert_one_error_line, cli


@pytest.mark.slow
def test_missing_weights_is_one_line_and_fast(tmp_path):
    start = time.monotonic()
    proc = cli("model=kobart", f"hydra.run.dir={tmp_path}")
    seconds = time.monotonic() - start
    assert_one_error_line(proc, "model.path", 2)
    assert seconds < 30
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"


@pytest.mark.slow
@pytest.mark.parametrize(
    "override,expect",
    [
        ("batch.batch_size=0", "batch.batch_size=0 is invalid"),
        ("model=nosuch", "nosuch"),
        ("sweep.reuse_from=/nonexistent/sweep", "sweep.reuse_from=/nonexistent/sweep is not a folder"),
    ],
)
def test_bad_config_fails_before_compute(tmp_path, override, expect):
    proc = cli(override, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-3000:]  # a user error (README, Exit codes)
    assert expect in proc.stderr and "Traceback" not in proc.stderr
    if override.startswith("model="):  # Hydra cannot compose it: no run folder at all
        assert not tmp_path.exists() or not (tmp_path / "metrics.json").exists()
    else:  # refused before any compute; the run folder still says why
        m = json.loads((tmp_path / "metrics.json").read_text())
        assert m["status"] == "failed" and expect in m["error"] and m.get("train") is None
