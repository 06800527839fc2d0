"""K-fold: K members on K splits, out-of-fold predictions, per-fold figures and an ensemble."""
from __future__ import annotations

import csv

import pytest

from summ.data import fold_indices


def test_folds_are_disjoint_and_cover_everything():
    folds = fold_indices(23, 4, seed=0)
    assert sorted(i for f in folds for i in f) == list(range(23))
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    assert fold_indices(23, 4, seed=0) == folds and fold_indices(23, 4, seed=1) != folds


@pytest.mark.parametrize("strategy", ["mbr", "weighted"])
def test_two_folds_with_an_ensemble(run_job, strategy):
    m, out = run_job("train.k_folds=2", f"ensemble.strategy={strategy}", "measure.steps=2", "eval.generate=true",
                     "inference=greedy", "inference.max_new_tokens=12", "data.max_eval_samples=6",
                     "data.max_train_samples=40")
    assert m["status"] == "ok", m["error"]
    assert [f["fold"] for f in m["folds"]] == [0, 1] and all(f["status"] == "ok" for f in m["folds"])
    assert m["kfold"]["k"] == 2 and m["kfold"]["rouge_mean"]["mean"] is not None
    assert m["eval"]["ensemble"]["strategy"] == strategy and m["eval"]["n"] == 6
    assert (m["eval"]["ensemble"]["weights"] is None) == (strategy == "mbr")
    oof = [[r["fname"] for r in csv.DictReader((out / f"fold_{k}" / "oof_predictions.csv").open())] for k in (0, 1)]
    assert not set(oof[0]) & set(oof[1]) and len(oof[0]) + len(oof[1]) == 40
    assert len(list(csv.DictReader((out / "dev_predictions.csv").open()))) == 6
