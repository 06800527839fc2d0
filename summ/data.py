"""Data: the competition CSV format, the bundled sample, the synthetic generator, tokenization,
collation with dynamic padding, and the (optionally length-grouped) training sampler."""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from summ.config import DataConfig, DataSource, ModelKind
from summ.errors import DataError

# Tokens the competition uses to mask speakers and personal data; never split by a tokenizer.
SPEAKER_TAGS = [f"#Person{i}#" for i in range(1, 8)]
MASKED_TOKENS = SPEAKER_TAGS + [
    "#PhoneNumber#", "#Address#", "#PassportNumber#", "#DateOfBirth#",
    "#SSN#", "#CardNumber#", "#CarNumber#", "#Email#",
]
IGNORE_INDEX = -100
TURN = re.compile(r"^(#Person[1-9]#:\s*)(.*)$")  # one dialogue line: (speaker prefix, utterance)
_REFERENCE_COLUMN = re.compile(r"^summary\d*$")


@dataclass
class Sample:
    fname: str
    dialogue: str
    summaries: list[str] = field(default_factory=list)  # one or more references; empty for test
    topic: str = ""

    @property
    def summary(self) -> str:
        return self.summaries[0] if self.summaries else ""


@dataclass
class Splits:
    train: list[Sample]
    dev: list[Sample]
    test: list[Sample]


def bundled_sample_dir() -> Path:
    return Path(str(resources.files("summ") / "resources" / "sample"))


def read_csv(path: Path, need_summary: bool) -> list[Sample]:
    """Read one competition CSV (UTF-8 with or without BOM, CRLF or LF, quoted multi-line fields)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; set data.dir to the folder that holds it")
    csv.field_size_limit(2**31 - 1)  # the module's default (128 KiB per field) refuses a long dialogue
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = columns
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8 CSV") from None
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV ({exc}); check its quoting (every quoted field closed)") from None
    required = ["fname", "dialogue"] + (["summary"] if need_summary else [])
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(columns) or 'none'}")
    ref_cols = sorted((c for c in columns if _REFERENCE_COLUMN.match(c)), key=lambda c: (len(c), c))
    samples = []
    for row in rows:
        refs = [_clean(row[c]) for c in ref_cols if row.get(c) is not None and row[c].strip()]
        samples.append(Sample(fname=_clean(row["fname"]), dialogue=_clean(row["dialogue"]),
                              summaries=refs, topic=_clean(row.get("topic") or "")))
    return samples


def _clean(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def load_splits(cfg: DataConfig, need_train: bool = True) -> Splits:
    """Load train/dev/test for the configured source, then apply max_train/max_eval_samples.
    `need_train=False` (predict): a missing train file is an empty training set, not an error."""
    if cfg.source == DataSource.synthetic:
        from summ.synthetic import generate

        train = generate(cfg.synthetic_train_size, seed=cfg.synthetic_seed, prefix="train")
        dev = generate(cfg.synthetic_eval_size, seed=cfg.synthetic_seed + 1, prefix="dev")
        test = [Sample(s.fname, s.dialogue) for s in
                generate(cfg.synthetic_eval_size, seed=cfg.synthetic_seed + 2, prefix="test")]
    else:
        folder = bundled_sample_dir() if cfg.source == DataSource.bundled else Path(cfg.dir).expanduser()
        if not folder.is_dir():
            what = "is a file, not a folder" if folder.exists() else "does not exist"
            raise DataError(f"data.dir={cfg.dir} {what}: set data.dir to the folder that holds "
                            f"{cfg.train_file}, {cfg.dev_file} and {cfg.test_file}")
        train_path = folder / cfg.train_file
        train = read_csv(train_path, need_summary=True) if need_train or train_path.is_file() else []
        dev = read_csv(folder / cfg.dev_file, need_summary=True)
        test_path = folder / cfg.test_file
        test = read_csv(test_path, need_summary=False) if test_path.is_file() else []
    if not train and need_train:
        raise DataError(f"data={cfg.name}: the training set is empty")
    if cfg.max_train_samples is not None:
        train = train[: cfg.max_train_samples]
    if cfg.max_eval_samples is not None:
        dev = dev[: cfg.max_eval_samples]  # the test set is never cut: a submission covers every row
    return Splits(train=train, dev=dev, test=test)


# --------------------------------------------------------------------------- tokenization


@dataclass
class Features:
    """One tokenized sample. For causal LMs `input_ids` holds prompt + summary and `labels`
    masks the prompt with -100; for seq2seq `labels` is the tokenized summary."""

    input_ids: list[int]
    labels: list[int]
    prompt_len: int  # tokens the model reads before the summary (causal: prompt; seq2seq: encoder input)


class Encoder:
    """Turns samples into token ids for one model kind and prompt template."""

    def __init__(self, tokenizer, kind: ModelKind, prompt_template: str,
                 encoder_max_len: int, decoder_max_len: int):
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
            return self._fit(self.tok(dialogues, truncation=True, max_length=self.encoder_max_len)["input_ids"],
                             self.encoder_max_len)
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        body = self.tok(dialogues, add_special_tokens=False)["input_ids"] if dialogues else []
        return [bos + self._prefix + ids[: self.encoder_max_len] + self._suffix for ids in body]

    def _targets(self, summaries: list[str]) -> list[list[int]]:
        if self.kind == ModelKind.seq2seq:
            return self._fit(self.tok(summaries, truncation=True, max_length=self.decoder_max_len)["input_ids"],
                             self.decoder_max_len)
        body = self.tok(summaries, add_special_tokens=False)["input_ids"] if summaries else []
        return [ids[: self.decoder_max_len - 1] + [self.tok.eos_token_id] for ids in body]

    def max_widths(self) -> tuple[int, int]:
        """(input, label) widths that any sample fits: the shapes of data.padding=max_length."""
        if self.kind == ModelKind.seq2seq:
            return self.encoder_max_len, self.decoder_max_len
        width = 1 + len(self._prefix) + self.encoder_max_len + len(self._suffix) + self.decoder_max_len
        return width, width

    def prompt_ids(self, dialogue: str) -> list[int]:
        """The model input before the summary, truncated so the dialogue fits encoder_max_len."""
        return self._prompts([dialogue])[0]

    def encode_all(self, samples: Sequence[Sample]) -> list[Features]:
        """Tokenize many samples at once (the fast tokenizer batches in Rust)."""
        prompts = self._prompts([s.dialogue for s in samples])
        targets = self._targets([s.summary for s in samples])
        if self.kind == ModelKind.seq2seq:
            return [Features(input_ids=p, labels=t, prompt_len=len(p)) for p, t in zip(prompts, targets)]
        return [Features(input_ids=p + t, labels=[IGNORE_INDEX] * len(p) + t, prompt_len=len(p))
                for p, t in zip(prompts, targets)]

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


class Collator:
    """Dynamic padding to the longest sequence in each batch (right padding, for training and
    eval loss). Seq2seq batches also get decoder_input_ids: the labels shifted right."""

    def __init__(self, pad_token_id: int, kind: ModelKind, decoder_start_token_id: Optional[int] = None,
                 input_width: Optional[int] = None, label_width: Optional[int] = None):
        self.pad = pad_token_id
        self.kind = kind
        self.decoder_start = decoder_start_token_id
        self.input_width, self.label_width = input_width, label_width  # set: pad to these fixed widths

    def __call__(self, features: list[Features]) -> dict[str, torch.Tensor]:
        batch = {}
        width = max([len(f.input_ids) for f in features] + [self.input_width or 0])
        batch["input_ids"] = torch.tensor([f.input_ids + [self.pad] * (width - len(f.input_ids)) for f in features])
        batch["attention_mask"] = torch.tensor([[1] * len(f.input_ids) + [0] * (width - len(f.input_ids))
                                                for f in features])
        lwidth = max([len(f.labels) for f in features] + [self.label_width or 0])
        if self.kind == ModelKind.causal:
            lwidth = width  # labels line up with the inputs
        labels = torch.tensor([f.labels + [IGNORE_INDEX] * (lwidth - len(f.labels)) for f in features])
        batch["labels"] = labels
        if self.kind == ModelKind.seq2seq:
            dec = labels.new_full(labels.shape, self.pad)
            dec[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, self.pad)
            dec[:, 0] = self.decoder_start
            batch["decoder_input_ids"] = dec
        return batch


def left_pad(prompts: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for causal generation (new tokens then line up at the right)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return {"input_ids": ids, "attention_mask": mask}


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


def fold_indices(n: int, k: int, seed: int) -> list[list[int]]:
    """Indices 0..n-1 shuffled (seeded) and dealt into k folds of near-equal size."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [sorted(order[f::k]) for f in range(k)]
