"""Result files get the mode an ordinary write gives (item 15), and a report a person annotated or
protected is never replaced in place nor has its permissions changed (item 13)."""

from __future__ import annotations

import json
import os
import stat

import pytest

from summ.files import atomic_write_json, atomic_write_text
from summ.reports.knee_report import build_report, main

from .conftest import job_folder


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda value: os.umask(value)
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664), (0o000, 0o666)])
def test_a_new_result_file_gets_the_umasks_mode(tmp_path, umask, mask, expected):
    umask(mask)
    atomic_write_text(tmp_path / "a.txt", "x")
    atomic_write_json(tmp_path / "b" / "metrics.json", {"a": 1})
    assert mode(tmp_path / "a.txt") == expected and mode(tmp_path / "b" / "metrics.json") == expected


def test_a_replaced_file_keeps_its_mode(tmp_path, umask):
    path = tmp_path / "metrics.json"
    path.write_text("{}")
    path.chmod(0o640)
    atomic_write_json(path, {"a": 2})
    assert mode(path) == 0o640 and json.loads(path.read_text()) == {"a": 2}


def test_a_runs_results_are_readable_by_the_group_and_others(run_job, umask):
    umask(0o022)
    m, out = run_job("measure.steps=1", "eval.generate=true", "data.max_eval_samples=2", "train.save_model=false")
    assert m["status"] == "ok"
    for name in ("metrics.json", "dev_predictions.csv", "train_history.jsonl"):
        assert mode(out / name) == 0o644, name


def sweep(root, n=3):
    for i in range(n):
        bs = 2 ** (i + 1)
        metrics = {
            "status": "ok",
            "model": "kobart",
            "batch_size": bs,
            "gradient_accumulation_steps": 1,
            "effective_batch_size": bs,
            "train": {"samples_per_s": 10.0 + i, "samples": 64},
            "memory": {"peak_bytes": (i + 1) * 2**20},
        }
        job_folder(root, i, [f"batch.batch_size={bs}"], metrics)


def test_a_report_as_summ_wrote_it_is_rewritten_in_place(tmp_path):
    sweep(tmp_path)
    build_report(tmp_path)
    build_report(tmp_path)
    assert not list(tmp_path.glob("*.earlier*"))


def test_an_annotated_report_is_kept_beside_the_new_one(tmp_path, caplog):
    sweep(tmp_path)
    build_report(tmp_path)
    report = tmp_path / "knee_report.md"
    annotated = report.read_text().replace("## Cells", "Our note: bs 4 is what we run.\n\n## Cells")
    report.write_text(annotated)
    assert main([str(tmp_path)]) == 0
    assert (tmp_path / "knee_report.earlier.md").read_text() == annotated
    assert "Our note" not in report.read_text() and "kept as knee_report.earlier.md" in caplog.text


@pytest.mark.parametrize("name", ["knee_report.md", "sweep.csv"])
def test_a_read_only_report_is_moved_aside_with_its_mode(tmp_path, umask, name):
    umask(0o022)
    sweep(tmp_path)
    build_report(tmp_path)
    path = tmp_path / name
    before = path.read_text()
    path.chmod(0o444)
    build_report(tmp_path)
    kept = path.with_name(f"{path.stem}.earlier{path.suffix}")
    assert kept.read_text() == before and mode(kept) == 0o444  # permissions never changed
    assert mode(path) == 0o644
    path.chmod(0o444)
    build_report(tmp_path)  # and again: beside the first, nothing overwritten
    assert path.with_name(f"{path.stem}.earlier_2{path.suffix}").is_file() and kept.read_text() == before
