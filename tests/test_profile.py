"""measure.profile: one warm-up step recorded with torch.profiler into the run folder, outside the
measured window, and named in the summary; a run with no warm-up step to spare is refused."""

from __future__ import annotations

import json

import pytest

from .conftest import assert_one_error_line, cli


@pytest.mark.slow
def test_the_last_warmup_step_is_recorded_as_a_chrome_trace(tmp_path):
    run = tmp_path / "run"
    proc = cli(f"hydra.run.dir={run}", "measure.profile=true", "measure.steps=3", "eval.enabled=false", code=0)
    m = json.loads((run / "metrics.json").read_text())
    assert m["profile"]["step"] == m["train"]["warmup_optimizer_steps"] == 3  # the last warm-up step
    assert m["train"]["optimizer_steps"] == 3  # the measured window is whole, and the recorded step not in it
    trace = json.loads((run / "profile" / "step3_process0.pt.trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"aten::addmm", "aten::_fused_adamw_"} <= names  # the forward's matmuls and the optimizer's step
    assert m["profile"]["memory_snapshot"] is None  # CUDA only
    assert "profile" in proc.stdout and "step3_process0.pt.trace.json" in proc.stdout


def test_a_trace_needs_a_warmup_step_after_the_first(tmp_path):
    proc = cli(f"hydra.run.dir={tmp_path / 'run'}", "measure.profile=true", "measure.warmup_steps=1", "measure.steps=2")
    assert_one_error_line(proc, "measure.warmup_steps=2 or more", 2)
