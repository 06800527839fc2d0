"""Shared fixtures: compose the real config from conf/ and shrink it for fast CPU tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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
# heap (measure.cpu_live_memory=false: faster on the CPU, README "What a run measures" says by how
# much) where a test is not about memory figures; those tests, and every command-line test, run the default.
FAST = [
    "train.epochs=1",
    "eval.generate=false",
    "measure.warmup_steps=1",
    "measure.rss_interval_ms=5",
    "measure.cpu_live_memory=false",
]


def cli(
    *args,
    module: str | None = None,
    script: Path | None = None,
    env: dict | None = None,
    cwd: Path = ROOT,
    timeout: float = 300,
    code: int | None = None,
) -> subprocess.CompletedProcess:
    """`python run.py ARGS` in its own process, as a user types it in `cwd` (run.py is this
    checkout's wherever cwd is); `module`: `python -m MODULE ARGS` instead, `script`: `python SCRIPT
    ARGS`. `env` adds to this process's environment (a None value removes the variable), which holds
    the suite's one OpenMP thread (above); nothing is downloaded. `code`: the exit code it must end with."""
    program = ["-m", module] if module else [str(script or ROOT / "run.py")]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, *program, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={k: v for k, v in environment.items() if v is not None},
    )
    if code is not None:
        assert proc.returncode == code, f"exit {proc.returncode}, not {code}\n{proc.stderr[-3000:]}"
    return proc


def free_port() -> int:
    """A TCP port no one listens on now, for a process group's rendezvous: two launches on the
    suite's two workers must not both take torch's default 29500 (the second fails, EADDRINUSE)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_processes(folder: Path, *overrides) -> tuple[subprocess.CompletedProcess, Path]:
    """`accelerate launch --cpu --num_processes 2 run.py OVERRIDES` in `folder`, as a user types it
    (the module the `accelerate` command runs: this interpreter's, found without PATH, as in a
    virtualenv that is not activated), on a free port (free_port), ending with exit 0. Returns
    (the process, the launch's one run folder under outputs/runs: one for the launch, not one per process)."""
    proc = cli(
        "launch",
        "--cpu",
        "--num_processes",
        "2",
        "--main_process_port",
        free_port(),
        ROOT / "run.py",
        *overrides,
        module="accelerate.commands.accelerate_cli",
        cwd=folder,
        timeout=600,
        code=0,
    )
    (run,) = (Path(folder) / "outputs" / "runs").iterdir()
    return proc, run


def assert_one_error_line(proc: subprocess.CompletedProcess, text: str, code: int) -> str:
    """`proc` ended with exit `code` and no traceback, and its stderr holds exactly one line that
    starts with "error:", which contains `text` ("" where any will do). Returns that line."""
    assert proc.returncode == code, f"exit {proc.returncode}, not {code}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert text in errors[0], errors[0]
    return errors[0]


def job_folder(root: Path, num: int, overrides: list[str], metrics: dict) -> Path:
    """A sweep's job folder written by hand, as a job leaves it: .hydra/overrides.yaml and metrics.json."""
    import json

    import yaml

    folder = Path(root) / str(num)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


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
    """Compose with overrides, validate (as a run's first reader does) and run one job in a fresh
    folder; returns (metrics, folder)."""
    from summ.pipeline import run_job
    from summ.validation import validate

    counter = {"n": 0}

    def _run(*overrides, fast=True, failpoint=None):
        """`failpoint`: SUMM_FAILPOINTS' text, armed for this run only (summ/failpoints.py)."""
        counter["n"] += 1
        out = tmp_path / f"job{counter['n']}"
        cfg = compose_cfg((FAST if fast else []) + list(overrides))
        validate(cfg)
        failpoints.configure(failpoint or "")
        try:
            return run_job(cfg, out).to_dict(), out
        finally:
            failpoints.configure(None)

    return _run


@pytest.fixture
def counted_parts(monkeypatch):
    """(trained model, its torch optimizer) of each run's memory-part count, as the runs that
    follow in this test build them (summ/measure/components.py: ComponentCount)."""
    from summ.measure import components
    from summ.training import instruments

    seen = []

    class Recorded(components.ComponentCount):
        def __init__(self, model, optimizer, device):
            super().__init__(model, optimizer, device)
            seen.append((model, components.inner_optimizer(optimizer)))

    monkeypatch.setattr(instruments, "ComponentCount", Recorded)
    return seen


def pytest_collection_modifyitems(config, items):
    """The longest tests first: the README's commands (2-3 minutes each), then the other end-to-end
    tests (marked slow). On two workers a long test that starts last leaves the other worker idle
    for its whole length."""

    def rank(item) -> int:
        if item.get_closest_marker("slow") is None:
            return 2
        return 0 if item.path.name == "test_user_commands.py" else 1

    items.sort(key=rank)  # stable: file order within each rank
