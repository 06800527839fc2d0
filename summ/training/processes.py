"""What the processes of a launch agree on, each optimizer step, so that none waits alone in a
collective the others never reach (DDP over gloo or NCCL; one process: nothing to agree).

- The step's counts (samples, tokens, pads, label tokens) come from the collator's host-side counts:
  one small sum, read back once.
- After the step, one max over [peak, stop signal, failed process]: every process then takes the
  same budget, checkpoint and failure decisions.
- A process whose forward, backward or optimizer step failed (out of memory, or any other error)
  still takes its part in the step's gradient all-reduce (`stand_in`), then the agreement raises the
  same error on every process (`oom` for an out-of-memory error, `failed` otherwise), and a sweep
  goes on to its next cell on the same process group. The memory probe runs without the all-reduce,
  so a failure there needs no stand-in. Not covered: a failure part-way through a backward after
  DDP had been handed some gradients (it refuses a second backward then); the largest backward
  allocation, the logits' gradient, comes before any.
- What cannot be agreed (that backward, one process failing outside the step) is bounded by the
  process group's timeout (`measure.collective_timeout_s`): the waiting process's collective fails,
  the cell ends `failed`, and since a group whose collective timed out is out of step for good, the
  sweep stops there (errors.ProcessesOutOfStep), every finished cell kept.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch

from summ.data.tokenize import BatchCounts
from summ.errors import FailedOnAProcess
from summ.measure.memory import OutOfMemoryOnAProcess, is_oom
from summ.modeling.loss import model_inputs
from summ.training.outcome import first_line

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failure:
    """What ended a step on one process, for the others to raise too."""

    oom: bool
    message: str  # the error's first line (with its type where it is not an out-of-memory error)


def shared_failure(accelerator, exc: BaseException) -> Failure | None:
    """What `exc` is, for `agree` to share once this process has taken its part in the step, when
    the other processes must hear of it (several processes). None: the caller raises it again with a
    bare `raise`. Never raised from here: a frame that holds the exception it raises makes a cycle
    (exception -> traceback -> frame -> exception) that keeps the failed step's batch, graph,
    optimizer and loader alive until a full collection, and out of its reach for good once a sweep
    freezes what survived the cell (gc.freeze)."""
    if accelerator.num_processes == 1 or not isinstance(exc, Exception):
        return None
    if is_oom(exc):
        return Failure(True, first_line(exc))
    # its traceback as text, not exc_info: a log record kept by a handler would hold the failed step's frames
    log.error(
        "process %d failed in a training step (the others end the cell with it):\n%s",
        accelerator.process_index,
        "".join(traceback.format_exception(exc)),
    )
    return Failure(False, f"{type(exc).__name__}: {first_line(exc)}")


def step_counts(accelerator, micro_batches: list[dict]) -> BatchCounts:
    """What one optimizer step's micro-batches hold, over all processes."""
    mine = [sum(b["counts"][i] for b in micro_batches) for i in range(len(BatchCounts._fields))]
    if accelerator.num_processes == 1:
        return BatchCounts(*mine)
    total = accelerator.reduce(torch.tensor(mine, device=accelerator.device), reduction="sum")
    return BatchCounts(*total.tolist())  # one read back, not one per count


def stand_in(accelerator, model, batch: dict, sync: bool) -> torch.Tensor:
    """This process's part in the step's gradient all-reduce (at the micro-step that `sync`s) after
    it failed: one sample cut to two tokens, forward and a zero loss backward (every trainable
    parameter gets a zero gradient, as DDP expects). Returns the zero loss it adds."""
    if not sync:  # an accumulating micro-step: no collective to take part in
        return torch.zeros((), device=accelerator.device)
    small = {k: v[:1, :2] if torch.is_tensor(v) and v.dim() == 2 else v for k, v in batch.items()}
    if hasattr(model, "require_forward_param_sync"):  # DDP: the failed forward had broadcast the
        model.require_forward_param_sync = False  # buffers; the others broadcast no more this step
    logits = model(**model_inputs(small)).logits
    accelerator.backward(logits.float().sum() * 0)
    return torch.zeros((), device=accelerator.device)


def agree(accelerator, peak: int, signum: int, failure: Failure | None = None, where: str = "") -> tuple[int, int]:
    """The largest peak and any stop signal over all processes, in one collective; raises on every
    process where one failed (`failure`: this process's, in `where`): OutOfMemoryOnAProcess for an
    out-of-memory error, FailedOnAProcess for any other."""
    if accelerator.num_processes == 1:
        return peak, signum
    mine = [peak, signum, accelerator.process_index + 1 if failure is not None else 0]
    agreed = accelerator.reduce(
        torch.tensor(mine, dtype=torch.int64, device=accelerator.device), reduction="max"
    ).tolist()
    if agreed[2]:  # every process ends the run the same way, with the error of the one that failed
        from accelerate.utils import broadcast_object_list

        failed = broadcast_object_list([failure], from_process=agreed[2] - 1)[0]
        if failed.oom:
            raise OutOfMemoryOnAProcess(agreed[2] - 1, accelerator.num_processes, where, failed.message)
        raise FailedOnAProcess(
            f"process {agreed[2] - 1} of {accelerator.num_processes} failed in {where}: {failed.message}"
        )
    return agreed[0], agreed[1]


def set_collective_timeout(seconds: float) -> None:
    """The process group's timeout, for a group made before this run (an earlier cell's): a
    collective that another process never reaches fails after it instead of waiting 10-30 minutes
    (torch's defaults). A group made by this run got it at creation (setup.start_accelerator)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and hasattr(dist.distributed_c10d, "_set_pg_timeout"):
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=seconds))
