"""sweep.reuse_loaded: the cells of one sweep process share the prepared data and the loaded model,
and each cell still measures what it would in a fresh process (issue 16's acceptance)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from .conftest import cli

# Five optimizer steps, the probe after the third, no evaluation: "loss after 5 steps".
SHORT = ["sweep.trial_samples=null", "train.max_steps=5", "measure.warmup_steps=3"]


def multirun(folder: Path, *overrides: str) -> list[dict]:
    """`python run.py -m OVERRIDES` in its own process; the cells' metrics in launch order."""
    cli("-m", *SHORT, *overrides, f"hydra.sweep.dir={folder}", timeout=600, code=0)
    cells = sorted((p for p in folder.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    return [
        json.loads((c / "metrics.json").read_text())
        | {"log": (c / "run.log").read_text(), "cfg": OmegaConf.load(c / ".hydra" / "config.yaml")}
        for c in cells
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "model",
    [["model=tiny_bart"], ["model=tiny_llama", "model.quantization=4bit"]],
    ids=["tiny_bart", "tiny_llama_qlora"],
)
def test_a_reused_third_cell_measures_what_a_fresh_process_does(tmp_path, model):
    sweep = multirun(tmp_path / "sweep", *model, "batch.batch_size=2,4,8")
    (fresh,) = multirun(tmp_path / "fresh", *model, "batch.batch_size=8")
    third = sweep[2]
    assert sweep[0]["reused"] == {"data": False, "model": False}
    assert third["reused"] == {"data": True, "model": True} and fresh["reused"] == {"data": False, "model": False}
    assert "sweep.reuse_loaded: data reused from an earlier cell, model reused from an earlier cell" in third["log"]
    assert third["train"]["total_optimizer_steps"] == fresh["train"]["total_optimizer_steps"] == 5
    assert abs(third["train"]["final_loss"] - fresh["train"]["final_loss"]) <= 1e-6
    # the kept weights are counted as a fresh process counts them, and nothing an earlier cell left
    assert third["memory"]["weights_bytes"] == fresh["memory"]["weights_bytes"] > 0
    ratio = third["memory"]["peak_bytes"] / fresh["memory"]["peak_bytes"]
    assert 0.97 <= ratio <= 1.03, (third["memory"], fresh["memory"])


@pytest.mark.slow
def test_a_cell_that_changes_the_model_loads_it_afresh(tmp_path):
    # per quantization: LoRA rank 8 (loaded), 8 again (kept), 4 (another shape: loaded)
    cells = multirun(
        tmp_path / "s",
        "model=tiny_llama",
        "batch.batch_size=2",
        "train.max_steps=4",
        "measure.memory_probe=false",
        "model.quantization=4bit,none",
        "model.lora.r=8,8,4",
    )
    shapes = [(c["cfg"].model.quantization, c["cfg"].model.lora.r) for c in cells]
    assert len(cells) == 6 and len(set(shapes)) == 4
    expected = [i > 0 and shapes[i - 1] == shape for i, shape in enumerate(shapes)]
    assert [c["reused"]["model"] for c in cells] == expected
    assert expected.count(True) == 2  # the same shape after itself, once per quantization
    assert all(c["reused"]["data"] for c in cells[1:])  # the data does not depend on the model's shape
    for cell, hit in zip(cells, expected):
        assert ("model reused from an earlier cell" if hit else "model loaded") in cell["log"]


def test_reuse_off_loads_every_cell(tmp_path):
    cells = multirun(
        tmp_path / "s",
        "model=tiny_bart",
        "batch.batch_size=2,2",
        "sweep.reuse_loaded=false",
        "train.max_steps=4",
        "measure.memory_probe=false",
    )
    assert [c["reused"] for c in cells] == [None, None]
    assert "sweep.reuse_loaded" not in cells[1]["log"]
