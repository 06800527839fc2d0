"""ROUGE for Korean summaries, compatible with the competition baseline.

The baseline scored with the `rouge` package (pltrdy) on whitespace tokens. The competition
splits into morphemes first; `tokenizer=morpheme` does that with kiwipiepy (offline). Per
dialogue, F1 is averaged over its references (one without any is left out and counted as
`unscored`); an empty prediction scores 0. `rouge_sum` is
R1+R2+RL and `rouge_mean` their mean (the leaderboard shows rouge_mean x 100).
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence

from rouge import Rouge

from summ.config import RougeTokenizer
from summ.data.textops import kiwi

_SPACES = re.compile(r"\s+")


def _tokenize(text: str, tokenizer: RougeTokenizer) -> str:
    text = _SPACES.sub(" ", text).strip()
    if tokenizer == RougeTokenizer.morpheme and text:
        return " ".join(t.form for t in kiwi().tokenize(text))
    return text


def _pair_f1(hyp: str, ref: str) -> tuple[float, float, float]:
    if not hyp or not ref:
        return 0.0, 0.0, 0.0
    try:
        s = Rouge().get_scores(hyp, ref)[0]
    except ValueError:  # the package finds no words left after its own cleaning
        return 0.0, 0.0, 0.0
    return s["rouge-1"]["f"], s["rouge-2"]["f"], s["rouge-l"]["f"]


def pair_rouge_mean(hyp: str, ref: str, tokenizer: RougeTokenizer = RougeTokenizer.whitespace) -> float:
    """Mean of ROUGE-1/2/L F1 between two texts (MBR's agreement measure)."""
    return sum(_pair_f1(_tokenize(hyp, tokenizer), _tokenize(ref, tokenizer))) / 3


def rouge_scores(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    tokenizer: RougeTokenizer = RougeTokenizer.whitespace,
) -> dict:
    """Mean ROUGE-1/2/L F1 over dialogues; each dialogue averages over its references."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference sets")
    per_sample = []
    for hyp, refs in zip(predictions, references):
        if not refs:  # a dialogue without a reference cannot be scored: it is counted, not averaged in
            continue
        h = _tokenize(hyp, tokenizer)
        scores = [_pair_f1(h, _tokenize(r, tokenizer)) for r in refs]
        per_sample.append(tuple(statistics.fmean(s[k] for s in scores) for k in range(3)))
    n = len(per_sample)
    r1, r2, rl = (statistics.fmean(s[k] for s in per_sample) if n else 0.0 for k in range(3))
    return {
        "rouge1": r1,
        "rouge2": r2,
        "rougeL": rl,
        "rouge_sum": r1 + r2 + rl,
        "rouge_mean": (r1 + r2 + rl) / 3,
        "n": n,
        "unscored": len(predictions) - n,
    }


def clean_prediction(text: str, strip_tokens: Sequence[str]) -> str:
    """Remove tokenizer housekeeping tokens (bos, eos, pad, <usr>, chat markers) and normalise
    spaces; the competition's masked tokens (#Person1#, ...) stay."""
    for tok in strip_tokens:
        if tok:
            text = text.replace(tok, " ")
    return _SPACES.sub(" ", text).strip()
