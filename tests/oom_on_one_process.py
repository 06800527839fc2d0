"""Test helper, not a test: run.py as one process of a `torch.distributed.run` launch, with an
out-of-memory error injected on process 1 only (tests/test_distributed.py).

SUMM_TEST_OOM lists, job by job of the sweep this process runs, where process 1 runs out:
`probe` (the memory probe), `forward:STEP:MICRO` (a micro-step's forward), `backward:STEP:MICRO`
(its backward, as the logits' gradient is allocated), or `-` (nowhere). STEP counts from 0."""
import os
import runpy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from summ.training import loop  # noqa: E402

PLAN = os.environ["SUMM_TEST_OOM"].split(",")
jobs = iter(PLAN)
where = {"job": None}


def out_of_memory(what: str):
    return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({what} injected by the test)")


def failing_forward(model, what: str):
    """A hook that runs out of memory inside the model's forward (its last layer), as an
    activation allocation does: after DDP's start-of-forward work (the buffer broadcast)."""
    def hook(module, args, output):
        raise out_of_memory(what)
    return model.lm_head.register_forward_hook(hook)


def failing_backward(logits, *args, **kwargs):
    """The loss, with the logits' gradient failing to allocate, as in a causal LM's backward."""
    def allocator_fails(grad):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 2147483648 bytes "
                           "(backward injected by the test)")
    logits.register_hook(allocator_fails)
    return loss(logits, *args, **kwargs)


if int(os.environ.get("RANK", "0")) == 1:
    start_memory, probe, forward_backward, loss = (loop.Job._start_memory, loop.probe_memory,
                                                   loop.Job._forward_backward, loop.summed_token_loss)

    def next_job(self):
        where["job"] = next(jobs, "-")
        return start_memory(self)

    def failing_probe(accelerator, model, *args, **kwargs):
        hook = failing_forward(accelerator.unwrap_model(model), "probe") if where["job"] == "probe" else None
        try:
            return probe(accelerator, model, *args, **kwargs)
        finally:
            if hook is not None:
                hook.remove()

    def failing_step(self, batch, n_items, step, micro):
        kind, _, at = where["job"].partition(":")
        if at != f"{step}:{micro}":
            return forward_backward(self, batch, n_items, step, micro)
        hook = failing_forward(self.accelerator.unwrap_model(self.model), "forward") if kind == "forward" else None
        loop.summed_token_loss = failing_backward if kind == "backward" else loss
        try:
            return forward_backward(self, batch, n_items, step, micro)
        finally:
            loop.summed_token_loss = loss
            if hook is not None:
                hook.remove()

    loop.Job._start_memory, loop.probe_memory, loop.Job._forward_backward = next_job, failing_probe, failing_step

sys.argv[0] = str(ROOT / "run.py")
runpy.run_path(str(ROOT / "run.py"), run_name="__main__")
