"""The order in which training samples are drawn, and the padded positions it costs.

A full run draws a seeded permutation per epoch: the same order for any micro-batch size, so
(8,1), (4,2) and (2,4) see the same samples in each update. With length grouping the permutation
is cut into mega-batches of 50 batches, each sorted by length and cut into batches (little
padding), and then the batches of the epoch are shuffled (seeded), so that no stretch of the epoch
holds only the longest batches.

A measurement trial (`window`) draws a fixed set of samples whatever the micro-batch, the
accumulation or the grouping: its warm-up from the end of epoch 0's permutation and its measured
window from the start, each grouped on its own when grouping is on. Every cell of a sweep then
measures exactly the same samples and tokens.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler

MEGABATCH_BATCHES = 50  # batches per length-sorted mega-batch (as the HF Trainer's LengthGroupedSampler)


@dataclass(frozen=True)
class Window:
    """A measurement trial's samples: `warmup` then `measured`, both multiples of the effective batch."""

    warmup: int
    measured: int


class EpochSampler(Sampler[int]):
    def __init__(
        self,
        lengths: Sequence[int],
        seed: int,
        group_by_length: bool = False,
        batch_size: int = 1,
        window: Window | None = None,
    ):
        self.lengths = list(lengths)
        self.seed = seed
        self.group_by_length = group_by_length
        self.batch_size = batch_size
        self.window = window
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.window.warmup + self.window.measured if self.window else len(self.lengths)

    def permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.lengths), generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch))

    def order(self, epoch: int) -> list[int]:
        """The sample indices of one epoch, batch after batch."""
        perm = self.permutation(0 if self.window else epoch)
        rng = random.Random(self.seed * 1_000_003 + epoch)
        if self.window is None:
            if not self.group_by_length:
                return perm
            size = self.batch_size * MEGABATCH_BATCHES
            return self._grouped([perm[i : i + size] for i in range(0, len(perm), size)], rng)
        n = len(perm)
        measured = [perm[i % n] for i in range(self.window.measured)]
        warmup = [perm[(n - 1 - i) % n] for i in range(self.window.warmup)][::-1]
        if not self.group_by_length:
            return warmup + measured
        return self._grouped([warmup], rng) + self._grouped([measured], rng)

    def _grouped(self, chunks: list[list[int]], rng: random.Random) -> list[int]:
        """Each chunk sorted by length (longest first) and cut into batches; the batches then shuffled,
        a trailing partial batch kept last (where drop_last drops it)."""
        bs = self.batch_size
        full, partial = [], []
        for chunk in chunks:
            ordered = sorted(chunk, key=lambda j: -self.lengths[j])
            for i in range(0, len(ordered), bs):
                batch = ordered[i : i + bs]
                (full if len(batch) == bs else partial).append(batch)
        rng.shuffle(full)
        return [j for batch in full + partial for j in batch]
