"""What became of a run: its status from what ended it, and its record written to the run folder
whatever happened (the metrics record, the step history, the tracker's final figures).

| what ended the run | status | raised again for run.py |
|---|---|---|
| nothing | ok | - |
| OverBudget (peak over budget x headroom) | over_budget | - |
| an out-of-memory error (summ/measure/memory.py: is_oom) | oom | - |
| Diverged (a NaN or infinite loss) | diverged | - |
| Interrupted (SIGINT / SIGTERM, checkpoint saved) or a second Ctrl-C | interrupted | yes |
| UserError (config, data, weights, key, folder) | failed | yes |
| a collective timed out or lost a peer; a process failed unheard of | failed | yes (ProcessesOutOfStep) |
| anything else (a bug, an unforeseen library error) | failed, traceback in error.log | - |

Job-level outcomes are recorded, not raised, so a sweep goes on to its next cell.
"""

from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from summ.config import Config
from summ.distributed import is_main_process, out_of_step, rank, world_size
from summ.errors import (
    EXIT_USER_ERROR,
    AgreedFailure,
    Diverged,
    Interrupted,
    OverBudget,
    ProcessesOutOfStep,
    Status,
    UserError,
)
from summ.files import atomic_write_text
from summ.measure.memory import is_oom
from summ.measure.timing import now
from summ.run_folder import ERROR_LOG, METRICS_FILE, RunMetrics, write_history, write_metrics
from summ.training.tracking import Tracking


@dataclass
class StepLog:
    """A training run's step history and its experiment tracker: the loop adds a row per optimizer
    step; `recorded` writes the history and gives the tracker the final figures."""

    history: list[dict] = field(default_factory=list)
    tracking: Tracking = field(default_factory=Tracking)  # inactive until the run starts its own

    def add(self, row: dict) -> None:
        self.history.append(row)
        self.tracking.log_step(row, row["step"])  # queued by the tracker, not waited on


def new_metrics(cfg: Config, cfg_hash: str) -> RunMetrics:
    """A run's record before anything ran: what it was asked to do, status failed until it ends."""
    return RunMetrics(
        mode=str(cfg.mode),
        model=cfg.model.name,
        data=cfg.data.name,
        batch_size=None if cfg.batch.max_tokens else cfg.batch.batch_size,
        max_tokens=cfg.batch.max_tokens,
        gradient_accumulation_steps=cfg.batch.gradient_accumulation_steps,
        mixed_precision=str(cfg.train.mixed_precision),
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        quantization=str(cfg.model.quantization),
        lora=cfg.model.lora.enabled,
        config_hash=cfg_hash,
        random_init=cfg.model.tiny is not None and not cfg.model.path,
    )


def first_line(exc: BaseException) -> str:
    """An error's first line (at most 200 characters), or its type's name where it has no text."""
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def classify(exc: BaseException, phase: str | None) -> tuple[str, str]:
    """(status, one-line error) for what ended a run."""
    if isinstance(exc, OverBudget):
        return Status.over_budget, str(exc)
    if is_oom(exc):
        return Status.oom, f"out of memory during {phase}: {first_line(exc)}"
    if isinstance(exc, Diverged):
        return Status.diverged, str(exc)
    if isinstance(exc, Interrupted):
        return Status.interrupted, str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return Status.interrupted, f"KeyboardInterrupt during {phase}"
    if isinstance(exc, UserError):
        return Status.failed, str(exc)
    return Status.failed, f"{type(exc).__name__}: {exc}".splitlines()[0]


@contextlib.contextmanager
def recorded(metrics: RunMetrics, output_dir: Path, steps: StepLog | None = None):
    """Turn the run's outcome into metrics.status and write the metrics record (and the step history),
    whatever happens. Interruptions and user errors are raised again after the write (run.py says
    how to resume, or prints the one line); `steps` (training): the history and the tracker."""
    started = now()
    raise_after: BaseException | None = None
    writes = is_main_process()  # one set of files per run (and one tracker run): process 0's
    try:
        yield
        metrics.status, metrics.phase = Status.ok, None
    except (Exception, KeyboardInterrupt) as exc:
        metrics.status, metrics.error = classify(exc, metrics.phase)
        if isinstance(exc, Interrupted):
            metrics.checkpoint = str(exc.checkpoint)
        if isinstance(exc, (Interrupted, KeyboardInterrupt, UserError)):
            raise_after = exc
            metrics.user_error = getattr(exc, "exit_status", None) == EXIT_USER_ERROR
        else:  # recorded, and the sweep goes on...
            if metrics.status == Status.failed:  # a bug or an unforeseen library error
                atomic_write_text(
                    output_dir / (ERROR_LOG if is_main_process() else f"error.rank{rank()}.log"), traceback.format_exc()
                )
            if out_of_step(exc):  # ... unless the processes are no longer in step: no later collective holds
                metrics.error = f"another process stopped reaching the collectives ({metrics.error})"
                raise_after = ProcessesOutOfStep(metrics.error)
                # the process that stopped them may have written the run's record already: its words stand
                writes = writes and not (output_dir / METRICS_FILE).exists()
            elif world_size() > 1 and not isinstance(exc, (AgreedFailure, OverBudget, Diverged)):
                # this process alone: the others wait in a collective it will not reach, and process 0
                # may be ended by the launcher before it can write: this process writes the record too
                metrics.error = f"process {rank()} of {world_size()} failed in {metrics.phase}: {metrics.error}"
                raise_after = ProcessesOutOfStep(f"{metrics.error}; the other processes could not hear of it")
                writes = True
    metrics.wall_seconds = now() - started  # the whole job: setup, training, evaluation
    if writes:
        if steps is not None and steps.history:
            write_history(output_dir, steps.history)
        write_metrics(output_dir, metrics)
        if steps is not None:
            steps.tracking.finish(metrics.to_dict())  # the final figures and status, known only now
    if raise_after is not None:
        try:
            raise raise_after
        finally:  # this frame must not hold the error its traceback holds (a cycle: cleanup.clear_frames)
            raise_after = None
