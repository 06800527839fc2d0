"""K-fold: K members on K splits, out-of-fold predictions, per-fold figures and an ensemble."""

from __future__ import annotations

import csv

import pytest

from summ.data.splits import fold_indices


def test_folds_are_disjoint_and_cover_everything():
    folds = fold_indices(23, 4, seed=0)
    assert sorted(i for f in folds for i in f) == list(range(23))
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    assert fold_indices(23, 4, seed=0) == folds and fold_indices(23, 4, seed=1) != folds


@pytest.mark.parametrize("strategy", ["mbr", "weighted", "stacking", "logit_avg"])
def test_two_folds_with_an_ensemble(run_job, strategy):
    decoding = "inference.num_beams=2" if strategy == "stacking" else "inference=greedy"  # stacking learns from beams
    m, out = run_job(
        "train.k_folds=2",
        f"ensemble.strategy={strategy}",
        "measure.steps=2",
        "eval.generate=true",
        decoding,
        "inference.max_new_tokens=12",
        "data.max_eval_samples=6",
        "data.max_train_samples=40",
    )
    assert m["status"] == "ok", m["error"]
    assert [f["fold"] for f in m["folds"]] == [0, 1] and all(f["status"] == "ok" for f in m["folds"])
    assert m["kfold"]["k"] == 2 and m["kfold"]["rouge_mean"]["mean"] is not None
    assert m["eval"]["ensemble"]["strategy"] == strategy and m["eval"]["n"] == 6
    assert (m["eval"]["ensemble"]["weights"] is not None) == (strategy == "weighted")
    oof = [[r["fname"] for r in csv.DictReader((out / f"fold_{k}" / "oof_predictions.csv").open())] for k in (0, 1)]
    assert not set(oof[0]) & set(oof[1]) and len(oof[0]) + len(oof[1]) == 40
    assert len(list(csv.DictReader((out / "dev_predictions.csv").open()))) == 6
    if strategy == "stacking":
        info = m["eval"]["ensemble"]["stacking"]
        assert info["train_dialogues"] == 40 and set(info["features"]) >= {"agreement", "length_vs_median"}


def test_a_finished_member_leaves_the_device_before_the_next_fold_trains(run_job, monkeypatch):
    """logit_avg keeps every member for the ensemble: in host memory while the other folds train (on a
    GPU, K models' weights would otherwise crowd the folds after the first), on the device only for
    the ensemble's decoding."""
    from summ.training import kfold
    from summ.training.loop import Job

    events = []
    setup, moved = Job.setup, kfold.moved
    monkeypatch.setattr(Job, "setup", lambda job: events.append("fold starts") or setup(job))
    # after a fold the member goes to "cpu"; for the ensemble, to the Accelerator's device (a torch.device)
    monkeypatch.setattr(
        kfold,
        "moved",
        lambda model, device: (
            events.append("to host" if device == "cpu" and isinstance(device, str) else "to device")
            or moved(model, device)
        ),
    )
    m, _ = run_job(
        "train.k_folds=3",
        "ensemble.strategy=logit_avg",
        "measure.steps=1",
        "eval.generate=true",
        "inference=greedy",
        "inference.max_new_tokens=4",
        "data.max_eval_samples=2",
        "data.max_train_samples=30",
    )
    assert m["status"] == "ok", m["error"]
    assert events == ["fold starts", "to host"] * 3 + ["to device"] * 3


def test_stacking_selector_learns_which_feature_predicts_rouge():
    from summ.inference.ensemble import fit_selector, stack_select

    # references reward the candidate that agrees with the others; a lone outlier scores 0
    groups = []
    for k in range(20):
        cands = [
            f"#Person1#은 {k}번 회의를 준비합니다.",
            f"#Person1#은 {k}번 회의를 준비합니다 내일.",
            "전혀 다른 이야기",
        ]
        groups.append((cands, [0.8, 0.7, 0.0]))
    w = fit_selector(groups)
    assert stack_select(["엉뚱한 말", "#Person2#는 예약을 바꿉니다.", "#Person2#는 예약을 바꿉니다 오늘."], w) in (1, 2)


@pytest.mark.parametrize("model", ["tiny_bart", "tiny_llama"])
def test_logit_average_of_identical_members_is_the_member(model):
    """Averaging a model with itself must not change its beam search output."""
    import torch
    from accelerate import Accelerator
    from omegaconf import OmegaConf

    from summ.data.splits import load_splits
    from summ.data.tokenize import Encoder
    from summ.inference import evaluate
    from summ.modeling import models
    from tests.conftest import compose_cfg

    cfg = OmegaConf.to_object(compose_cfg([f"model={model}", "inference.num_beams=3", "inference.max_new_tokens=8"]))
    tok = models.load_tokenizer(cfg.model)
    lm = models.load(cfg.model, tok, 0, torch.device("cpu")).model.eval()
    enc = Encoder(tok, cfg.model.kind, cfg.model.prompt_template, 64, 16)
    dev = load_splits(cfg.data).dev[:4]
    acc = Accelerator(cpu=True)
    alone, _ = evaluate.generate(acc, lm, dev, enc, tok, cfg.inference, cfg.model.kind, 4)
    paired, _ = evaluate.generate(acc, lm, dev, enc, tok, cfg.inference, cfg.model.kind, 4, co_members=[lm])
    assert paired == alone
    other = models.load(cfg.model, tok, 7, torch.device("cpu")).model.eval()  # another init: other beliefs
    mixed, _ = evaluate.generate(acc, lm, dev, enc, tok, cfg.inference, cfg.model.kind, 4, co_members=[other])
    assert mixed != alone


def test_ensemble_across_runs(run_job, capsys):
    from summ.inference.ensemble import main

    runs = []
    for seed in (1, 2):
        m, out = run_job(
            "measure.steps=2",
            f"train.seed={seed}",
            "eval.generate=true",
            "inference=greedy",
            "inference.max_new_tokens=10",
            "data.max_eval_samples=5",
        )
        assert m["status"] == "ok"
        runs.append(str(out))
    assert main(["--strategy", "weighted", *runs]) == 0
    report = capsys.readouterr().out
    assert "**ensemble**" in report and runs[0] in report and runs[1] in report
    assert main([runs[0], runs[0] + "_missing"]) == 2
    capsys.readouterr()
    for one in ([runs[0]], [runs[0], runs[0] + "/"]):  # "Ensemble (mbr) of 1 runs", exit 0, before
        assert main(one) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: an ensemble needs at least two runs and this is one") and err.count("\n") == 1
