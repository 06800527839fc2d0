"""The order in which training samples are drawn, epoch after epoch."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch (same order for any batch size, so (8,1), (4,2), (2,4)
    see the same samples in each update). With group_by_length, the permutation is cut into
    mega-batches of 50 batches, each sorted by length, so each batch holds similar lengths."""

    MEGABATCH_BATCHES = 50

    def __init__(self, lengths: Sequence[int], seed: int, group_by_length: bool = False, batch_size: int = 1):
        self.lengths = list(lengths)
        self.seed = seed
        self.group_by_length = group_by_length
        self.batch_size = batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        if self.group_by_length:
            size = self.batch_size * self.MEGABATCH_BATCHES
            mega = [order[i: i + size] for i in range(0, len(order), size)]
            order = [i for m in mega for i in sorted(m, key=lambda j: -self.lengths[j])]
        return iter(order)
