"""summ-compare (summ/reports/compare.py): one table across runs and sweeps, from hand-written job
folders and a real run."""

from __future__ import annotations

import csv
import io
import json

import pytest
import yaml

from summ.reports.compare import COLUMNS, main

GiB = 2**30


def metrics(bs=8, ga=1, status="ok", sps=None, peak=None, rouge=None, model="tiny_bart"):
    return {
        "status": status,
        "error": None if status == "ok" else f"{status} in train",
        "model": model,
        "batch_size": bs,
        "gradient_accumulation_steps": ga,
        "effective_batch_size": bs * ga,
        "train": {"samples_per_s": sps, "tokens_per_s": sps and sps * 150},
        "memory": {"peak_bytes": peak},
        "eval": {
            "rouge1": rouge,
            "rouge2": rouge and rouge / 2,
            "rougeL": rouge and rouge * 0.9,
            "rouge_mean": rouge and rouge * 0.8,
        }
        if rouge
        else None,
        "epoch_seconds_projected": sps and 12457 / sps,
    }


def run_dir(path, m=None, hydra=True, text=None):
    path.mkdir(parents=True)
    if hydra:
        (path / ".hydra").mkdir()
        (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([]))
    if text is not None:
        (path / "metrics.json").write_text(text)
    elif m is not None:
        (path / "metrics.json").write_text(json.dumps(m))
    return path


def table(capsys, *argv) -> tuple[list[dict], str]:
    assert main([str(a) for a in argv] + ["--format", "csv"]) == 0
    out = capsys.readouterr()
    return list(csv.DictReader(io.StringIO(out.out))), out.err


@pytest.fixture
def sweep(tmp_path):
    s = tmp_path / "multirun" / "2026-01-01_00-00-00"
    run_dir(s / "0", metrics(bs=4, sps=9.5, peak=3 * GiB, rouge=0.30))
    run_dir(s / "1", metrics(bs=8, sps=10.25, peak=5 * GiB // 2))
    run_dir(s / "2", metrics(bs=16, status="oom", peak=20 * GiB))
    run_dir(s / "10", metrics(bs=32, sps=100.0, peak=GiB))
    run_dir(s / "3")  # the job died before writing metrics.json
    run_dir(s / "4", text='{"status": "ok", "train": ')  # cut short
    return s


def test_a_sweep_and_a_kfold_run_in_one_table(tmp_path, sweep, capsys):
    kfold = run_dir(tmp_path / "runs" / "kfold", metrics(bs=2, sps=5.0, peak=GiB, rouge=0.4))
    for k in range(3):
        run_dir(kfold / f"fold_{k}", metrics(bs=2, sps=4.0 + k, peak=GiB, rouge=0.1), hydra=False)
    rows, err = table(capsys, sweep, kfold)
    jobs = [f"multirun/2026-01-01_00-00-00/{j}" for j in (0, 1, 2, 3, 4, 10)]
    assert [r["run"] for r in rows] == jobs + ["runs/kfold"]
    by = {r["run"].rsplit("/", 1)[1]: r for r in rows}
    assert by["kfold"]["samples_per_s"] == "5.0" and by["kfold"]["rouge1"] == "0.4"  # the top level, not a fold
    assert by["2"]["status"] == "oom" and by["2"]["samples_per_s"] == "" and float(by["2"]["peak_mem_gib"]) == 20.0
    assert by["3"]["status"] == "missing" and by["4"]["status"] == "corrupt"
    assert by["0"]["effective_batch_size"] == "4" and float(by["0"]["epoch_seconds_projected"]) == pytest.approx(
        12457 / 9.5
    )
    assert float(by["1"]["peak_mem_gib"]) == 2.5 and float(by["1"]["tokens_per_s"]) == pytest.approx(1537.5)
    assert list(rows[0]) == list(COLUMNS)
    lines = err.splitlines()
    assert len(lines) == 2 and all(line.startswith("warning: ") for line in lines)
    assert "job 3: no metrics.json" in lines[0] and "job 4: metrics.json is corrupt" in lines[1]


def test_sort_is_numeric_with_missing_values_last(sweep, capsys):
    rows, _ = table(capsys, sweep, "--sort", "samples_per_s")
    assert [r["run"] for r in rows][:3] == ["0", "1", "10"]  # 9.5 < 10.25 < 100
    assert {r["samples_per_s"] for r in rows[3:]} == {""}
    rows, _ = table(capsys, sweep, "--sort", "samples_per_s", "--desc")
    assert [r["run"] for r in rows][:3] == ["10", "1", "0"]
    assert {r["samples_per_s"] for r in rows[3:]} == {""}
    rows, _ = table(capsys, sweep, "--sort", "status")
    assert [r["status"] for r in rows] == ["corrupt", "missing", "ok", "ok", "ok", "oom"]


def test_markdown_to_a_file(sweep, tmp_path, capsys):
    out = tmp_path / "cmp.md"
    assert main([str(sweep), "--sort", "peak_mem_gib", "--output", str(out)]) == 0
    assert "6 runs" in capsys.readouterr().err
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "| " + " | ".join(COLUMNS) + " |" and "peak_mem_gib" in lines[0]
    assert lines[1].startswith("|---|---|---|---|---:|")
    assert lines[2].startswith("| 10 | ok | tiny_bart | - | 32 | - | 1 | 32 | 100.00 | 15000 | 1.000 | 124.6 | - |")
    assert lines[4].startswith("| 0 | ok |") and lines[4].endswith("| 0.3000 | 0.1500 | 0.2700 | 0.2400 |")
    assert lines[-1].startswith("| 4 | corrupt | - |")


def test_a_folder_above_runs_and_sweeps(tmp_path, capsys):
    for name in ("b_sweep", "a_sweep"):
        run_dir(tmp_path / "outputs" / "multirun" / name / "0", metrics(sps=1.0, peak=GiB))
    run_dir(tmp_path / "outputs" / "single", metrics(sps=2.0, peak=GiB))  # beside multirun/
    (tmp_path / "outputs" / ".cache" / "x" / "0").mkdir(parents=True)
    (tmp_path / "outputs" / "mlartifacts" / "1").mkdir(parents=True)
    rows, err = table(capsys, tmp_path / "outputs")
    assert [r["run"] for r in rows] == ["single", "multirun/a_sweep/0", "multirun/b_sweep/0"] and err == ""


def test_no_runs_found_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), str(tmp_path / "absent")]) == 2
    out = capsys.readouterr()
    assert out.out == "" and len(out.err.splitlines()) == 1 and out.err.startswith("error: no runs found")
    assert "absent: no such folder" in out.err
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path), "--desc"])
    assert exc.value.code == 2


def test_a_real_run(run_job, capsys):
    m, out = run_job("measure.steps=2", "eval.enabled=false")
    capsys.readouterr()  # the run's own output
    (row,), err = table(capsys, out)
    assert row["run"] == out.name and row["status"] == m["status"] == "ok" and err == ""
    assert float(row["samples_per_s"]) == pytest.approx(m["train"]["samples_per_s"])
    assert float(row["peak_mem_gib"]) == pytest.approx(m["memory"]["peak_bytes"] / GiB)
    assert row["model"] == "tiny_bart" and row["rouge1"] == ""
