"""Shared fixtures: compose the real config from conf/ and shrink it for fast CPU tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded in tests
# The suite runs on two workers (pytest -n 2, README): one OpenMP thread each, inherited by the runs
# they start, so two workers on 2 cores share them instead of spinning against each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from summ import failpoints  # noqa: E402
from summ.app import register as register_configs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Small and quick, but the real code path: tiny model, bundled data, short schedule. glibc's own
# heap (measure.cpu_live_memory=false: about 1.6x faster on the CPU) where a test is not about
# memory figures; those tests, and every command-line test, run the default.
FAST = ["train.epochs=1", "eval.generate=false", "measure.warmup_steps=1", "measure.rss_interval_ms=5",
        "measure.cpu_live_memory=false"]


def compose_cfg(overrides=(), **kwargs):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF)):
        return compose(config_name="config", overrides=list(overrides), **kwargs)


@pytest.fixture
def cfg_factory():
    return compose_cfg


@pytest.fixture
def run_job(tmp_path):
    """Compose with overrides and run one job in a fresh folder; returns (metrics, folder)."""
    from summ.pipeline import run_job

    counter = {"n": 0}

    def _run(*overrides, fast=True, failpoint=None):
        """`failpoint`: SUMM_FAILPOINTS' text, armed for this run only (summ/failpoints.py)."""
        counter["n"] += 1
        out = tmp_path / f"job{counter['n']}"
        cfg = compose_cfg((FAST if fast else []) + list(overrides))
        failpoints.configure(failpoint or "")
        try:
            return run_job(cfg, out).to_dict(), out
        finally:
            failpoints.configure(None)

    return _run


def pytest_collection_modifyitems(config, items):
    """The longest tests first: the README's commands (2-3 minutes each), then the other end-to-end
    tests (marked slow). On two workers a long test that starts last leaves the other worker idle
    for its whole length."""
    def rank(item) -> int:
        if item.get_closest_marker("slow") is None:
            return 2
        return 0 if item.path.name == "test_user_commands.py" else 1

    items.sort(key=rank)  # stable: file order within each rank
