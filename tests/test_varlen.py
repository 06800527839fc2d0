"""model.attn_implementation=sdpa_varlen (summ/modeling/varlen.py): a packed row is attended sample
by sample, each sample's slice alone, and anything else is transformers' sdpa unchanged. The
packed loss and gradients against padded batches are held in test_packing.py (every attention)."""

from __future__ import annotations

import pytest
import torch

from summ.config import ModelKind
from summ.data.packing import PackingCollator
from summ.data.tokenize import Collator
from summ.errors import ConfigError
from summ.modeling import varlen
from summ.modeling.loss import model_inputs

from .conftest import compose_cfg
from .test_packing import _model_and_features


@pytest.fixture
def attended(monkeypatch):
    """The query lengths of every sdpa call that sdpa_varlen makes, in order."""
    from transformers.integrations import sdpa_attention

    lengths = []
    real = sdpa_attention.sdpa_attention_forward

    def recorded(module, query, *args, **kwargs):
        lengths.append(query.shape[2])
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", recorded)
    return lengths


def test_segment_bounds_follow_transformers_rule_and_are_computed_once_per_tensor():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1]])
    assert varlen.segment_bounds(positions, 1) == [[(0, 3), (3, 5), (5, 6), (6, 8)]]
    assert varlen.segment_bounds(positions, 2) == [[(0, 3), (3, 5), (5, 6), (6, 8)]] * 2  # one row, broadcast
    rows = torch.tensor([[0, 1, 2, 3], [0, 1, 0, 1]])
    assert varlen.segment_bounds(rows, 2) == [[(0, 4)], [(0, 2), (2, 4)]]
    again = rows.clone()  # the same values in another tensor: read again, not served from the last one's
    again[0, 2:] = torch.tensor([0, 1])
    assert varlen.segment_bounds(again, 2) == [[(0, 2), (2, 4)], [(0, 2), (2, 4)]]


def test_a_packed_row_is_attended_sample_by_sample(attended):
    model, tok, features = _model_and_features("sdpa_varlen", n=5)
    batch = PackingCollator(tok.pad_token_id, 400)(features)
    with torch.no_grad():
        model(**model_inputs(batch))
    bounds = varlen.segment_bounds(batch["position_ids"], batch["input_ids"].shape[0])
    one_layer = [end - start for row in bounds for start, end in row]
    assert sorted(n for n in one_layer if n > 1) != [] and len(one_layer) > batch["input_ids"].shape[0]
    assert attended == one_layer * model.config.num_hidden_layers


def test_a_packed_row_builds_no_row_by_row_mask_and_a_padded_batch_gets_sdpas(monkeypatch):
    """The mask each layer's sdpa_varlen receives: None for a packed row (its block diagonal would
    be row_len^2 booleans never read), sdpa's own 4-D mask for a padded batch."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model, tok, features = _model_and_features("sdpa_varlen", n=5)
    masks = []

    def recorded(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask)
        return varlen.sdpa_varlen_forward(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, varlen.NAME, recorded)
    with torch.no_grad():
        model(**model_inputs(PackingCollator(tok.pad_token_id)(features)))
        assert masks == [None] * model.config.num_hidden_layers
        masks.clear()
        padded = model_inputs(Collator(tok.pad_token_id, ModelKind.causal)(features))
        model(**padded)
    width = padded["input_ids"].shape[1]
    assert [tuple(m.shape) for m in masks] == [(len(features), 1, width, width)] * model.config.num_hidden_layers


def test_anything_not_packed_is_sdpa_unchanged(attended):
    """A padded batch (a padding mask, one sample a row) and generation with a KV cache give the
    same logits and tokens as sdpa, through sdpa itself: one call per layer for the whole batch."""
    plain, tok, features = _model_and_features("sdpa", n=5)
    model, _, _ = _model_and_features("sdpa_varlen", n=5)
    batch = model_inputs(Collator(tok.pad_token_id, ModelKind.causal)(features))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, plain(**batch).logits, rtol=0, atol=0)
        assert attended == [batch["input_ids"].shape[1]] * model.config.num_hidden_layers
        prompt = torch.tensor([features[0].input_ids[:20]])
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        assert model.generate(prompt, **kwargs).tolist() == plain.generate(prompt, **kwargs).tolist()


def test_sdpa_varlen_with_compile_is_refused_with_one_line():
    from summ.validation import validate

    with pytest.raises(ConfigError, match="sdpa_varlen attends a packed row sample by sample"):
        validate(compose_cfg(["model=tiny_llama", "model.attn_implementation=sdpa_varlen", "train.compile=true"]))


def test_a_packed_run_on_sdpa_varlen_trains_and_evaluates(run_job):
    """Through the whole job: loaded by name, the setup's isolation check passes, evaluation generates."""
    metrics, _ = run_job(
        "model=tiny_llama",
        "data.packing=true",
        "model.attn_implementation=sdpa_varlen",
        "measure.steps=2",
        "eval.generate=true",
        "data.max_eval_samples=4",
    )
    assert metrics["status"] == "ok" and metrics["train"]["pad_fraction"] < 0.05
    assert metrics["attention"] == "sdpa_varlen"  # as the model was built
    assert metrics["eval"]["n"] == 4 and metrics["eval"]["rouge1"] is not None


def test_a_sample_longer_than_a_sliding_window_takes_sdpas_masked_path(attended):
    """A sliding-window layer's mask (built by transformers) bounds what a token sees; a sample
    longer than the window is not attended alone without it."""
    from types import SimpleNamespace

    q = k = v = torch.randn(1, 2, 6, 4)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]])
    for window, calls in ((3, [3, 3]), (2, [6])):
        attended.clear()
        module = SimpleNamespace(is_causal=True, sliding_window=window)
        varlen.sdpa_varlen_forward(module, q, k, v, torch.ones(1, 1, 6, 6, dtype=torch.bool), position_ids=positions)
        assert attended == calls


def test_sdpa_varlen_without_packing_is_said_to_run_as_sdpa():
    from summ.validation import unused_settings

    said = unused_settings(compose_cfg(["model=tiny_llama", "model.attn_implementation=sdpa_varlen"]))
    assert any("sdpa_varlen" in line and "runs as sdpa" in line for line in said)
    packed = compose_cfg(["model=tiny_llama", "model.attn_implementation=sdpa_varlen", "data.packing=true"])
    assert not any("sdpa_varlen" in line for line in unused_settings(packed))


@pytest.mark.parametrize(
    "overrides,attention",
    [
        (["data.packing=true", "train.compile=false"], "sdpa_varlen"),
        (["data.packing=true", "train.compile=true"], None),  # refused together: whole-row sdpa
        (["data.packing=false"], None),
        (["data.packing=true", "model.attn_implementation=eager"], "eager"),  # the command line fixes one
    ],
)
def test_the_levers_search_packs_on_sdpa_varlen(overrides, attention):
    """preset=optuna_levers: each trial's attention follows its packing (no CUDA here, so not flash)."""
    cfg = compose_cfg(["preset=optuna_levers", *overrides])
    assert (None if cfg.model.attn_implementation is None else str(cfg.model.attn_implementation)) == attention


def test_the_knee_report_names_the_attention_where_cells_differ_in_it(tmp_path):
    """A preset that picks the attention per cell (no override names it): the report's settings
    and sweep.csv show the one each cell was built with, and a grid built alike does not."""
    import json

    from summ.reports.knee_report import build_report

    from .test_report import GB, job

    def cells(root, attentions):
        for i, (bs, attention) in enumerate(attentions):
            folder = job(root, i, bs, 1, sps=50.0 + i, peak=GB, positions=bs * 300)
            m = json.loads((folder / "metrics.json").read_text())
            (folder / "metrics.json").write_text(json.dumps({**m, "attention": attention}))
        return build_report(root)

    mixed = cells(tmp_path / "mixed", [(4, "sdpa"), (8, "sdpa_varlen")])
    assert "model.attn_implementation" in mixed.varied
    md = (tmp_path / "mixed" / "knee_report.md").read_text()
    assert "model.attn_implementation=sdpa_varlen" in md and "model.attn_implementation=sdpa " in md
    assert "sdpa_varlen" in (tmp_path / "mixed" / "sweep.csv").read_text().splitlines()[2]
    alike = cells(tmp_path / "alike", [(4, "sdpa"), (8, "sdpa")])
    assert "model.attn_implementation" not in alike.varied


def test_a_packed_trial_on_cuda_with_flash_attn_takes_flash_unless_it_runs_on_the_cpu(monkeypatch):
    """packed_attention on a machine with CUDA and flash-attn (both faked): flash_attention_2,
    unless train.cpu=true puts the run on the CPU, where flash is refused: sdpa_varlen there."""
    import importlib.util

    from summ.resolvers import packed_attention

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    fake = object()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: fake if name == "flash_attn" else real(name, *a))
    assert packed_attention(True, False) == packed_attention(True, True) == "flash_attention_2"
    assert packed_attention(True, False, True) == "sdpa_varlen" and packed_attention(False, False) is None
