"""What the processes of a launch agree on, each optimizer step, so that none waits alone in a
collective the others never reach (DDP over gloo or NCCL; one process: nothing to agree).

- The step's counts (samples, tokens, pads, label tokens) come from the collator's host-side counts:
  one small sum.
- After the step, one max over [peak, stop signal, out-of-memory process]: every process then takes
  the same budget, checkpoint and out-of-memory decisions.
- A process that ran out of memory in a forward or backward still takes its part in the step's
  gradient all-reduce (`stand_in`), then the agreement raises the same error on every process, and a
  sweep goes on to its next cell on the same process group. The memory probe runs without the
  all-reduce, so a failure there needs no stand-in. Not covered: a failure part-way through a
  backward after DDP had been handed some gradients (it refuses a second backward then); the
  largest backward allocation, the logits' gradient, comes before any.
"""
from __future__ import annotations

from typing import Optional

import torch

from summ.data.tokenize import BatchCounts
from summ.measure.memory import OutOfMemoryOnAProcess, is_oom
from summ.modeling.loss import model_inputs
from summ.training.outcome import first_line


def shared_oom(accelerator, exc: BaseException) -> Optional[str]:
    """The first line of `exc` when it is an out-of-memory error the other processes must hear of
    (several processes), for `agree` to share once this process has taken its part in the step.
    None: the caller raises it again with a bare `raise`. Never raised from here: a frame that holds
    the exception it raises makes a cycle (exception -> traceback -> frame -> exception) that keeps
    the failed step's batch, graph, optimizer and loader alive until a full collection, and out of
    its reach for good once a sweep freezes what survived the cell (gc.freeze)."""
    if accelerator.num_processes == 1 or not is_oom(exc):
        return None
    return first_line(exc)


def window_counts(accelerator, window: list[dict]) -> tuple[int, int, int, int]:
    """(samples, tokens, pad tokens, label tokens) of the window over all processes."""
    mine = [sum(b["counts"][i] for b in window) for i in range(len(BatchCounts._fields))]
    if accelerator.num_processes == 1:
        return tuple(mine)
    total = accelerator.reduce(torch.tensor(mine, device=accelerator.device), reduction="sum")
    return tuple(int(x) for x in total)


def stand_in(accelerator, model, batch: dict, sync: bool) -> torch.Tensor:
    """This process's part in the step's gradient all-reduce (at the micro-step that `sync`s) after
    it ran out of memory: one sample cut to two tokens, forward and a zero loss backward (every
    trainable parameter gets a zero gradient, as DDP expects). Returns the zero loss it adds."""
    if not sync:  # an accumulating micro-step: no collective to take part in
        return torch.zeros((), device=accelerator.device)
    small = {k: v[:1, :2] if torch.is_tensor(v) and v.dim() == 2 else v for k, v in batch.items()}
    if hasattr(model, "require_forward_param_sync"):  # DDP: the failed forward had broadcast the
        model.require_forward_param_sync = False  # buffers; the others broadcast no more this step
    logits = model(**model_inputs(small)).logits
    accelerator.backward(logits.float().sum() * 0)
    return torch.zeros((), device=accelerator.device)


def agree(accelerator, peak: int, signum: int, oom: Optional[str] = None, where: str = "") -> tuple[int, int]:
    """The largest peak and any stop signal over all processes, in one collective; raises
    OutOfMemoryOnAProcess on every process where one ran out (`oom`: this process's error, in `where`)."""
    if accelerator.num_processes == 1:
        return peak, signum
    mine = [peak, signum, accelerator.process_index + 1 if oom is not None else 0]
    agreed = [int(x) for x in accelerator.reduce(torch.tensor(mine, dtype=torch.int64, device=accelerator.device),
                                                  reduction="max")]
    if agreed[2]:  # every process ends the run the same way, with the error of the one that ran out
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([oom], from_process=agreed[2] - 1)[0]
        raise OutOfMemoryOnAProcess(agreed[2] - 1, accelerator.num_processes, where, message)
    return agreed[0], agreed[1]
