"""The benchmark scripts run (they are not timed tests: their figures live in BENCHMARKS.md)."""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import ROOT, cli

BENCH = ROOT / "benchmarks"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path only; on a GPU the script runs for minutes")
def test_gpu_knee_script_says_why_and_exits_zero_without_cuda():
    proc = cli(script=BENCH / "gpu_knee.py", cwd=BENCH)
    assert proc.returncode == 0
    assert "CUDA is not available" in proc.stdout


@pytest.mark.slow  # two minutes: started early, so the other worker is not left idle at the end
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path only")
def test_gpu_check_says_why_without_cuda_and_its_plumbing_runs_at_toy_size(tmp_path):
    proc = cli(script=BENCH / "gpu_check.py", cwd=BENCH)
    assert proc.returncode == 0 and "CUDA is not available" in proc.stdout
    smoke = cli("--cpu-smoke", script=BENCH / "gpu_check.py", cwd=BENCH, env={"OUT": str(tmp_path)}, timeout=600)
    assert smoke.returncode == 0, smoke.stderr[-2000:]
    figures = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "failed" not in smoke.stdout.split("=== done")[-1], smoke.stdout[-2000:]
    assert figures  # every section's figures, written as it goes


@pytest.mark.slow
@pytest.mark.parametrize(
    "script,ratio", [("bench_overhead.py", "ratio summ / bare"), ("bench_hf_trainer.py", "ratio summ / HF Trainer")]
)
def test_side_by_side_scripts_print_their_ratio(script, ratio):
    proc = cli(
        "--rounds", "1", "--steps", "2", "--set", "data.synthetic_train_size=300", script=BENCH / script, cwd=BENCH
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ratio in proc.stdout and "median samples/s" in proc.stdout and "data.synthetic_train_size=300" in proc.stdout


def test_trials_to_answer_benchmark_replays_the_recorded_table():
    proc = cli(script=BENCH / "bench_search.py", cwd=BENCH)
    assert proc.returncode == 0, proc.stderr[-2000:]  # exit 1 when the knee sweeper's answer is not as fast
    assert "knee sweeper / grid trials: 0.30" in proc.stdout
    assert "grid recommendation: micro-batch 8 x accumulation 1" in proc.stdout
