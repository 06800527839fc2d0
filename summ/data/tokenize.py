"""Tokenization for one model kind and prompt template, and collation with dynamic padding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from summ.config import ModelKind
from summ.data.samples import Sample

IGNORE_INDEX = -100  # label positions the loss skips (prompt, padding)


@dataclass
class Features:
    """One tokenized sample. For causal LMs `input_ids` holds prompt + summary and `labels`
    masks the prompt with -100; for seq2seq `labels` is the tokenized summary."""

    input_ids: list[int]
    labels: list[int]
    prompt_len: int  # tokens the model reads before the summary (causal: prompt; seq2seq: encoder input)


class Encoder:
    """Turns samples into token ids for one model kind and prompt template."""

    def __init__(self, tokenizer, kind: ModelKind, prompt_template: str, encoder_max_len: int, decoder_max_len: int):
        self.tok = tokenizer
        self.kind = kind
        self.encoder_max_len = encoder_max_len
        self.decoder_max_len = decoder_max_len
        prefix, _, suffix = prompt_template.partition("{dialogue}")
        self._prefix = self._ids(prefix) if prefix else []
        self._suffix = self._ids(suffix) if suffix else []

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    @staticmethod
    def _fit(rows: list[list[int]], limit: int) -> list[list[int]]:
        """Each row cut to `limit`, its last (special) token kept: a fast tokenizer leaves a row
        untruncated when the limit cannot hold its special tokens, without a word."""
        return [ids if len(ids) <= limit else ids[: limit - 1] + ids[-1:] for ids in rows]

    def _prompts(self, dialogues: list[str]) -> list[list[int]]:
        if self.kind == ModelKind.seq2seq:
            return self._fit(
                self.tok(dialogues, truncation=True, max_length=self.encoder_max_len)["input_ids"], self.encoder_max_len
            )
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        body = self.tok(dialogues, add_special_tokens=False)["input_ids"] if dialogues else []
        return [bos + self._prefix + ids[: self.encoder_max_len] + self._suffix for ids in body]

    def _targets(self, summaries: list[str]) -> list[list[int]]:
        if self.kind == ModelKind.seq2seq:
            return self._fit(
                self.tok(summaries, truncation=True, max_length=self.decoder_max_len)["input_ids"], self.decoder_max_len
            )
        body = self.tok(summaries, add_special_tokens=False)["input_ids"] if summaries else []
        return [ids[: self.decoder_max_len - 1] + [self.tok.eos_token_id] for ids in body]

    def max_widths(self) -> tuple[int, int]:
        """(input, label) widths that any sample fits: the shapes of data.padding=max_length."""
        if self.kind == ModelKind.seq2seq:
            return self.encoder_max_len, self.decoder_max_len
        width = 1 + len(self._prefix) + self.encoder_max_len + len(self._suffix) + self.decoder_max_len
        return width, width

    def longest_prompt(self, samples: Sequence[Sample]) -> int:
        """Tokens of the longest prompt among `samples`: generation's widest input."""
        return max((len(p) for p in self._prompts([s.dialogue for s in samples])), default=0)

    def prompt_ids(self, dialogue: str) -> list[int]:
        """The model input before the summary, truncated so the dialogue fits encoder_max_len."""
        return self._prompts([dialogue])[0]

    def encode_all(self, samples: Sequence[Sample]) -> list[Features]:
        """Tokenize many samples at once (the fast tokenizer batches in Rust)."""
        prompts = self._prompts([s.dialogue for s in samples])
        targets = self._targets([s.summary for s in samples])
        if self.kind == ModelKind.seq2seq:
            return [Features(input_ids=p, labels=t, prompt_len=len(p)) for p, t in zip(prompts, targets)]
        return [
            Features(input_ids=p + t, labels=[IGNORE_INDEX] * len(p) + t, prompt_len=len(p))
            for p, t in zip(prompts, targets)
        ]

    def encode(self, sample: Sample) -> Features:
        return self.encode_all([sample])[0]


class TokenizedDataset(Dataset):
    def __init__(self, samples: Sequence[Sample], encoder: Encoder):
        self.features = encoder.encode_all(samples)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> Features:
        return self.features[i]

    def lengths(self) -> list[int]:
        """Model-input length per sample: what length grouping sorts by."""
        return [len(f.input_ids) for f in self.features]

    def label_lengths(self) -> list[int]:
        return [len(f.labels) for f in self.features]


class BatchCounts(NamedTuple):
    """What one collated batch holds, counted on the host before any copy to the device (reading
    them back from a GPU would stall it once per micro-batch)."""

    samples: int
    tokens: int  # non-pad positions the model reads (encoder or prompt+summary, plus decoder for seq2seq)
    pad_tokens: int
    label_tokens: int  # target tokens: the divisor of the summed token loss


class Collator:
    """Dynamic padding to the longest sequence in each batch (right padding, for training and
    eval loss). Seq2seq batches also get decoder_input_ids: the labels shifted right."""

    def __init__(
        self,
        pad_token_id: int,
        kind: ModelKind,
        decoder_start_token_id: int | None = None,
        input_width: int | None = None,
        label_width: int | None = None,
    ):
        self.pad = pad_token_id
        self.kind = kind
        self.decoder_start = decoder_start_token_id
        self.input_width, self.label_width = input_width, label_width  # set: pad to these fixed widths

    def widths(self, input_lengths: Sequence[int], label_lengths: Sequence[int]) -> tuple[int, int]:
        """(input, label) widths a batch of these lengths is padded to."""
        width = max([*input_lengths, self.input_width or 0])
        lwidth = width if self.kind == ModelKind.causal else max([*label_lengths, self.label_width or 0])
        return width, lwidth

    def positions(self, input_lengths: Sequence[int], label_lengths: Sequence[int]) -> int:
        """Padded positions the model reads for a batch of these lengths (batch_token_counts' rule)."""
        width, lwidth = self.widths(input_lengths, label_lengths)
        return len(input_lengths) * (width + (lwidth if self.kind == ModelKind.seq2seq else 0))

    def budget_positions(self, n: int, widest_input: int, widest_label: int, input_tokens: int) -> int:
        """positions' rule from a micro-batch's size and widest sample (the token-budget sampler's cost)."""
        width, lwidth = self.widths([widest_input], [widest_label])
        return n * (width + (lwidth if self.kind == ModelKind.seq2seq else 0))

    def probe_batch(self, features: list[Features], widths: tuple[int, int]) -> dict:
        """The memory probe's batch: these samples padded to the training set's widest input and label."""
        return Collator(self.pad, self.kind, self.decoder_start, *widths)(features)

    def __call__(self, features: list[Features]) -> dict:
        batch = {}
        width, lwidth = self.widths([len(f.input_ids) for f in features], [len(f.labels) for f in features])
        batch["input_ids"] = torch.tensor([f.input_ids + [self.pad] * (width - len(f.input_ids)) for f in features])
        batch["attention_mask"] = torch.tensor(
            [[1] * len(f.input_ids) + [0] * (width - len(f.input_ids)) for f in features]
        )
        labels = torch.tensor([f.labels + [IGNORE_INDEX] * (lwidth - len(f.labels)) for f in features])
        batch["labels"] = labels
        if self.kind == ModelKind.seq2seq:
            dec = labels.new_full(labels.shape, self.pad)
            dec[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, self.pad)
            dec[:, 0] = self.decoder_start
            batch["decoder_input_ids"] = dec
        real = sum(len(f.input_ids) for f in features)
        # causal: the prompt's labels are ignored, and the first position has nothing before it
        label_tokens = sum(
            len(f.labels) - (max(f.prompt_len, 1) if self.kind == ModelKind.causal else 0) for f in features
        )
        if self.kind == ModelKind.seq2seq:
            real += label_tokens
        batch["counts"] = BatchCounts(
            len(features),
            real,
            self.positions([len(f.input_ids) for f in features], [len(f.labels) for f in features]) - real,
            label_tokens,
        )
        return batch


def left_pad(prompts: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for causal generation (new tokens then line up at the right)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return {"input_ids": ids, "attention_mask": mask}


def batch_token_counts(batch: dict) -> tuple[int, int]:
    """(tokens, pad_tokens) the model reads in one batch: encoder or prompt+summary positions,
    plus decoder positions for seq2seq; pad positions counted separately to show padding waste."""
    mask = batch["attention_mask"]
    real, total = int(mask.sum()), mask.numel()
    if "decoder_input_ids" in batch:
        labels = batch["labels"]
        real_dec = int((labels != -100).sum())
        real, total = real + real_dec, total + labels.numel()
    return real, total - real


def label_token_count(batch: dict) -> int:
    """Target tokens in a batch: the divisor of the summed token loss."""
    return int((batch["labels"] != -100).sum())
