"""The competition's data format: one dialogue sample, the masked tokens it uses, and reading
the competition CSVs (UTF-8 with or without BOM, CRLF or LF, quoted multi-line fields)."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from summ.errors import DataError

# Tokens the competition uses to mask speakers and personal data; never split by a tokenizer.
SPEAKER_TAGS = [f"#Person{i}#" for i in range(1, 8)]
MASKED_TOKENS = SPEAKER_TAGS + [
    "#PhoneNumber#",
    "#Address#",
    "#PassportNumber#",
    "#DateOfBirth#",
    "#SSN#",
    "#CardNumber#",
    "#CarNumber#",
    "#Email#",
]
TURN = re.compile(r"^(#Person[1-9]#:\s*)(.*)$")  # one dialogue line: (speaker prefix, utterance)
_REFERENCE_COLUMN = re.compile(r"^summary\d*$")
# What pandas and spreadsheets write for a missing value: such a cell holds no summary.
MISSING = frozenset(v.casefold() for v in ("", "nan", "-nan", "none", "null", "na", "n/a", "<na>", "#n/a", "nat"))


@dataclass
class Sample:
    fname: str
    dialogue: str
    summaries: list[str] = field(default_factory=list)  # one or more references; empty for test
    topic: str = ""

    @property
    def summary(self) -> str:
        return self.summaries[0] if self.summaries else ""


def bundled_sample_dir() -> Path:
    return Path(str(resources.files("summ") / "resources" / "sample"))


def read_csv(path: Path, need_summary: bool) -> list[Sample]:
    """Read one competition CSV (UTF-8 with or without BOM, CRLF or LF, quoted multi-line fields)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; set data.dir to the folder that holds it")
    csv.field_size_limit(2**31 - 1)  # the module's default (128 KiB per field) refuses a long dialogue
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh, strict=True)  # strict: a quote left open is an error, not a merged row
            columns = [c.strip() for c in (reader.fieldnames or [])]
            repeated = sorted({c for c in columns if columns.count(c) > 1})
            if repeated:  # DictReader would keep the last of them without a word
                raise DataError(
                    f"{path}: the column(s) {', '.join(repeated)} appear more than once in the header; keep one of each"
                )
            reader.fieldnames = columns
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8 CSV") from None
    except csv.Error as exc:
        raise DataError(
            f"{path}: not a readable CSV (line {reader.line_num}: {exc}); check its quoting (every quoted "
            f"field closed, a quote inside a field doubled)"
        ) from None
    required = ["fname", "dialogue"] + (["summary"] if need_summary else [])
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(columns) or 'none'}")
    if not rows:  # a header alone: every later step (splits, folds, evaluation) would fail on nothing
        raise DataError(
            f"{path}: no rows under its header; give the file its samples, or point data.dir at the "
            f"folder that has them"
        )
    ref_cols = sorted((c for c in columns if _REFERENCE_COLUMN.match(c)), key=lambda c: (len(c), c))
    samples = []
    for row in rows:
        refs = [_clean(row[c]) for c in ref_cols if not is_missing(row.get(c))]
        samples.append(
            Sample(
                fname=_clean(row["fname"]),
                dialogue=_clean(row["dialogue"]),
                summaries=refs,
                topic=_clean(row.get("topic") or ""),
            )
        )
    if need_summary and not any(s.summaries for s in samples):
        raise DataError(
            f"{path}: no row has a summary (every one is empty, NaN or null); fill the summary "
            f"column, or point data.dir at the folder with the labelled files"
        )
    return samples


def is_missing(cell: str | None) -> bool:
    """True for an absent or empty cell and for the markers of a missing value (NaN, None, null, N/A)."""
    return cell is None or cell.strip().casefold() in MISSING


def _clean(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()
