"""Data-quality validation (data.validate=true): a score in [0, 1] per sample from documented
checks; training samples under data.quality_threshold are left out of training, never silently.

score = 1 - the sum of the weights of the failed checks (floored at 0). With the default
threshold 0.7 one serious problem (weight >= 0.4) drops a sample, two minor ones (0.2 each)
do too, and one minor problem alone does not.

| check | weight | fails when |
|---|---|---|
| empty_dialogue | 1.0 | the dialogue is empty or under 20 characters |
| too_few_turns | 0.4 | fewer than 2 turns |
| missing_speaker_tags | 0.6 | no line starts with a `#PersonN#:` tag |
| malformed_speaker_tags | 0.4 | some line lacks a `#PersonN#:` tag, or a tag is misspelt (`#person1#`, `#Person1:`) |
| empty_summary | 1.0 | a training or dev sample without a summary |
| summary_longer_than_dialogue | 0.5 | the summary has more characters than the dialogue |
| length_ratio_outlier | 0.2 | log(summary/dialogue length) is over 4 robust deviations (MAD) from the set's median |
| unknown_speaker_in_summary | 0.4 | the summary names a `#PersonN#` the dialogue does not have |
| duplicate_fname | 0.5 | an fname seen earlier in the same file |
| duplicate_dialogue | 0.2 | a dialogue identical to an earlier one |
| low_hangul_share | 0.4 | under 30% of the dialogue's letters are Hangul |
| broken_masked_token | 0.4 | a masked token without its closing `#` (`#PhoneNumber`) or an unknown `#...#` token |
| encoding_damage | 0.4 | U+FFFD replacement characters or mojibake (Ã, â€) |
"""

from __future__ import annotations

import csv
import io
import math
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from summ.data.samples import MASKED_TOKENS, TURN, Sample

WEIGHTS = {
    "empty_dialogue": 1.0,
    "too_few_turns": 0.4,
    "missing_speaker_tags": 0.6,
    "malformed_speaker_tags": 0.4,
    "empty_summary": 1.0,
    "summary_longer_than_dialogue": 0.5,
    "length_ratio_outlier": 0.2,
    "unknown_speaker_in_summary": 0.4,
    "duplicate_fname": 0.5,
    "duplicate_dialogue": 0.2,
    "low_hangul_share": 0.4,
    "broken_masked_token": 0.4,
    "encoding_damage": 0.4,
}
_PERSON = re.compile(r"#Person\d#")
_HASH_TOKEN = re.compile(r"#([A-Za-z]+\d*)(#?)")
_KNOWN = {t.strip("#") for t in MASKED_TOKENS}
_MOJIBAKE = ("\ufffd", "Ã", "â€", "ì\x9d", "ë\x8b")


@dataclass
class Assessment:
    fname: str
    split: str
    score: float
    failed: list[str] = field(default_factory=list)
    kept: bool = True


def _hangul_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    return sum("\uac00" <= c <= "\ud7a3" or "\u3131" <= c <= "\u318e" for c in letters) / len(letters)


def _log_ratio(s: Sample) -> float | None:
    if not s.dialogue or not s.summary:
        return None
    return math.log(len(s.summary) / len(s.dialogue))


def _checks(
    s: Sample,
    need_summary: bool,
    seen_fnames: set,
    seen_dialogues: set,
    ratio_center: float | None,
    ratio_spread: float | None,
) -> list[str]:
    failed = []
    dialogue = s.dialogue.strip()
    lines = [line for line in dialogue.split("\n") if line.strip()]
    if len(dialogue) < 20:
        failed.append("empty_dialogue")
    elif len(lines) < 2:
        failed.append("too_few_turns")
    tagged = [line for line in lines if TURN.match(line)]
    if dialogue and not tagged:
        failed.append("missing_speaker_tags")
    elif len(tagged) < len(lines):
        failed.append("malformed_speaker_tags")
    if need_summary:
        summary = s.summary.strip()
        if not summary:
            failed.append("empty_summary")
        else:
            if len(summary) > len(dialogue):
                failed.append("summary_longer_than_dialogue")
            speakers = set(_PERSON.findall(dialogue))
            if any(tag not in speakers for tag in _PERSON.findall(summary)):
                failed.append("unknown_speaker_in_summary")
            ratio = _log_ratio(s)
            if ratio is not None and ratio_spread and abs(ratio - ratio_center) > 4 * ratio_spread:
                failed.append("length_ratio_outlier")
    if s.fname in seen_fnames:
        failed.append("duplicate_fname")
    if dialogue and dialogue in seen_dialogues:
        failed.append("duplicate_dialogue")
    if dialogue and _hangul_share(dialogue) < 0.3:
        failed.append("low_hangul_share")
    text = dialogue + "\n" + (s.summary or "")
    if any(not closed or name not in _KNOWN for name, closed in _HASH_TOKEN.findall(text)):
        failed.append("broken_masked_token")
    if any(m in text for m in _MOJIBAKE):
        failed.append("encoding_damage")
    return failed


def assess(samples: Sequence[Sample], split: str, threshold: float, need_summary: bool = True) -> list[Assessment]:
    """Score every sample of one split; `kept` says whether it passes the threshold."""
    ratios = [r for r in (_log_ratio(s) for s in samples) if r is not None]
    center = statistics.median(ratios) if ratios else None
    spread = statistics.median(abs(r - center) for r in ratios) * 1.4826 if len(ratios) >= 10 else None
    seen_f: set = set()
    seen_d: set = set()
    out = []
    for s in samples:
        failed = _checks(s, need_summary, seen_f, seen_d, center, spread)
        seen_f.add(s.fname)
        seen_d.add(s.dialogue.strip())
        score = max(0.0, 1.0 - sum(WEIGHTS[f] for f in failed))
        out.append(Assessment(s.fname, split, round(score, 4), failed, score >= threshold))
    return out


def to_csv(rows: Sequence[Assessment]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["fname", "split", "score", "kept_for_training", "failed_checks"])
    for r in rows:
        w.writerow([r.fname, r.split, f"{r.score:.2f}", r.kept if r.split == "train" else "", ";".join(r.failed)])
    return buf.getvalue()


def summarize(rows: Sequence[Assessment]) -> dict:
    train = [r for r in rows if r.split == "train"]
    return {
        "checked": len(rows),
        "train_dropped": sum(not r.kept for r in train),
        "train_kept": sum(r.kept for r in train),
        "flagged_by_check": dict(Counter(f for r in rows for f in r.failed)),
    }
