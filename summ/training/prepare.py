"""The data one training run reads, from the config: splits loaded, a K-fold member's fold held
out, low-quality samples flagged (and left out with data.validate), augmented samples added, all tokenized."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from summ.config import Config, DataSource
from summ.data import augment, quality
from summ.data.samples import Sample
from summ.data.splits import Splits, fold_indices, load_splits
from summ.data.tokenize import Encoder, TokenizedDataset
from summ.errors import DataError
from summ.inference import tta
from summ.modeling import models
from summ.run_folder import DATA_QUALITY_FILE, write_text
from summ.training import reuse

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    splits: Splits  # train after the fold, the quality filter and augmentation; dev and test as loaded
    oof: list[Sample] = field(default_factory=list)  # a K-fold member's held-out fold
    train_ds: TokenizedDataset | None = None
    dev_ds: TokenizedDataset | None = None
    augmentation: dict | None = None  # the metrics record's report of what augmentation added
    data_quality: dict | None = None
    quality_csv: str | None = None  # data_quality.csv's text, for every run folder that uses this data


def prepare_data(cfg: Config, backend: Callable[[], object], output_dir: Path | None = None) -> PreparedData:
    """Splits, the fold, the quality filter (its data_quality.csv into `output_dir`, when given)
    and augmentation (`backend()` builds the generation backend on first use); tokenization comes
    after the tokenizer is known (`tokenize`)."""
    splits = load_splits(cfg.data)
    prepared = PreparedData(splits)
    if cfg.train.fold is not None:  # K-fold member: hold one fold out of training
        if cfg.train.k_folds > len(splits.train):  # a fold with nothing held out would still enter the ensemble
            raise DataError(
                f"train.k_folds={cfg.train.k_folds} is more than the {len(splits.train)} training "
                f"samples: some folds would hold nothing out; set train.k_folds to at most "
                f"{len(splits.train)}, or train on more samples"
            )
        held = set(fold_indices(len(splits.train), cfg.train.k_folds, cfg.train.fold_seed)[cfg.train.fold])
        prepared.oof = [s for i, s in enumerate(splits.train) if i in held]
        splits.train = [s for i, s in enumerate(splits.train) if i not in held]
    _check_quality(cfg, prepared, output_dir)
    if cfg.tta.methods and cfg.eval.enabled and cfg.eval.generate:  # refused now, not after training
        tta.usable_methods(cfg.tta, backend(), say=False)
    if cfg.augmentation.methods and cfg.augmentation.ratio > 0:
        new, prepared.augmentation = augment.augment(splits.train, cfg.augmentation, backend())
        splits.train = splits.train + new  # training only: dev and test stay as loaded
    return prepared


def _check_quality(cfg: Config, prepared: PreparedData, output_dir: Path | None) -> None:
    """Score train and dev always (the checks are cheap). data.validate=true leaves the training
    samples under the threshold out; otherwise what it would leave out is said in one warning.
    Either way the scores go to data_quality.csv whenever a sample falls under the threshold."""
    thr, splits = cfg.data.quality_threshold, prepared.splits
    if cfg.data.source == DataSource.synthetic and not cfg.data.validate:
        return  # generated text, for speed and memory only
    train_rows = quality.assess(splits.train, "train", thr)
    dev_rows = quality.assess(splits.dev, "dev", thr)
    under = [r for r in train_rows + dev_rows if not r.kept]
    if not cfg.data.validate and not under:
        return
    prepared.quality_csv = quality.to_csv(train_rows + dev_rows)
    write_quality_report(prepared, output_dir)
    where = (output_dir or Path(".")) / DATA_QUALITY_FILE
    prepared.data_quality = {
        **quality.summarize(train_rows + dev_rows),
        "threshold": thr,
        "filtered": cfg.data.validate,
    }
    if not cfg.data.validate:
        counts = Counter(f for r in under for f in r.failed)
        log.warning(
            "data: %d of %d training and %d of %d dev samples score under data.quality_threshold=%s "
            "(%s); they are used as they are: data.validate=true leaves the training ones out; see %s",
            sum(r.split == "train" for r in under),
            len(train_rows),
            sum(r.split == "dev" for r in under),
            len(dev_rows),
            thr,
            ", ".join(f"{k} {v}" for k, v in counts.most_common()),
            where,
        )
        return
    splits.train = [s for s, r in zip(splits.train, train_rows) if r.kept]
    if not splits.train:
        raise DataError(f"every training sample scored under data.quality_threshold={thr}: see {where}")


def write_quality_report(prepared: PreparedData, output_dir: Path | None) -> None:
    if output_dir is not None and prepared.quality_csv is not None:
        write_text(output_dir, DATA_QUALITY_FILE, prepared.quality_csv)


def tokenize(prepared: PreparedData, encoder: Encoder) -> None:
    prepared.train_ds = TokenizedDataset(prepared.splits.train, encoder)
    prepared.dev_ds = TokenizedDataset(prepared.splits.dev, encoder)


def data_for(
    cfg: Config, backend: Callable[[], object], output_dir: Path | None, reuse_loaded: bool
) -> tuple[PreparedData, object, Encoder, bool]:
    """(data, tokenizer, encoder, reused): prepared and tokenized for this run, or taken from an
    earlier cell of the sweep that read the same data with the same tokenizer (reuse_loaded)."""
    key = reuse.data_key(cfg) if reuse_loaded else None
    kept = reuse.take_data(key) if key else None
    if kept is not None:
        data, tokenizer, encoder = kept
        write_quality_report(data, output_dir)
        return data, tokenizer, encoder, True
    data = prepare_data(cfg, backend, output_dir)
    tokenizer = models.load_tokenizer(cfg.model)
    encoder = Encoder(
        tokenizer, cfg.model.kind, cfg.model.prompt_template, cfg.data.encoder_max_len, cfg.data.decoder_max_len
    )
    tokenize(data, encoder)
    if key:
        reuse.keep_data(key, (data, tokenizer, encoder))
    return data, tokenizer, encoder, False
