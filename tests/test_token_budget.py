"""batch.max_tokens: micro-batches filled to a budget of padded positions. Every sample once per
epoch within the budget, whole optimizer steps, the same samples in every cell's window, a probe
that no micro-batch of the budget outweighs; the knee grid, report and sweeper in budgets."""

from __future__ import annotations

import json
import logging
import random
from collections import Counter

import pytest

from summ.config import ModelKind
from summ.data.packing import PackingCollator
from summ.data.sampler import EpochSampler, TokenBatches, Window, whole_steps
from summ.data.tokenize import Collator
from summ.errors import ConfigError
from summ.reports.cells import Cell
from summ.reports.knee import analyse
from summ.reports.memory_report import memory_model_section
from summ.reports.why import why_lines
from summ.training.probe import budget_worst_batches

from .conftest import ROOT, assert_one_error_line, cli, compose_cfg, launch_two_processes

# lengths shaped like the competition's dialogues (inputs 40-512 tokens, summaries 10-100)
_rng = random.Random(7)
INPUTS = [min(512, int(_rng.lognormvariate(5.3, 0.45))) for _ in range(600)]
LABELS = [min(100, max(10, int(n * _rng.uniform(0.1, 0.25)))) for n in INPUTS]
COLLATORS = {
    "causal": Collator(0, ModelKind.causal),
    "seq2seq": Collator(0, ModelKind.seq2seq, 2),
    "packed": PackingCollator(0),
}


def _batches(collator, budget, per_step, window=None, seed=0, inputs=INPUTS):
    sampler = EpochSampler(inputs, seed=seed, window=window)
    return TokenBatches(sampler, LABELS[: len(inputs)], collator.budget_positions, budget, per_step)


def _positions(collator, batch):
    return collator.positions([INPUTS[j] for j in batch], [LABELS[j] for j in batch])


@pytest.mark.parametrize("kind", list(COLLATORS))
@pytest.mark.parametrize("budget,per_step", [(1024, 1), (2048, 3), (8192, 2)])
def test_every_sample_once_per_epoch_within_the_budget_in_whole_steps(kind, budget, per_step):
    collator, tb = COLLATORS[kind], _batches(COLLATORS[kind], budget, per_step)
    for epoch in range(3):
        batches = tb.batches(epoch)
        assert sorted(j for b in batches for j in b) == list(range(len(INPUTS)))
        assert len(batches) % per_step == 0
        assert max(_positions(collator, b) for b in batches) <= budget
    assert tb.batches(0) == _batches(collator, budget, per_step).batches(0)  # known in advance
    assert tb.batches(0) != tb.batches(1)  # shuffled between epochs
    tb.set_epoch(2)
    assert list(tb) == tb.batches(2) and len(tb) == len(tb.batches(2))
    # cut from length-sorted buckets: far less padding than the same samples in arrival order
    padded = sum(_positions(collator, b) for b in tb.batches(0))
    assert padded < 1.15 * sum(INPUTS if kind != "seq2seq" else map(sum, zip(INPUTS, LABELS)))


def test_whole_steps_halves_the_largest_micro_batches_and_keeps_every_sample():
    batches = [[0, 1, 2, 3], [4], [5, 6]]
    made = whole_steps(batches, 2)
    assert len(made) == 4 and sorted(j for b in made for j in b) == list(range(7))
    assert made[0] == [0, 1] and made[1] == [2, 3]
    assert whole_steps([[0], [1], [2]], 2) == [[0], [1]]  # nothing left to halve: the last is dropped


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_every_cell_of_a_sweep_measures_the_same_samples(kind):
    """A trial's warm-up and measured samples do not depend on the budget or the accumulation."""
    window = Window(warmup=64, measured=192)
    reference = EpochSampler(INPUTS, seed=0, window=window).parts(0)
    for budget in (1024, 4096, 16384):
        for per_step in (1, 2, 4):
            warm, measured = _batches(COLLATORS[kind], budget, per_step, window).part_batches(0)
            assert Counter(j for b in warm for j in b) == Counter(reference[0])
            assert Counter(j for b in measured for j in b) == Counter(reference[1])
            assert len(warm) % per_step == 0 and len(measured) % per_step == 0


def _point(collator, batch):
    """(padded positions, positions x the padded width per sample): what memory grows with."""
    p = _positions(collator, batch)
    return p, p * p / len(batch)


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
@pytest.mark.parametrize("budget", [1024, 4096])
def test_no_micro_batch_of_the_budget_outweighs_the_probe(kind, budget):
    """Whatever memory costs per position and per attention score (a, b >= 0), some probe
    micro-batch costs at least as much as every micro-batch ten epochs cut."""
    collator = COLLATORS[kind]
    probes = [_point(collator, b) for b in budget_worst_batches(INPUTS, LABELS, collator, budget)]
    assert all(p <= budget for p, _ in probes)
    tb = _batches(collator, budget, 1)
    seen = [_point(collator, b) for epoch in range(10) for b in tb.batches(epoch)]
    for angle in range(0, 91, 5):
        a, b = 1.0, (angle / 90) / 512  # from positions alone to mostly attention
        assert max(a * p + b * s for p, s in probes) >= max(a * p + b * s for p, s in seen)
    if kind == "causal":  # positions are samples x the head's width: the fullest is exact
        assert max(p for p, _ in probes) >= max(p for p, _ in seen)


def test_a_token_budget_run_reports_its_budget_and_keeps_its_micro_batches_within_it(run_job, caplog):
    caplog.set_level(logging.INFO)
    m, _ = run_job("model=tiny_llama", "batch.max_tokens=1024", "measure.steps=3", "eval.enabled=false")
    assert m["status"] == "ok", m["error"]
    assert m["max_tokens"] == 1024 and m["batch_size"] is None and m["effective_batch_size"] is None
    t = m["train"]
    assert 0 < t["max_micro_batch_positions"] <= 1024 and 0 < m["memory"]["probe_positions"] <= 1024
    assert t["samples"] > 3  # several samples a micro-batch, as many as the budget holds
    assert "1024 tokens x accumulation 1" in caplog.text and "memory probe: a micro-batch of" in caplog.text


def test_a_budget_of_packed_rows_has_no_padding(run_job):
    m, _ = run_job("model=tiny_llama", "data.packing=true", "batch.max_tokens=1024", "measure.steps=2")
    assert m["status"] == "ok", m["error"]
    assert m["train"]["pad_fraction"] == 0.0 and m["train"]["max_micro_batch_positions"] <= 1024


def test_two_budgets_and_accumulations_measure_the_same_samples(run_job):
    window = ["model=tiny_llama", "measure.samples=48", "measure.warmup_samples=8", "eval.enabled=false"]
    a, _ = run_job(*window, "batch.max_tokens=768", "batch.gradient_accumulation_steps=1")
    b, _ = run_job(*window, "batch.max_tokens=2048", "batch.gradient_accumulation_steps=2")
    assert a["status"] == b["status"] == "ok"
    assert a["train"]["samples"] == b["train"]["samples"] == 48
    assert a["train"]["tokens"] == b["train"]["tokens"]
    assert a["train"]["optimizer_steps"] > b["train"]["optimizer_steps"]


def test_a_budget_below_the_longest_sample_is_refused(tmp_path):
    proc = cli("model=tiny_llama", "batch.max_tokens=64", "measure.steps=1", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_error_line(proc, "batch.max_tokens=64 is below the longest training sample", 2)


def test_a_budget_and_an_effective_batch_contradict():
    from summ.validation import validate

    with pytest.raises(ConfigError, match="batch.max_tokens=2048 fills micro-batches by positions"):
        validate(compose_cfg(["batch.max_tokens=2048", "batch.effective_batch_size=32"]))


def test_the_knee_tokens_preset_sweeps_budgets():
    from omegaconf import OmegaConf

    cfg = compose_cfg(["preset=knee_tokens"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert set(params) == {"batch.max_tokens", "batch.gradient_accumulation_steps"}
    assert cfg.data.name == "synthetic" and cfg.sweep.trial_samples == 1024


def _cell(budget, ga, sps, peak_mib, pad=0.05, samples_per_step=None):
    steps = 20
    mean = samples_per_step or budget * ga / 180
    return Cell(
        job=f"{budget}x{ga}",
        overrides=[f"batch.max_tokens={budget}", f"batch.gradient_accumulation_steps={ga}"],
        status="ok",
        model="tiny_bart",
        max_tokens=budget,
        gradient_accumulation_steps=ga,
        samples_per_s=sps,
        samples=round(mean * steps),
        optimizer_steps=steps,
        seconds_per_sample=1 / sps,
        peak_bytes=int(peak_mib * 2**20),
        budget_bytes=24 * 2**30,
        limit_bytes=int(21.6 * 2**30),
        positions=budget,
        probe_positions=budget,
        probe_peak_bytes=int(peak_mib * 2**20),
        observed_peak_bytes=int(peak_mib * 2**20) - 1,
        pad_fraction=pad,
    )


def test_the_knee_report_reads_budgets_as_its_size():
    cells = [
        _cell(1024, 1, 61.5, 70),
        _cell(2048, 1, 64.0, 135),
        _cell(4096, 1, 58.0, 270, pad=0.13),
        _cell(1024, 2, 61.0, 70),
        _cell(2048, 2, 62.0, 135),
    ]
    a = analyse(cells, 0.05)
    assert a.by_tokens and a.recommended.max_tokens == 1024
    assert a.reason.startswith("1024-token micro-batches x accumulation 1 (1024 tokens a step, a mean")
    lines = why_lines(cells, 0.05)
    assert any(
        line.startswith("batch.max_tokens 2048 -> 4096 at accumulation 1: per-sample cost rose") for line in lines
    )
    assert any(line.startswith("2048 tokens a step as 1024 tokens x 2 -> 2048 tokens x 1") for line in lines)
    assert "padding: 5% -> 13%" in next(line for line in lines if "2048 -> 4096 at accumulation 1" in line)
    memory = "\n".join(memory_model_section(a, ROOT))
    assert "| batch.max_tokens | predicted peak |" in memory and "| 8192 |" in memory
    assert a.memory_model.predict(8192) == pytest.approx(540 * 2**20, rel=0.02)  # the line through the budgets


@pytest.mark.slow
def test_the_knee_sweeper_searches_budgets(tmp_path):
    sweep = tmp_path / "k"
    cli(
        "-m",
        "preset=knee_search",
        f"hydra.sweep.dir={sweep}",
        "hydra.sweeper.size=max_tokens",
        "hydra.sweeper.min_batch_size=1024",
        "hydra.sweeper.max_batch_size=8192",
        "hydra.sweeper.tolerance=-1",
        "measure.memory_budget_gb=0.2",
        "data.synthetic_train_size=600",
        "sweep.trial_samples=64",
        "sweep.trial_warmup_samples=16",
        timeout=600,
        code=0,
    )
    search = json.loads((sweep / "knee_search.json").read_text())
    cells = {c["batch_size"]: c for c in search["cells"]}  # the search's size: here the budget
    lo, hi = search["last_good"], search["first_bad"]
    assert cells[lo]["status"] == "ok" and cells[hi]["status"] in ("over_budget", "oom", "predicted_over_budget")
    assert 1024 <= lo < hi <= 8192
    overrides = (sweep / "0" / ".hydra" / "overrides.yaml").read_text()
    assert "batch.max_tokens=1024" in overrides
    assert "batch.max_tokens" in (sweep / "knee_report.md").read_text()


def test_a_budgeted_sweeper_with_an_effective_batch_is_refused(tmp_path):
    proc = cli(
        "-m",
        "preset=knee_search",
        f"hydra.sweep.dir={tmp_path / 'k'}",
        "hydra.sweeper.size=max_tokens",
        "hydra.sweeper.effective_batch_size=32",
    )
    assert_one_error_line(proc, "hydra.sweeper.size=max_tokens fills micro-batches by positions", 2)


@pytest.mark.slow
def test_token_budgets_under_a_two_process_launch(tmp_path):
    """Accelerate deals the budget's micro-batches to the two processes; each step holds
    accumulation x processes of them, all within the budget."""
    _, run = launch_two_processes(
        tmp_path,
        "model=tiny_llama",
        "batch.max_tokens=1024",
        "batch.gradient_accumulation_steps=2",
        "measure.steps=2",
        "eval.enabled=false",
    )
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "ok" and m["num_processes"] == 2 and m["max_tokens"] == 1024
    assert m["train"]["micro_steps"] == 2 * 2 and 0 < m["train"]["max_micro_batch_positions"] <= 1024


def test_a_budgets_step_rates_are_read_by_positions_not_by_the_samples_a_step_holds():
    """Steps of the same positions and time, holding 3 or 12 samples: no noise, so no spread."""
    from summ.measure.timing import StepTimer

    timer = StepTimer(warmup_steps=0)
    for samples in (3, 12, 6, 3, 12):
        timer.add_step(0.5, samples, tokens=1000, pad_tokens=24)
    low, high = timer.summary()["samples_per_s_interval"]
    assert low == pytest.approx(high) == pytest.approx(36 / (5 * 0.5))


def test_a_budgets_step_spread_is_not_read_as_a_tie():
    """A budget's steps hold micro-batches of different widths: their rates spread with the work.
    Cells 22% apart are not a tie however their per-step ranges overlap; measured again, they are
    read by their runs."""
    small, large = _cell(1024, 1, 50.0, 70), _cell(2048, 1, 64.0, 135)
    small.samples_per_s_interval = large.samples_per_s_interval = [40.0, 90.0]
    assert analyse([small, large], 0.05).recommended is large
    small.interval_of = large.interval_of = "runs"
    assert analyse([small, large], 0.05).recommended is small


def test_a_micro_batch_grid_is_still_predicted_from_a_micro_batch_of_one():
    """Only a budget's predictions start at half the smallest measured: micro-batches start at 1."""
    import dataclasses

    cells = [
        dataclasses.replace(_cell(bs * 1000, 1, 60.0, 20 * bs), max_tokens=None, batch_size=bs, effective_batch_size=bs)
        for bs in (2, 4, 8)
    ]
    memory = "\n".join(memory_model_section(analyse(cells, 0.05), ROOT))
    assert "| micro-batch | predicted peak |" in memory and "| 1 |" in memory and "| 16 |" in memory
