"""Issue 21's own hostile pass (132 cases): what it found accepted silently, ending in a traceback
or an unclear line, or losing work, each with its fix: refused where the input is first read, with
one line that names the setting, or said in a warning where the setting is legitimately accepted."""

from __future__ import annotations

import csv
import json
import logging
import os
import stat
from pathlib import Path

import pytest

from summ.config import resolve_batch
from summ.data.samples import bundled_sample_dir, read_csv
from summ.errors import ConfigError, DataError
from summ.validation import unused_settings, validate

from .conftest import assert_one_error_line, cli, compose_cfg, job_folder

# --------------------------------------------------------------------------- settings refused where composed


@pytest.mark.parametrize(
    "overrides,says",
    [
        (["model.tiny.heads=3"], "model.tiny.d_model=64 is not a multiple of model.tiny.heads=3"),
        (
            ["model=tiny_llama", "model.tiny.kv_heads=3"],
            "model.tiny.heads=4 is not a multiple of model.tiny.kv_heads=3",
        ),
        (["model.tiny.heads=0"], "model.tiny.heads=0 is invalid"),
        (["model.tiny.dropout=1.5"], "model.tiny.dropout=1.5 is a probability"),
        (["model.lora.dropout=-0.1"], "model.lora.dropout=-0.1 is a probability"),
        (["model.tiny.dropout=1.0"], "model.tiny.dropout=1.0 is a probability: it must be in [0, 1)"),
        (["inference=sampling", "inference.temperature=0"], "sampling needs a temperature > 0"),
        (["inference.top_p=1.5"], "inference.top_p=1.5 is the nucleus' share"),
        (["inference.top_p=0"], "inference.top_p=0.0 is the nucleus' share"),
        (["data=synthetic", "data.synthetic_train_size=0"], "data.synthetic_train_size=0 is invalid"),
        (["data=synthetic", "data.synthetic_eval_size=-1"], "data.synthetic_eval_size=-1 is invalid"),
        (["measure.steps=2", "measure.samples=32"], "both set the measured window"),
        (["mode=predict", "model.path=/x", "train.k_folds=3"], "predict uses one trained model"),
        (
            ["batch.batch_size=2", "batch.gradient_accumulation_steps=4", "batch.effective_batch_size=16"],
            "batch.gradient_accumulation_steps=4 contradicts batch.effective_batch_size=16",
        ),
    ],
)
def test_contradictions_and_impossible_values_are_refused(overrides, says):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(overrides))
    assert says in str(err.value), str(err.value)


def test_an_accumulation_that_agrees_with_the_effective_batch_is_fine():
    assert resolve_batch(2, 8, 16, 1) == (2, 8, 16) and resolve_batch(2, 1, 16, 1) == (2, 8, 16)


@pytest.mark.parametrize(
    "overrides,says",
    [
        (["augmentation=synonym", "augmentation.ratio=0"], "adds nothing: augmentation.ratio=0"),
        (["tta=reorder", "eval.enabled=false"], "tta reorder runs at evaluation"),
        (["tta=reorder", "eval.generate=false"], "tta reorder runs at evaluation"),
        (["data.group_by_length=true", "batch.batch_size=1"], "a micro-batch of 1 has no padding to save"),
        (["data.max_packed_len=1024"], "caps packed rows, and data.packing=false"),
    ],
)
def test_settings_accepted_but_not_acted_on_are_said(overrides, says):
    [text] = unused_settings(compose_cfg(overrides))
    assert says in text
    assert unused_settings(compose_cfg([])) == []


# --------------------------------------------------------------------------- data


def write(path: Path, header, rows) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def test_a_repeated_column_is_refused(tmp_path):
    write(tmp_path / "t.csv", ["fname", "dialogue", "summary", "topic", "dialogue"], [["a", "x", "y", "z", "junk"]])
    with pytest.raises(DataError, match=r"t.csv: the column\(s\) dialogue appear more than once"):
        read_csv(tmp_path / "t.csv", need_summary=True)


def test_a_quote_left_open_is_refused_not_merged(tmp_path):
    text = (bundled_sample_dir() / "train.csv").read_text(encoding="utf-8-sig")
    at = text.index('",')
    (tmp_path / "t.csv").write_text(text[:at] + text[at + 1 :], encoding="utf-8")
    with pytest.raises(DataError, match=r"t.csv: not a readable CSV \(line \d+: .*check its quoting"):
        read_csv(tmp_path / "t.csv", need_summary=True)


def test_training_on_the_dev_file_is_refused_and_an_overlap_said(tmp_path, caplog):
    from summ.config import DataConfig, DataSource
    from summ.data.splits import load_splits

    for name in ("train.csv", "dev.csv"):
        (tmp_path / name).write_bytes((bundled_sample_dir() / name).read_bytes())
    with pytest.raises(DataError, match="data.train_file and data.dev_file are the same file"):
        load_splits(DataConfig(name="x", source=DataSource.csv, dir=str(tmp_path), train_file="dev.csv"))
    dev = (tmp_path / "dev.csv").read_text(encoding="utf-8").splitlines()
    (tmp_path / "train.csv").write_text(
        "\n".join((tmp_path / "train.csv").read_text(encoding="utf-8").splitlines() + dev[1:]) + "\n", encoding="utf-8"
    )
    with caplog.at_level(logging.WARNING, logger="summ.data.splits"):
        load_splits(DataConfig(name="x", source=DataSource.csv, dir=str(tmp_path)))
    assert "30 of 30 dev dialogues are also in the training set" in caplog.text


# --------------------------------------------------------------------------- models and predict


def test_damaged_weights_are_one_line(tmp_path):
    from transformers import AutoModelForSeq2SeqLM, BartConfig, BartForConditionalGeneration

    from summ.errors import WeightsNotFound
    from summ.modeling.checks import from_pretrained_checked

    BartForConditionalGeneration(
        BartConfig(
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            vocab_size=64,
            max_position_embeddings=64,
        )
    ).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    with pytest.raises(WeightsNotFound, match=r"its weights cannot be read \(SafetensorError.*truncated or damaged"):
        from_pretrained_checked(AutoModelForSeq2SeqLM, str(tmp_path), f"model.path={tmp_path}")


def test_a_k_fold_run_points_at_its_members(tmp_path):
    from summ.errors import WeightsNotFound
    from summ.modeling.saved import locate

    for k in (0, 1):
        (tmp_path / f"fold_{k}" / "model").mkdir(parents=True)
        (tmp_path / f"fold_{k}" / "model" / "summ_config.yaml").write_text("model: {name: tiny_bart}\n")
    cfg = compose_cfg(["mode=predict", f"model.path={tmp_path}"])
    from omegaconf import OmegaConf

    with pytest.raises(WeightsNotFound, match=rf"is a K-fold run: .*model.path={tmp_path / 'fold_0'}"):
        locate(OmegaConf.to_object(cfg))


# --------------------------------------------------------------------------- reports and tools


def test_a_memory_model_through_two_widths_predicts_nothing(tmp_path):
    from summ.reports.knee_report import build_report

    for i, bs in enumerate((2, 4)):
        metrics = {
            "status": "ok",
            "model": "m",
            "batch_size": bs,
            "gradient_accumulation_steps": 1,
            "effective_batch_size": bs,
            "train": {"samples_per_s": 10.0 * bs, "samples": 64, "max_micro_batch_positions": bs * 100},
            "memory": {"peak_bytes": bs * 2**28, "budget_bytes": 24 * 2**30, "limit_bytes": 20 * 2**30},
        }
        job_folder(tmp_path, i, [f"batch.batch_size={bs}"], metrics)
    a = build_report(tmp_path)
    assert a.memory_model.r2 == pytest.approx(1.0) and not a.memory_model.predicts
    assert a.predicted_largest_fitting is None
    md = (tmp_path / "knee_report.md").read_text()
    assert "Fitted through 2 micro-batch widths" in md and "Predicted, not measured" not in md


def a_run(folder: Path, name: str, predictions: list[str], data="sample") -> Path:
    run = folder / name
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(
        json.dumps({"status": "ok", "model": "tiny_bart", "data": data, "train": {"samples_per_s": 10.0}})
    )
    write(
        run / "dev_predictions.csv",
        ["fname", "prediction", "reference", "all_references"],
        [[f"d{i}", p, "요약 하나", json.dumps(["요약 하나"], ensure_ascii=False)] for i, p in enumerate(predictions)],
    )
    return run


def test_ensemble_keeps_an_earlier_ensemble_and_refuses_bad_input_in_one_line(tmp_path):
    a, b = a_run(tmp_path, "a", ["요약 하나", "둘"]), a_run(tmp_path, "b", ["요약", "둘 셋"])
    cli(a, b, module="summ.inference.ensemble", timeout=120, code=0)
    first = (a / "ensemble_report.md").read_text()
    cli("--strategy", "weighted", a, b, module="summ.inference.ensemble", timeout=120, code=0)
    assert (a / "ensemble_report.earlier.md").read_text() == first  # kept, not overwritten
    assert (a / "ensemble_predictions.earlier.csv").is_file() and "(weighted)" in (a / "ensemble_report.md").read_text()
    (tmp_path / "afile").write_text("")
    proc = cli("--out", tmp_path / "afile", a, b, module="summ.inference.ensemble", timeout=120)
    assert_one_error_line(proc, "is a file, not a folder", 2)
    bad = tmp_path / "bad"
    bad.mkdir()
    write(bad / "dev_predictions.csv", ["fname", "summary"], [["d0", "x"], ["d1", "y"]])
    assert_one_error_line(cli(a, bad, module="summ.inference.ensemble", timeout=120), "has no prediction column", 2)


def test_compare_says_when_runs_trained_on_other_data_and_refuses_a_folder_as_output(tmp_path):
    a_run(tmp_path, "a", ["x"])
    a_run(tmp_path, "b", ["x"], data="synthetic")
    proc = cli(tmp_path, module="summ.reports.compare", timeout=120)
    assert proc.returncode == 0 and "trained on different data (sample, synthetic)" in proc.stderr
    assert "| data |" in proc.stdout
    proc = cli(tmp_path, "--output", tmp_path, module="summ.reports.compare", timeout=120)
    assert_one_error_line(proc, "is a folder: give a file name", 2)


# --------------------------------------------------------------------------- folders, files, sweeps


def test_a_solar_cache_folder_that_is_a_file_names_the_setting(tmp_path):
    from summ.files import WriteFailed
    from summ.inference.cache import DiskCache

    (tmp_path / "afile").write_text("")
    with pytest.raises(WriteFailed, match=r"^solar.cache_dir=.*afile: .*is a file, not a folder; set solar.cache_dir"):
        DiskCache(tmp_path / "afile" / "solar.sqlite", "solar.cache_dir")


def test_a_run_into_a_sweep_folder_and_a_sweep_into_a_run_folder_move_the_other_aside(tmp_path, monkeypatch):
    import time

    from omegaconf import OmegaConf

    from summ.distributed import STAMP_ENV
    from summ.sweeps.callbacks import one_launch_per_folder, one_run_per_folder

    def cfg(folder):
        return OmegaConf.create(
            {
                "hydra": {"run": {"dir": str(folder)}, "sweep": {"dir": str(folder)}},
                "sweep": {"resume": False, "reuse_from": None},
                "train": {"resume_from": None},
                "model": {"path": None},
            }
        )

    sweep = tmp_path / "sweep"
    for j in (0, 1):
        (sweep / str(j) / ".hydra").mkdir(parents=True)
    (sweep / "knee_report.md").write_text("x")
    one_run_per_folder(cfg(sweep))
    assert {p.name for p in sweep.iterdir()} == {"superseded_run"}
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    monkeypatch.setenv(STAMP_ENV, repr(time.time() + 1))
    one_launch_per_folder(cfg(run))
    assert {p.name for p in run.iterdir()} == {"superseded_launch"}


def test_sweep_reuse_from_must_name_a_sweep(tmp_path):
    from summ.validation import check_reuse_from

    with pytest.raises(ConfigError, match="is not a folder"):
        check_reuse_from(tmp_path / "none")
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"holds no job folders \(0/, 1/, ...\): give a finished sweep's folder"):
        check_reuse_from(tmp_path / "run")
    check_reuse_from(tmp_path)  # holds run/ (a job folder by its .hydra/)


def test_saved_weights_get_the_umasks_mode(run_job):
    old = os.umask(0o022)
    try:
        m, out = run_job("measure.steps=1", "train.save_model=true")
    finally:
        os.umask(old)
    assert m["status"] == "ok"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (out / "model").iterdir() if p.is_file()}
    assert modes and set(modes.values()) == {0o644}, modes


def test_the_final_line_of_a_sweep_refused_as_a_whole_is_the_refusal():
    from summ.reports.cells import Cell
    from summ.sweeps.callbacks import why_none_ok

    same = [
        Cell(
            job=str(i),
            overrides=[],
            status="failed",
            error="train.learning_rate=-1.0 is invalid: it must be > 0",
            user_error=True,
        )
        for i in range(2)
    ]
    assert (
        why_none_ok(same) == "every job of the sweep was refused: train.learning_rate=-1.0 is invalid: it must be > 0"
    )
    mixed = same[:1] + [Cell(job="1", overrides=[], status="oom")]
    assert why_none_ok(mixed) == "no job of the sweep ended ok (failed, oom)"


@pytest.mark.slow
def test_cli_cases_end_in_one_line(tmp_path):
    """A sweep preset run without -m; predict labelled with another model than the run's; tta that
    cannot run, refused before training."""
    proc = cli("preset=knee_grid", f"hydra.run.dir={tmp_path / 'p'}")
    assert_one_error_line(proc, "preset=knee_grid is a sweep: run it with -m", 2)
    assert "is a sweep" in json.loads((tmp_path / "p" / "metrics.json").read_text())["error"]  # the folder says why
    trained = tmp_path / "trained"
    cli("measure.steps=1", "eval.enabled=false", f"hydra.run.dir={trained}", code=0)
    proc = cli("mode=predict", "model=tiny_llama", f"model.path={trained}", f"hydra.run.dir={tmp_path / 'q'}")
    said = assert_one_error_line(proc, "model=tiny_llama, but model.path=", 2)
    assert "was trained as model=tiny_bart" in said
    proc = cli("tta=paraphrase", "measure.steps=1", f"hydra.run.dir={tmp_path / 'r'}")
    assert_one_error_line(proc, "tta=paraphrase: no generation backend for paraphrase", 2)
    assert not (tmp_path / "r" / "train_history.jsonl").exists()  # before any training


# --------------------------------------------------------------------------- the re-check's new cases


def test_tools_say_a_bad_option_in_one_line(tmp_path):
    for module in ("summ.reports.knee_report", "summ.reports.compare", "summ.inference.ensemble"):
        proc = cli("--no-such-option", tmp_path, module=module, timeout=120)
        assert_one_error_line(proc, "--help lists the options", 2)


def test_summ_report_refuses_a_runs_folder_a_k_fold_one_included(tmp_path):
    (tmp_path / "metrics.json").write_text('{"status": "ok"}')
    for k in (0, 1):
        (tmp_path / f"fold_{k}").mkdir()
        (tmp_path / f"fold_{k}" / "metrics.json").write_text('{"status": "ok"}')
    assert_one_error_line(
        cli(tmp_path, module="summ.reports.knee_report", timeout=120), "is a run's folder, not a sweep's", 2
    )
    assert not (tmp_path / "knee_report.md").exists()


def test_a_job_whose_overrides_are_gone_is_warned_about(tmp_path):
    from summ.reports.cells import load_cells

    for j in (0, 1):
        job_folder(tmp_path, j, [f"batch.batch_size={2 + j}"], {"status": "ok", "batch_size": 2 + j})
    (tmp_path / "1" / ".hydra" / "overrides.yaml").unlink()
    _, warnings = load_cells(tmp_path)
    assert len(warnings) == 1 and warnings[0].startswith("job 1: no .hydra/overrides.yaml")


def test_different_tokenizers_are_not_different_samples():
    from summ.reports.cells import Cell
    from summ.reports.knee import measurement_warnings

    cells = [
        Cell(job=str(i), overrides=[], status="ok", model=m, samples=64, tokens=t, samples_per_s=1.0)
        for i, (m, t) in enumerate([("bart", 900), ("bart", 900), ("llama", 1200), ("llama", 1200)])
    ]
    assert not [w for w in measurement_warnings(cells) if "different samples" in w]
    cells[1].tokens = 950
    [said] = [w for w in measurement_warnings(cells) if "different samples" in w]
    assert said.startswith("the bart cells measured different samples")


def test_compare_tells_two_csv_folders_apart(tmp_path):
    for name, folder in (("a", "/data/one"), ("b", "/data/two")):
        run = a_run(tmp_path, name, ["x"], data="dialogsum_ko")
        (run / ".hydra").mkdir()
        (run / ".hydra" / "config.yaml").write_text(f"data:\n  dir: {folder}\n")
    proc = cli(tmp_path, module="summ.reports.compare", timeout=120)
    assert "trained on different data (dialogsum_ko:/data/one, dialogsum_ko:/data/two)" in proc.stderr


def test_a_submission_of_empty_summaries_is_warned_about(tmp_path, caplog):
    from summ.data.samples import Sample
    from summ.inference.predict import write_submission
    from summ.run_folder import RunMetrics

    with caplog.at_level(logging.WARNING, logger="summ.inference.predict"):
        write_submission(True, tmp_path, [Sample("a", "d"), Sample("b", "d")], ["", "요약"], {}, RunMetrics())
    assert "1 of 2 summaries are empty: raise inference.max_new_tokens" in caplog.text


def test_a_flag_hydra_does_not_know_is_one_line():
    line = assert_one_error_line(cli("--badflag", timeout=120), "unrecognized arguments: --badflag", 2)
    assert line.startswith("error: unrecognized arguments: --badflag: python run.py --help")
