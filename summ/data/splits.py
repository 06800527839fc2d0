"""Train, dev and test for the configured source (bundled sample, competition CSVs, synthetic),
and the folds of K-fold training."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from summ.config import DataConfig, DataSource
from summ.data.samples import Sample, bundled_sample_dir, read_csv
from summ.data.synthetic import generate
from summ.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Splits:
    train: list[Sample]
    dev: list[Sample]
    test: list[Sample]


def load_splits(cfg: DataConfig, need_train: bool = True) -> Splits:
    """Load train/dev/test for the configured source, then apply max_train/max_eval_samples.
    `need_train=False` (predict): a missing train file is an empty training set, not an error."""
    if cfg.source == DataSource.synthetic:
        train = generate(cfg.synthetic_train_size, seed=cfg.synthetic_seed, prefix="train")
        dev = generate(cfg.synthetic_eval_size, seed=cfg.synthetic_seed + 1, prefix="dev")
        test = [
            Sample(s.fname, s.dialogue)
            for s in generate(cfg.synthetic_eval_size, seed=cfg.synthetic_seed + 2, prefix="test")
        ]
    else:
        folder = bundled_sample_dir() if cfg.source == DataSource.bundled else Path(cfg.dir).expanduser()
        if not folder.is_dir():
            what = "is a file, not a folder" if folder.exists() else "does not exist"
            raise DataError(
                f"data.dir={cfg.dir} {what}: set data.dir to the folder that holds "
                f"{cfg.train_file}, {cfg.dev_file} and {cfg.test_file}"
            )
        train_path = folder / cfg.train_file
        if train_path.resolve() == (folder / cfg.dev_file).resolve():
            raise DataError(
                f"data.train_file and data.dev_file are the same file ({train_path}): the dev ROUGE would "
                f"score the samples the model trained on; give the dev set its own file"
            )
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
    seen = {s.dialogue for s in train}
    shared = sum(s.dialogue in seen for s in dev)
    if shared:
        log.warning(
            "data: %d of %d dev dialogues are also in the training set: their ROUGE measures recall of "
            "training samples, not summarising",
            shared,
            len(dev),
        )
    return Splits(train=train, dev=dev, test=test)


def fold_indices(n: int, k: int, seed: int) -> list[list[int]]:
    """Indices 0..n-1 shuffled (seeded) and dealt into k folds of near-equal size."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [sorted(order[f::k]) for f in range(k)]
