"""A sweep's cell that fails leaves nothing behind for the next one (issue 20, item 2).

In one process with sweep.reuse_loaded on (as a sweep runs its cells), a cell that ends oom (in a
backward, a forward, the memory probe, the optimizer step), over_budget, diverged or failed must
not keep its model wrapper, optimizer, loader, accelerator or batch alive: on a GPU whatever it
kept is gigabytes the next cells start short of. The failures are injected with SUMM_FAILPOINTS'
own mechanism (summ/failpoints.py), in process."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from summ import failpoints
from summ.measure.memory import MemoryMonitor
from summ.training import loop, probe, reuse

from .conftest import compose_cfg

CELL = [
    "model=tiny_llama",
    "batch.batch_size=32",
    "measure.steps=2",
    "measure.warmup_steps=1",
    "eval.enabled=false",
    "train.save_model=false",
    "data.max_train_samples=160",
]

# (what ends the cell, overrides, the failpoint, the status it ends with)
FAILURES = [
    ("oom in a backward", [], "oom@backward:step=2", "oom"),
    ("oom in a forward", [], "oom@forward:step=2", "oom"),
    ("oom in the probe", [], "oom@probe", "oom"),
    ("oom in the optimizer step", [], "oom@optimizer:step=2", "oom"),
    ("over budget", ["measure.memory_budget_gb=0.001"], None, "over_budget"),
    ("diverged", ["train.learning_rate=1e30", "train.max_grad_norm=0", "train.warmup_ratio=0"], None, "diverged"),
    ("failed", [], "error@forward:step=2", "failed"),
]


@pytest.fixture
def watched(monkeypatch):
    """Weak references to what each cell held (taken as it closes) and each cell's memory baseline."""
    seen = {"refs": [], "baselines": []}

    close = loop.Job.close

    def closing(job):
        if job.accelerator is not None:
            seen["refs"].append(("accelerator", weakref.ref(job.accelerator)))
        if job.run is not None:
            for name in ("model", "optimizer", "train_loader"):
                seen["refs"].append((name, weakref.ref(getattr(job.run, name))))
            seen["refs"].append(("the optimizer's state", weakref.ref(job.run.optimizer.optimizer)))
        close(job)

    def inputs(original):
        def taken(batch):
            seen["refs"].append(("a batch tensor", weakref.ref(batch["input_ids"])))
            return original(batch)

        return taken

    start = MemoryMonitor.start

    def started(monitor):
        start(monitor)
        seen["baselines"].append(monitor.baseline)
        return monitor

    monkeypatch.setattr(loop.Job, "close", closing)
    monkeypatch.setattr(loop, "model_inputs", inputs(loop.model_inputs))
    monkeypatch.setattr(probe, "model_inputs", inputs(probe.model_inputs))
    monkeypatch.setattr(MemoryMonitor, "start", started)
    reuse.clear()
    yield seen
    failpoints.configure(None)
    reuse.clear()


def _cell(tmp_path, name: str, overrides=(), failpoint=None):
    from summ.pipeline import run_job

    failpoints.configure(failpoint or "")
    try:
        return run_job(compose_cfg(CELL + list(overrides)), tmp_path / name, reuse_loaded=True)
    finally:
        failpoints.configure("")


@pytest.mark.slow
def test_a_failed_cell_leaves_nothing_alive_for_the_next(tmp_path, watched):
    first = _cell(tmp_path, "first")
    assert first.status == "ok", first.error
    watched["refs"].clear()
    frozen = gc.get_freeze_count()
    for what, overrides, failpoint, status in FAILURES:
        m = _cell(tmp_path, what.replace(" ", "_"), overrides, failpoint)
        assert m.status == status, (what, m.status, m.error)
        # nothing collected here: dead as the cell returns, before anything the next cell does
        alive = [name for name, ref in watched["refs"] if ref() is not None]
        assert not alive, f"{what}: still alive after the cell: {alive}"
        assert {"model", "optimizer", "train_loader", "accelerator", "a batch tensor"} <= {
            n for n, _ in watched["refs"]
        }
        watched["refs"].clear()
        # what the cell froze is what any cell leaves (imported code, caches), not its tensors
        assert gc.get_freeze_count() - frozen < 20_000, (what, gc.get_freeze_count() - frozen)
        frozen = gc.get_freeze_count()
        assert not any(isinstance(o, torch.optim.Optimizer) for o in gc.get_objects())
    last = _cell(tmp_path, "last")
    assert last.status == "ok" and last.reused == {"data": True, "model": True}
    # each cell's memory starts where the first cell's did: nothing kept from the failures between
    first_baseline, *later = watched["baselines"]
    for baseline in later:
        assert abs(baseline - first_baseline) <= 0.02 * first_baseline, (first_baseline, later)
