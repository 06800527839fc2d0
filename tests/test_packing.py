"""data.packing: packed rows change the layout, never the samples, the loss or the gradients, and no
token attends across a sample boundary; refused where it cannot keep samples apart."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from omegaconf import OmegaConf

from summ.config import ModelKind
from summ.data.packing import PackingCollator, rows_for
from summ.data.samples import bundled_sample_dir, read_csv
from summ.data.tokenize import Collator, Encoder
from summ.errors import ConfigError
from summ.modeling import models
from summ.modeling.checks import check_packed_rows_isolated
from summ.modeling.loss import model_inputs, summed_token_loss

from .conftest import assert_one_error_line, cli, compose_cfg, launch_two_processes


@pytest.mark.parametrize("cap", [None, 40, 64, 1000])
def test_rows_hold_every_sample_once_within_the_cap_and_balanced(cap):
    lengths = [37, 5, 22, 40, 13, 8, 31, 19]
    rows = rows_for(lengths, cap)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    sizes = [sum(lengths[i] for i in row) for row in rows]
    if cap is None or sum(lengths) <= cap:
        assert len(rows) == 1
    else:
        assert max(sizes) <= cap
        assert len(rows) <= -(-sum(lengths) // cap) + 1  # the fewest rows, or one more where they cannot balance
    assert all(row == sorted(row) for row in rows)  # micro-batch order kept within a row


def test_a_sample_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="longer than a packed row of 10"):
        rows_for([4, 12], 10)


def _model_and_features(attention: str, n: int = 6):
    c = OmegaConf.to_object(
        compose_cfg(
            [
                "model=tiny_llama",
                f"model.attn_implementation={attention}",
                "model.tiny.dropout=0",
                "model.lora.dropout=0",
            ]
        )
    )
    tok = models.load_tokenizer(c.model)
    model = models.load(c.model, tok, 0, torch.device("cpu")).model
    encoder = Encoder(tok, ModelKind.causal, c.model.prompt_template, 160, 32)
    samples = read_csv(bundled_sample_dir() / "train.csv", need_summary=True)[:n]
    return model, tok, encoder.encode_all(samples)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    logits = model(**model_inputs(batch)).logits
    loss = summed_token_loss(logits, batch["labels"], ModelKind.causal, label_tokens=batch["counts"].label_tokens)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("attention", ["sdpa", "sdpa_varlen", "eager"])
@pytest.mark.parametrize("cap", [None, 400])
def test_packed_and_padded_batches_give_the_same_loss_and_gradients(attention, cap):
    model, tok, features = _model_and_features(attention)
    padded, packed = (
        Collator(tok.pad_token_id, ModelKind.causal)(features),
        PackingCollator(tok.pad_token_id, cap)(features),
    )
    assert packed["counts"].label_tokens == padded["counts"].label_tokens  # the loss's divisor is the same
    assert (
        packed["counts"].tokens == padded["counts"].tokens and packed["counts"].pad_tokens < padded["counts"].pad_tokens
    )
    assert "attention_mask" not in packed and (packed["input_ids"].shape[0] == 1) == (cap is None)
    loss_padded, grads_padded = _loss_and_grads(model, padded)
    loss_packed, grads_packed = _loss_and_grads(model, packed)
    assert loss_packed == pytest.approx(loss_padded, rel=1e-5)
    for name, g in grads_padded.items():
        scale = float(g.abs().max())
        assert float((grads_packed[name] - g).abs().max()) <= 1e-4 * scale + 1e-9, name


@pytest.mark.parametrize("attention", ["sdpa", "sdpa_varlen", "eager"])
def test_no_token_attends_across_a_sample_boundary(attention):
    """Perturb one sample of a packed row: every other sample's logits stay where they were."""
    model, tok, features = _model_and_features(attention, n=3)
    collate = PackingCollator(tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        before = model(**model_inputs(collate(features))).logits[0]
        changed = list(features)
        changed[1] = dataclasses.replace(changed[1], input_ids=[(i * 7 + 3) % 500 + 3 for i in changed[1].input_ids])
        after = model(**model_inputs(collate(changed))).logits[0]
    n0, n1 = len(features[0].input_ids), len(features[1].input_ids)
    torch.testing.assert_close(after[:n0], before[:n0])  # the one before it
    torch.testing.assert_close(after[n0 + n1 :], before[n0 + n1 :])  # the one after it
    assert not torch.allclose(after[n0 : n0 + n1], before[n0 : n0 + n1])  # the perturbed one did move


def test_an_attention_that_lets_packed_samples_mix_is_refused(monkeypatch):
    """The setup's check on the model itself: a model that ignores position_ids' restarts (here
    made so by dropping them) is refused, naming the model type and attention."""
    model, _, _ = _model_and_features("sdpa", n=1)
    check_packed_rows_isolated(model, model.config, torch.device("cpu"), "sdpa")  # transformers' Llama keeps them apart
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda **kw: forward(**{k: v for k, v in kw.items() if k != "position_ids"}))
    with pytest.raises(ConfigError, match="llama with attn_implementation=sdpa lets samples packed in one row attend"):
        check_packed_rows_isolated(model, model.config, torch.device("cpu"), "sdpa")


def test_packing_an_encoder_decoder_is_refused_with_one_line(tmp_path):
    proc = cli("data.packing=true", "measure.steps=1", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_error_line(proc, "data.packing=true packs causal LMs only, and model.kind=seq2seq", 2)


def test_a_row_cap_below_the_longest_sample_is_refused(run_job):
    with pytest.raises(ConfigError, match="data.max_packed_len=16 is shorter than the longest training sample"):
        run_job("model=tiny_llama", "data.packing=true", "data.max_packed_len=16", "measure.steps=1")


def test_packing_changes_the_layout_not_the_samples_or_the_update(tmp_path):
    """The issue's acceptance, as typed: the same samples in each micro-batch, the losses of steps 1-3
    within 1e-4, and almost no padding."""
    common = ["model=tiny_llama", "data=synthetic", "measure.steps=3", "eval.enabled=false"]
    runs = {}
    for packing in ("false", "true"):
        folder = tmp_path / packing
        cli(*common, f"data.packing={packing}", f"hydra.run.dir={folder}", code=0)
        history = [json.loads(line) for line in (folder / "train_history.jsonl").read_text().splitlines()]
        runs[packing] = (json.loads((folder / "metrics.json").read_text()), history)
    (plain, plain_steps), (packed, packed_steps) = runs["false"], runs["true"]
    assert packed["train"]["samples"] == plain["train"]["samples"]
    assert packed["train"]["tokens"] == plain["train"]["tokens"]  # the same samples, so the same real tokens
    for a, b in zip(plain_steps, packed_steps, strict=True):  # each step read the same real tokens
        assert round(b["tokens_per_s"] * b["step_time_s"]) == round(a["tokens_per_s"] * a["step_time_s"])
    for a, b in zip(plain_steps[:3], packed_steps[:3], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert packed["train"]["pad_fraction"] < 0.05 < plain["train"]["pad_fraction"]


@pytest.mark.parametrize("model,packing", [("tiny_llama", "choice(true,false)"), ("tiny_bart", "choice(false)")])
def test_the_levers_search_packs_only_where_the_model_can(model, packing):
    """preset=optuna_levers searches packing for causal LMs; an encoder-decoder, which refuses it, searches without."""
    cfg = compose_cfg(["preset=optuna_levers", f"model={model}"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)
    assert params["data.packing"] == packing
    assert params["train.optimizer"].startswith("choice(adamw,adafactor,adamw_8bit")  # bitsandbytes is installed here


@pytest.mark.slow
def test_packing_and_an_8bit_optimizer_under_a_two_process_launch(tmp_path):
    """The isolation check runs through DDP's wrapper on both processes, and the 8-bit state steps
    under it: the launch ends ok with no padding."""
    _, run = launch_two_processes(
        tmp_path,
        "model=tiny_llama",
        "data.packing=true",
        "train.optimizer=adamw_8bit",
        "measure.steps=3",
        "eval.enabled=false",
    )
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "ok" and m["num_processes"] == 2 and m["optimizer"] == "adamw_8bit"
    assert m["train"]["pad_fraction"] == 0.0 and m["train"]["samples"] == 3 * 16
