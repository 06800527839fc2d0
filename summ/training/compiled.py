"""train.compile: the model compiled with torch.compile for training, its compile time kept out of
the measured steps.

- The model is compiled in place (`nn.Module.compile`): the module stays the one Accelerate wraps,
  unwraps and saves (its state dict keeps its keys), and evaluation runs it eagerly again
  (`uncompiled`): generation's growing shapes would recompile at every length.
- torch.compile compiles lazily, at the first call of each shape it has not seen, and again where a
  guard fails (a new width: dynamic shapes after the second). Before the loop, `warm_compiled` runs
  forward and backward (no update, no trace: gradients dropped, RNG restored) on the shapes the run
  will meet: its first micro-batches, the widest (the memory probe's), a single sample where one can
  occur, round after round until a round compiles nothing. The loop's measured steps then find the
  compiled graphs ready; `CompileWatch` counts what still compiles inside them (`train.recompiles`).
- Dynamo's caches hold the run's graphs and guards: a sweep's next cell (sweep.reuse_loaded) starts
  from `torch._dynamo.reset()` and compiles for its own settings, so nothing compiled for one cell
  is run by another (reused only where valid: never across cells).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

import torch

from summ.training.instruments import MemoryStretches, Timing
from summ.training.probe import discarded_step, probe_batches
from summ.training.setup import Setup

log = logging.getLogger(__name__)

MAX_ROUNDS = 4  # compile warm-up rounds over the run's shapes before a recompile is left to the loop


class CompileWatch:
    """torch.compile's compilations while it is open (dynamo's compile callbacks): how many (frames
    traced, backward graphs compiled lazily, CUDA graphs recorded) and their seconds."""

    def __init__(self) -> None:
        from torch._dynamo.callback import callback_handler

        self.compiles, self.seconds, self._started = 0, 0.0, None
        self._handler = callback_handler
        callback_handler.register_start_callback(self._start)
        callback_handler.register_end_callback(self._end)

    def _start(self, args) -> None:
        self.compiles += 1
        self._started = time.perf_counter()

    def _end(self, args) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None

    def close(self) -> None:
        with contextlib.suppress(ValueError):  # already removed
            self._handler.remove_start_callback(self._start)
            self._handler.remove_end_callback(self._end)


def compile_model(model: torch.nn.Module, mode: str) -> None:
    """Compile `model` in place for training (dynamic shapes where a width changes: dynamo's default)."""
    model.compile(mode=None if mode == "default" else mode)


def is_compiled(model: torch.nn.Module) -> bool:
    return getattr(model, "_compiled_call_impl", None) is not None


@contextlib.contextmanager
def uncompiled(model: torch.nn.Module) -> Iterator[None]:
    """`model` run eagerly inside (the warm-up's FLOP count), compiled again after."""
    compiled, model._compiled_call_impl = getattr(model, "_compiled_call_impl", None), None
    try:
        yield
    finally:
        model._compiled_call_impl = compiled


def forget(model: torch.nn.Module | None) -> None:
    """The compiled call dropped from `model` and dynamo's caches cleared: what the next cell finds."""
    if model is not None and is_compiled(model):
        model._compiled_call_impl = None
    torch._dynamo.reset()


def warm_compiled(batches: list[dict], step: Callable[[dict], None], watch: CompileWatch) -> tuple[float, int]:
    """`step` (forward and backward, nothing kept) over `batches`, round after round, until a round
    compiles nothing (at most MAX_ROUNDS). Returns (seconds, rounds)."""
    started = time.perf_counter()
    rounds, compiling = 0, True
    while compiling and rounds < MAX_ROUNDS:
        before, rounds = watch.compiles, rounds + 1
        for batch in batches:
            step(batch)
        compiling = watch.compiles != before
    if compiling:
        log.warning("train.compile: still compiling after %d warm-up rounds over the run's shapes", rounds)
    return time.perf_counter() - started, rounds


def warmup_indices(batch_sampler) -> list[list[int]]:
    """The micro-batches of this process's epoch the compile warm-up runs, as sample indices: the
    first two (two widths: dynamo makes a changing width dynamic at the second), the first single
    sample (a size of 1 is compiled apart) and the last (a split or partial one)."""
    order = [list(b) for b in batch_sampler]
    chosen = [*order[:2], *[b for b in order if len(b) == 1][:1], *order[-1:]]
    return [b for k, b in enumerate(chosen) if b not in chosen[:k]]


def warm_up_compiled(run: Setup, timing: Timing, memory: MemoryStretches, watch: CompileWatch) -> float:
    """Before the loop: the FLOP count on the eager model (the counter cannot see compiled kernels),
    then warm_compiled over the run's first micro-batches and the memory probe's. Its memory is a
    stretch of its own, not training's. Returns its seconds."""
    acc, model, data, collator = run.accelerator, run.model, run.data.train_ds, run.collator
    batches = [collator([data[i] for i in b]) for b in warmup_indices(run.train_loader.batch_sampler)]
    batches += probe_batches(data, run.shape, collator)
    memory.end_observed_stretch()
    resident = memory.monitor.resident_marks()

    def step(batch: dict) -> None:
        with acc.no_sync(model):  # every process runs the same warm-up: no gradient all-reduce to wait in
            discarded_step(acc, model, run.optimizer, run.on_device(batch), run.kind)

    with uncompiled(acc.unwrap_model(model)), timing.profiled(model, batches[0]):
        step(batches[0])
    seconds, rounds = warm_compiled(batches, step, watch)
    memory.end_compile(resident)
    log.info(
        "train.compile: %d compilations in %.1f s (%d warm-up rounds over %d micro-batch shapes, %.1f s)",
        watch.compiles,
        watch.seconds,
        rounds,
        len(batches),
        seconds,
    )
    return seconds
