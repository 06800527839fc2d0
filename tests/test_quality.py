"""Data-quality validation: planted bad rows are listed with their reasons and left out of
training; the run goes on with the good rows; a file without a summary column stops cleanly."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

from summ.data.quality import assess
from summ.data.samples import Sample, bundled_sample_dir, read_csv
from summ.errors import DataError
from summ.inference.scoring import rouge_scores

from .conftest import assert_one_error_line, cli

GOOD = "#Person1#: 안녕하세요, 예약을 바꾸고 싶어요.\n#Person2#: 네, 언제로 바꿔 드릴까요?\n#Person1#: 금요일 저녁으로 부탁드려요."  # noqa: E501


def write_csv(path: Path, rows: list[list[str]], header=("fname", "dialogue", "summary", "topic")) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def planted(folder: Path) -> None:
    train = read_csv(bundled_sample_dir() / "train.csv", need_summary=True)[:40]
    rows = [[s.fname, s.dialogue, s.summary, s.topic] for s in train]
    rows += [
        ["bad_empty", "", "#Person1#은 아무 말도 하지 않습니다.", "빈 대화"],
        ["bad_speaker", GOOD, "#Person3#은 #Person1#에게 예약 변경을 부탁합니다.", "예약"],
        [train[0].fname, train[1].dialogue + "\n#Person1#: 감사합니다.", train[1].summary, "중복"],
        [
            "bad_mask",
            GOOD.replace("금요일 저녁으로", "#PhoneNumber 로 연락 주시고 금요일로"),
            "#Person1#은 #Person2#에게 예약을 금요일로 바꿔 달라고 합니다.",
            "예약",
        ],
    ]
    write_csv(folder / "train.csv", rows)
    dev = read_csv(bundled_sample_dir() / "dev.csv", need_summary=True)[:6]
    write_csv(folder / "dev.csv", [[s.fname, s.dialogue, s.summary, s.topic] for s in dev])


def test_each_check_on_hand_made_samples():
    rows = assess(
        [
            Sample("a", GOOD, ["#Person1#은 예약을 금요일로 바꿉니다."]),
            Sample("b", GOOD.replace("#Person2#:", "Person2:"), ["#Person1#은 예약을 바꿉니다."]),
            Sample("c", "Hello there, how are you?\nFine thanks.", ["They greet."]),
            Sample("d", GOOD + " \ufffd", ["#Person1#은 예약을 바꿉니다."]),
            Sample("e", GOOD, [""]),
        ],
        "train",
        threshold=0.7,
    )
    by = {r.fname: r for r in rows}
    assert by["a"].failed == [] and by["a"].score == 1.0 and by["a"].kept
    assert "malformed_speaker_tags" in by["b"].failed and not by["b"].kept
    assert {"missing_speaker_tags", "low_hangul_share"} <= set(by["c"].failed)
    assert "encoding_damage" in by["d"].failed
    assert "empty_summary" in by["e"].failed and by["e"].score == 0.0


def test_planted_rows_are_listed_dropped_and_the_run_goes_on(run_job, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    planted(data)
    m, out = run_job(
        "data=dialogsum_ko", f"data.dir={data}", "data.validate=true", "measure.steps=2", "batch.batch_size=4"
    )
    assert m["status"] == "ok", m["error"]
    rows = list(csv.DictReader((out / "data_quality.csv").open(encoding="utf-8")))
    assert len(rows) == 44 + 6
    train_rows = [r for r in rows if r["split"] == "train"]
    reasons = {r["fname"]: r["failed_checks"] for r in train_rows if r["kept_for_training"] == "False"}
    assert "empty_dialogue" in reasons["bad_empty"]
    assert "unknown_speaker_in_summary" in reasons["bad_speaker"]
    assert "broken_masked_token" in reasons["bad_mask"]
    assert any("duplicate_fname" in v for v in reasons.values())
    dq = m["data_quality"]
    assert dq["train_dropped"] == len(reasons) == 4 and dq["train_kept"] == 40
    assert m["train_set_size"] == 40
    assert json.loads((out / "metrics.json").read_text())["data_quality"]["train_dropped"] == 4


def test_csv_without_summary_column_stops_with_one_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_csv(data / "train.csv", [["t0", GOOD]], header=("fname", "dialogue"))
    write_csv(data / "dev.csv", [["d0", GOOD, "요약"]], header=("fname", "dialogue", "summary"))
    proc = cli(
        "data=dialogsum_ko", f"data.dir={data}", "data.validate=true", f"hydra.run.dir={tmp_path}/run", timeout=120
    )
    assert_one_error_line(proc, "train.csv: missing column(s) summary", 2)


def test_a_missing_value_is_never_a_summary(tmp_path):
    """What pandas or a spreadsheet writes for a missing cell (NaN, None, null, N/A, blanks) is no
    reference: not in read_csv, not in ROUGE; a file with no summary at all stops with one line."""
    markers = ["NaN", "nan", "None", "null", "NULL", "", "   ", "N/A", "<NA>", "-nan"]
    rows = [[f"t{i}", GOOD, m, "x"] for i, m in enumerate(markers)] + [
        ["ok", GOOD, "#Person1#은 예약을 바꿉니다.", "x"]
    ]
    write_csv(tmp_path / "train.csv", rows)
    samples = read_csv(tmp_path / "train.csv", need_summary=True)
    assert [s.summaries for s in samples[:-1]] == [[]] * len(markers) and samples[-1].summaries
    # a second reference column holding a marker adds nothing
    write_csv(
        tmp_path / "two.csv",
        [["a", GOOD, "#Person1#은 예약을 바꿉니다.", "nan"]],
        header=("fname", "dialogue", "summary", "summary2"),
    )
    assert read_csv(tmp_path / "two.csv", need_summary=True)[0].summaries == ["#Person1#은 예약을 바꿉니다."]
    write_csv(tmp_path / "none.csv", [[f"t{i}", GOOD, m, "x"] for i, m in enumerate(markers)])
    with pytest.raises(DataError, match=r"none.csv: no row has a summary"):
        read_csv(tmp_path / "none.csv", need_summary=True)
    assert read_csv(tmp_path / "none.csv", need_summary=False)  # a test file needs none


def test_a_dialogue_without_a_reference_is_not_scored():
    # before, a "NaN" reference matched a "NaN" prediction: 1.00
    s = rouge_scores(["NaN", "#Person1#은 예약을 바꿉니다."], [[], ["#Person1#은 예약을 바꿉니다."]])
    assert s["n"] == 1 and s["unscored"] == 1 and s["rouge_mean"] == pytest.approx(1.0)
    assert rouge_scores(["x"], [[]])["n"] == 0


def test_without_validate_the_cheap_checks_still_speak(run_job, tmp_path, caplog):
    """data.validate=false: nothing is left out, but one warning line says what would be, with
    counts and where data_quality.csv is, and metrics.json records it as not filtered."""
    data = tmp_path / "data"
    data.mkdir()
    planted(data)
    with open(data / "train.csv", "a", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerow(["bad_nan", GOOD, "NaN", "예약"])
    with caplog.at_level(logging.WARNING, logger="summ.training.prepare"):
        m, out = run_job("data=dialogsum_ko", f"data.dir={data}", "measure.steps=2", "batch.batch_size=4")
    assert m["status"] == "ok", m["error"]
    assert m["train_set_size"] == 45  # opt-in filtering: all kept
    lines = [r.getMessage() for r in caplog.records if "data.quality_threshold" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "5 of 45 training and 0 of 6 dev samples" in lines[0] and str(out / "data_quality.csv") in lines[0]
    assert "empty_summary 1" in lines[0] and "data.validate=true" in lines[0]
    rows = {r["fname"]: r for r in csv.DictReader((out / "data_quality.csv").open(encoding="utf-8"))}
    assert "empty_summary" in rows["bad_nan"]["failed_checks"]
    assert m["data_quality"]["filtered"] is False and m["data_quality"]["train_dropped"] == 5


def test_clean_data_says_nothing(run_job, caplog):
    with caplog.at_level(logging.WARNING, logger="summ.training.prepare"):
        m, out = run_job("measure.steps=2", "batch.batch_size=4")
    assert m["status"] == "ok" and m["data_quality"] is None and not (out / "data_quality.csv").exists()
    assert not [r for r in caplog.records if r.name == "summ.training.prepare"]
