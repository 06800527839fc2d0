"""Faults injected by name, for the tests and for anyone who wants to see what a failure does
(as etcd's and TiKV's failpoints): `SUMM_FAILPOINTS` holds a comma-separated list of
`KIND@POINT[:key=value]...`, read from the environment once, at the first look.

- KIND: `oom` raises `torch.OutOfMemoryError` at the point, with that point's tensors alive, as a
  real allocation failure would; `error` raises a RuntimeError (a bug, status failed).
- POINT, where in a run:
  | point | raised |
  |---|---|
  | `probe` | inside the memory probe's forward (the worst batch) |
  | `forward` | inside a training micro-step's forward, once its logits exist |
  | `backward` | inside the backward, as the logits' gradient arrives (the largest allocation) |
  | `optimizer` | at the optimizer step, its gradients complete |
  | `save` | when the run saves its model or a checkpoint |
  | `eval` | inside evaluation's first forward |
- Filters, all that are given must match: `micro_batch=N` (the cell's micro-batch), `step=N` (the
  optimizer step, counting from 1, warm-up included: the probe's is the first measured step, save's
  and eval's the steps done), `rank=N` (the process); and, to single out one cell of a grid or one
  micro-step of an accumulating step, `accumulation=N` (the cell's gradient accumulation) and
  `micro_step=N` (forward and backward: the micro-step within the optimizer step, from 1).

`SUMM_FAILPOINTS=oom@backward:micro_batch=64:step=2 python run.py -m batch.batch_size=2,64,2` ends the
64 cell `oom` and the 2 cells `ok`. Unset, every look is one dictionary lookup on an empty dict.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from summ.errors import ConfigError

ENV = "SUMM_FAILPOINTS"
KINDS = ("oom", "error")
POINTS = ("probe", "forward", "backward", "optimizer", "save", "eval")
FILTERS = ("micro_batch", "accumulation", "step", "micro_step", "rank")


@dataclass(frozen=True)
class Where:
    """Where a run is when it looks at a failpoint (None: not known there)."""

    micro_batch: int | None = None
    accumulation: int | None = None
    step: int | None = None
    micro_step: int | None = None

    def __str__(self) -> str:
        return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in vars(self).items() if v is not None)


@dataclass(frozen=True)
class Failpoint:
    kind: str
    point: str
    micro_batch: int | None = None
    accumulation: int | None = None
    step: int | None = None
    micro_step: int | None = None
    rank: int | None = None

    def matches(self, where: Where, rank: int) -> bool:
        return all(getattr(self, key) in (None, got) for key, got in (*vars(where).items(), ("rank", rank)))

    def error(self, where: Where) -> Exception:
        at = f"failpoint {self.kind}@{self.point} ({where})"
        if self.kind == "oom":  # the allocator's own wording, so every check that reads it applies
            return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({at})")
        return RuntimeError(f"injected error ({at})")


def parse(spec: str) -> dict[str, tuple[Failpoint, ...]]:
    """`SUMM_FAILPOINTS`'s text -> the failpoints by point; a ConfigError line for anything else."""
    armed: dict[str, list[Failpoint]] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        head, *filters = item.split(":")
        kind, at, point = head.partition("@")
        if not at or kind not in KINDS or point not in POINTS:
            raise ConfigError(
                f"{ENV}: {item!r} is not KIND@POINT[:key=value]: KIND is one of {', '.join(KINDS)}, "
                f"POINT one of {', '.join(POINTS)}"
            )
        values: dict[str, int] = {}
        for f in filters:
            key, eq, value = f.partition("=")
            if not eq or key not in FILTERS or not value.strip().lstrip("-").isdigit():
                raise ConfigError(
                    f"{ENV}: {f!r} in {item!r} is not a filter: use {', '.join(k + '=N' for k in FILTERS)}"
                )
            values[key] = int(value)
        armed.setdefault(point, []).append(Failpoint(kind, point, **values))
    return {point: tuple(fps) for point, fps in armed.items()}


_ARMED: dict[str, tuple[Failpoint, ...]] | None = None


def load() -> dict[str, tuple[Failpoint, ...]]:
    """The failpoints of this process, read from the environment on the first call."""
    global _ARMED
    if _ARMED is None:
        _ARMED = parse(os.environ.get(ENV, ""))
    return _ARMED


def configure(spec: str | None) -> None:
    """Arm `spec` in this process (tests); None reads the environment again at the next look."""
    global _ARMED
    _ARMED = None if spec is None else parse(spec)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def armed(point: str, where: Where) -> Failpoint | None:
    """The first failpoint armed at `point` for `where` and this process, or None."""
    candidates = load().get(point)
    if not candidates:
        return None
    rank = _rank()
    return next((fp for fp in candidates if fp.matches(where, rank)), None)


def hit(point: str, where: Where) -> None:
    """Raise here if a failpoint is armed for it."""
    fp = armed(point, where)
    if fp is not None:
        raise fp.error(where)


@contextlib.contextmanager
def inside_forward(module_of: Callable[[], torch.nn.Module], point: str, where: Where) -> Iterator[None]:
    """While the block runs, the forward of `module_of()` (the model inside any wrapper: DDP's
    start-of-forward work done, its end-of-forward work not) raises once its output exists, as an
    activation that cannot be allocated would. Nothing is looked up or registered where no
    failpoint is armed."""
    fp = armed(point, where)
    if fp is None:
        yield
        return

    def fail(mod, args, output):
        raise fp.error(where)

    handle = module_of().register_forward_hook(fail)
    try:
        yield
    finally:
        handle.remove()


def inside_backward(tensor: torch.Tensor, where: Where) -> None:
    """The backward through `tensor` raises as its gradient arrives (for the logits: the backward's
    largest allocation, before any parameter has its gradient), when `backward` is armed."""
    fp = armed("backward", where)
    if fp is not None and tensor.requires_grad:

        def fail(grad):
            raise fp.error(where)

        tensor.register_hook(fail)
