"""ROUGE on known Korean strings, baseline-compatible, with the edge cases that crash naive code."""

from __future__ import annotations

import pytest

from summ.config import RougeTokenizer
from summ.inference.scoring import clean_prediction, rouge_scores

REF = "#Person1#은 #Person2#에게 내일 회의 시간을 알려줍니다."


def test_identical_strings_score_one():
    s = rouge_scores([REF], [[REF]])
    assert s["rouge1"] == pytest.approx(1.0, abs=1e-6)
    assert s["rouge2"] == pytest.approx(1.0, abs=1e-6)
    assert s["rougeL"] == pytest.approx(1.0, abs=1e-6)
    assert s["rouge_sum"] == pytest.approx(3.0, abs=1e-5) and s["rouge_mean"] == pytest.approx(1.0, abs=1e-6)


def test_partial_overlap_on_whitespace_tokens():
    # 6 reference words, the hypothesis shares 3 of its 4: P = 3/4, R = 3/6
    hyp = "#Person1#은 #Person2#에게 내일 전화합니다."
    s = rouge_scores([hyp], [[REF]])
    p, r = 3 / 4, 3 / 6
    assert s["rouge1"] == pytest.approx(2 * p * r / (p + r), abs=1e-6)
    assert 0 < s["rouge2"] < s["rouge1"]


def test_hangul_is_kept():
    # rouge_score's default tokenizer would drop every Hangul word and score 0 here
    assert rouge_scores(["회의 시간을 알려줍니다"], [["회의 시간을 알려줍니다"]])["rouge1"] == pytest.approx(1.0)


def test_empty_prediction_scores_zero_not_crash():
    s = rouge_scores(["", REF], [[REF], [REF]])
    assert s["n"] == 2
    assert s["rouge1"] == pytest.approx(0.5, abs=1e-6)


def test_multiple_references_are_averaged():
    other = "두 사람은 점심 메뉴를 고릅니다."
    both = rouge_scores([REF], [[REF, other]])["rouge1"]
    assert both == pytest.approx((1.0 + rouge_scores([REF], [[other]])["rouge1"]) / 2, abs=1e-6)


def test_morpheme_tokenizer_credits_shared_stems():
    hyp, ref = "회의를 준비했습니다", "회의 준비를 합니다"
    ws = rouge_scores([hyp], [[ref]])["rouge1"]
    morph = rouge_scores([hyp], [[ref]], RougeTokenizer.morpheme)["rouge1"]
    assert ws == 0.0 and morph > 0.3


def test_clean_prediction_strips_housekeeping_but_keeps_masked_tokens():
    text = "<s>#Person1#은  #PhoneNumber#로 전화합니다.</s><pad><pad>"
    assert clean_prediction(text, ["</s>", "<s>", "<pad>"]) == "#Person1#은 #PhoneNumber#로 전화합니다."
