"""Padding-free packing for causal LMs (data.packing): a micro-batch's samples laid end to end in
rows, with `position_ids` restarting at 0 for each sample and no attention mask (as TRL's
padding_free and transformers' DataCollatorWithFlattening). transformers reads the restarts as
sample boundaries: its masks (masking_utils, for sdpa, eager and flex) become block-diagonal and
flash_attention_2 takes its varlen path, so no sample attends to another. The setup checks this
on the model itself before training (summ/modeling/checks.py: check_packed_rows_isolated).

Packing changes the layout, never the samples (the sampler's micro-batches are kept whole) nor the
update: each sample's first label is masked, since in a row the token before it belongs to another
sample (unpacked, nothing precedes it and the loss's shift drops it), so the summed loss and its
label-token count are those of the padded batch.

Rows: one holding every sample (no padding at all), or with data.max_packed_len the fewest rows of
at most that many positions, balanced (longest sample first, each into the shortest row) so that
padding the rows to the longest is little.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from summ.config import ModelKind
from summ.data.tokenize import IGNORE_INDEX, BatchCounts, Features


def rows_for(lengths: Sequence[int], cap: int | None) -> list[list[int]]:
    """The sample indices each row holds, in their micro-batch order within a row."""
    total = sum(lengths)
    if cap is None or total <= cap:
        return [list(range(len(lengths)))]
    if max(lengths) > cap:
        raise ValueError(f"a sample of {max(lengths)} tokens is longer than a packed row of {cap}")
    longest_first = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    count = math.ceil(total / cap)
    while True:
        rows: list[list[int]] = [[] for _ in range(count)]
        sizes = [0] * count
        for i in longest_first:
            k = min(range(count), key=sizes.__getitem__)
            rows[k].append(i)
            sizes[k] += lengths[i]
        if max(sizes) <= cap:
            return [sorted(row) for row in rows]
        count += 1


class PackingCollator:
    """Collator's contract (summ/data/tokenize.py) for packed causal batches: input_ids,
    position_ids, labels and the host-side counts; the rows padded to the longest (pad positions
    form a segment of their own, labels ignored)."""

    kind = ModelKind.causal
    decoder_start = None

    def __init__(self, pad_token_id: int, max_packed_len: int | None = None):
        self.pad = pad_token_id
        self.max_packed_len = max_packed_len

    def positions(self, input_lengths: Sequence[int], label_lengths: Sequence[int]) -> int:
        """Padded positions the model reads for a micro-batch of these lengths: rows x the longest row."""
        rows = rows_for(input_lengths, self.max_packed_len)
        return len(rows) * self.widths(input_lengths, label_lengths)[0]

    def widths(self, input_lengths: Sequence[int], label_lengths: Sequence[int]) -> tuple[int, int]:
        """(input, label) widths of the packed rows these lengths make: the longest row's."""
        rows = rows_for(input_lengths, self.max_packed_len)
        width = max(sum(input_lengths[i] for i in row) for row in rows)
        return width, width

    def budget_positions(self, n: int, widest_input: int, widest_label: int, input_tokens: int) -> int:
        """The token-budget sampler's cost of a packed micro-batch: its tokens (balanced rows add
        only the padding of rows shorter than the longest)."""
        return input_tokens

    def probe_batch(self, features: list[Features], widths: tuple[int, int]) -> dict:
        """The memory probe's batch (the longest samples): packed like any other, its rows are as
        long as a micro-batch of them can make."""
        return self(features)

    def __call__(self, features: list[Features]) -> dict:
        lengths = [len(f.input_ids) for f in features]
        rows = rows_for(lengths, self.max_packed_len)
        width = max(sum(lengths[i] for i in row) for row in rows)
        ids, positions, labels = [], [], []
        for row in rows:
            r_ids, r_pos, r_lab = [], [], []
            for i in row:
                f = features[i]
                r_ids += f.input_ids
                r_pos += range(len(f.input_ids))
                r_lab += [IGNORE_INDEX] + f.labels[1 : len(f.input_ids)]
            pad = width - len(r_ids)
            ids.append(r_ids + [self.pad] * pad)
            positions.append(r_pos + list(range(pad)))
            labels.append(r_lab + [IGNORE_INDEX] * pad)
        real = sum(lengths)
        # counted as the padded layout does: the prompt's labels are ignored, the first position has no target
        label_tokens = sum(len(f.labels) - max(f.prompt_len, 1) for f in features)
        return {
            "input_ids": torch.tensor(ids),
            "position_ids": torch.tensor(positions),
            "labels": torch.tensor(labels),
            "counts": BatchCounts(len(features), real, len(rows) * width - real, label_tokens),
        }
