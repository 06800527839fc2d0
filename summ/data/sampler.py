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

With a token budget (`TokenBatches`, batch.max_tokens) the micro-batches are cut from the same
sample order by padded positions instead of by count: each length-sorted bucket is filled up to the
budget, the epoch's micro-batches shuffled, and the count made a whole number of optimizer steps by
halving the largest micro-batches (a split changes the layout, not the samples or the update). A
measurement trial cuts its fixed warm-up and measured samples the same way, so every cell still
measures the same samples.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Iterator, Sequence
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

    def rng(self, epoch: int) -> random.Random:
        """The epoch's shuffle of batches (grouped or token-budget)."""
        return random.Random(self.seed * 1_000_003 + epoch)

    def parts(self, epoch: int) -> list[list[int]]:
        """The epoch's samples before any grouping: [the permutation], or a window's [warm-up, measured]."""
        perm = self.permutation(0 if self.window else epoch)
        if self.window is None:
            return [perm]
        n = len(perm)
        measured = [perm[i % n] for i in range(self.window.measured)]
        return [[perm[(n - 1 - i) % n] for i in range(self.window.warmup)][::-1], measured]

    def order(self, epoch: int) -> list[int]:
        """The sample indices of one epoch, batch after batch."""
        parts, rng = self.parts(epoch), self.rng(epoch)
        if not self.group_by_length:
            return [j for part in parts for j in part]
        if self.window is None:
            size = self.batch_size * MEGABATCH_BATCHES
            return self._grouped([parts[0][i : i + size] for i in range(0, len(parts[0]), size)], rng)
        return [j for part in parts for j in self._grouped([part], rng)]

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


# The padded positions of a micro-batch from (samples, widest input, widest label, input tokens): the
# collator's own rule (Collator.budget_positions), in O(1) so that an epoch is cut in one pass
BudgetCost = Callable[[int, int, int, int], int]


class TokenBatches(Sampler[list[int]]):
    """batch.max_tokens: micro-batches of at most `max_tokens` padded positions (input + labels, as
    the collator pads them), cut from `sampler`'s samples (its permutation, or a window's warm-up and
    measured parts), a multiple of `per_step` micro-batches (accumulation x processes) in each part.
    A DataLoader's batch_sampler; the order of any epoch is known in advance (`batches`)."""

    def __init__(
        self, sampler: EpochSampler, label_lengths: Sequence[int], cost: BudgetCost, max_tokens: int, per_step: int
    ):
        self.sampler = sampler  # named so: Accelerate's loader sets the epoch on `batch_sampler.sampler`
        self.label_lengths = list(label_lengths)
        self.cost, self.max_tokens, self.per_step = cost, max_tokens, per_step
        self._cut: dict[int, list[list[list[int]]]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def sample_cost(self, j: int) -> int:
        """One sample's padded positions alone."""
        n_in = self.sampler.lengths[j]
        return self.cost(1, n_in, self.label_lengths[j], n_in)

    def typical_batch(self) -> int:
        """Samples of median cost that fill the budget (a bucket's size, a warm-up given in steps)."""
        median = statistics.median(map(self.sample_cost, range(len(self.sampler.lengths))))
        return max(1, self.max_tokens // max(1, int(median)))

    def part_batches(self, epoch: int) -> list[list[list[int]]]:
        """The micro-batches of each part of the epoch (one part, or a window's warm-up and measured)."""
        key = 0 if self.sampler.window else epoch
        if key not in self._cut:
            self._cut = {key: self._cut_parts(epoch)}  # the latest epoch only: an epoch is read whole
        return self._cut[key]

    def batches(self, epoch: int) -> list[list[int]]:
        return [b for part in self.part_batches(epoch) for b in part]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches(self.sampler.epoch))

    def __len__(self) -> int:
        return len(self.batches(self.sampler.epoch))

    def _cut_parts(self, epoch: int) -> list[list[list[int]]]:
        rng, out = self.sampler.rng(epoch), []
        for part in self.sampler.parts(epoch):
            if self.sampler.window is None:  # buckets of about MEGABATCH_BATCHES micro-batches each
                size = self.typical_batch() * MEGABATCH_BATCHES
                buckets = [part[i : i + size] for i in range(0, len(part), size)]
            else:
                buckets = [part]
            cut = [b for bucket in buckets for b in self._fill(sorted(bucket, key=lambda j: -self.sample_cost(j)))]
            rng.shuffle(cut)
            out.append(whole_steps(cut, self.per_step))
        return out

    def _fill(self, ordered: list[int]) -> Iterator[list[int]]:
        """Longest first, each micro-batch filled while its padded positions stay within the budget
        (a sample over the budget alone is a micro-batch of its own: setup refuses such a budget)."""
        batch, wide_in, wide_label, tokens = [], 0, 0, 0
        for j in ordered:
            n_in, n_label = self.sampler.lengths[j], self.label_lengths[j]
            grown = (max(wide_in, n_in), max(wide_label, n_label), tokens + n_in)
            if batch and self.cost(len(batch) + 1, *grown) > self.max_tokens:
                yield batch
                batch, grown = [], (n_in, n_label, n_in)
            batch.append(j)
            wide_in, wide_label, tokens = grown
        if batch:
            yield batch


def whole_steps(batches: list[list[int]], per_step: int) -> list[list[int]]:
    """`batches` made a multiple of `per_step` micro-batches: the micro-batch with the most samples
    halved (in place, its second half after it) until it is; where none has two samples left, the
    last ones are dropped (the next epoch's permutation brings them back)."""
    batches = list(batches)
    while len(batches) % per_step:
        k = max(range(len(batches)), key=lambda i: len(batches[i]))
        if len(batches[k]) < 2:
            return batches[: len(batches) - len(batches) % per_step]
        half = len(batches[k]) // 2
        batches[k : k + 1] = [batches[k][:half], batches[k][half:]]
    return batches
