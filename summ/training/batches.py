"""The micro-batches of each optimizer step, in the order a run draws them, resumable."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch


def accumulation_groups(
    loader, accumulation: int, epoch: int, skip: int, resumed: bool
) -> Iterator[tuple[int, list[dict], dict]]:
    """(epoch, the `accumulation` micro-batches of one optimizer step, the position after them) forever,
    epoch after epoch, from micro-batch `skip` of `epoch` (a resumed run skips what its checkpoint
    had consumed: same data order). A trailing partial group is dropped, like a partial micro-batch
    (drop_last)."""
    while True:
        loader.set_epoch(epoch)
        group, consumed = [], 0
        rng = torch.get_rng_state()
        batches = iter(loader)
        first = next(batches, None)  # the loader starts on first use and draws a seed from torch's RNG...
        if resumed:  # ... which the interrupted run drew before its checkpoint: not again
            torch.set_rng_state(rng)
            resumed = False
        for batch in itertools.chain([] if first is None else [first], batches):
            consumed += 1
            if consumed <= skip:
                continue
            group.append(batch)
            if len(group) == accumulation:
                yield epoch, group, {"epoch": epoch, "batches": consumed}
                group = []
        epoch, skip = epoch + 1, 0
