"""One table of the figures users compare, across finished runs and sweeps.

    summ-compare outputs/runs/<run> outputs/multirun/<sweep> [--sort samples_per_s --desc]
    summ-compare outputs/multirun --format csv --output compare.csv       (or python -m summ.reports.compare)

Each folder given is a run (it holds its metrics file), a sweep (its job folders do), or a folder
above them (searched a few levels down). A K-fold run counts once, by its top-level metrics
(the ensemble's ROUGE; cost figures are fold 0's). A job without readable metrics becomes
a row with status missing or corrupt and a warning on stderr.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from summ.console import OneLineParser
from summ.files import WriteFailed, atomic_write_text
from summ.reports.cells import Cell, load_cells, read_job
from summ.reports.summary import gib
from summ.run_folder import METRICS_FILE, is_run_folder, job_config

MAX_DEPTH = 4  # folder levels searched below a given folder for runs and sweeps

# column: (how a Markdown cell shows it, whether it sorts as a number)
COLUMNS: dict[str, tuple[str, bool]] = {
    "run": ("", False),
    "status": ("", False),
    "model": ("", False),
    "data": ("", False),
    "batch_size": ("d", True),
    "max_tokens": ("d", True),  # batch.max_tokens: a token budget's runs have no batch_size
    "gradient_accumulation_steps": ("d", True),
    "effective_batch_size": ("d", True),
    "samples_per_s": (".2f", True),
    "tokens_per_s": (".0f", True),
    "peak_mem_gib": (".3f", True),  # memory.peak_bytes in GiB (2**30 bytes)
    "epoch_seconds_projected": (".1f", True),  # one epoch of the training set at the measured samples/s
    "rouge1": (".4f", True),
    "rouge2": (".4f", True),
    "rougeL": (".4f", True),
    "rouge_mean": (".4f", True),
}


@dataclass
class Row:
    path: Path
    cell: Cell
    label: str = ""

    def value(self, column: str) -> Any:
        if column == "run":
            return self.label
        if column == "peak_mem_gib":
            return gib(self.cell.peak_bytes)
        return getattr(self.cell, column)


def _read_run(d: Path) -> tuple[Cell, str | None]:
    """A run folder's metrics as a Cell; a missing or unreadable file gives a row and a warning."""
    return read_job(d, str(d))


def collect(folders: list[Path]) -> tuple[list[Row], list[str]]:
    """Rows for every run under the given folders, in the order given (a sweep's jobs in job
    order), each run once; plus warnings for folders without runs and unreadable metrics."""
    rows: list[Row] = []
    warnings: list[str] = []
    seen: set[Path] = set()

    def add(path: Path, cell: Cell) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            rows.append(Row(path, cell))

    def visit(d: Path, depth: int) -> bool:
        if is_run_folder(d):
            cell, warning = _read_run(d)
            add(d, cell)
            warnings.extend([warning] if warning else [])
            return True
        subdirs = sorted(
            (c for c in d.iterdir() if c.is_dir() and not c.name.startswith(".")),
            key=lambda c: (0, int(c.name)) if c.name.isdigit() else (1, c.name),
        )
        found = any(is_run_folder(c) for c in subdirs)
        if found:  # a sweep (or outputs/runs): its job folders, read as the knee report reads them
            cells, sweep_warnings = load_cells(d)
            for cell in cells:
                add(d / cell.job, cell)
            warnings.extend(f"{d}: {w}" for w in sweep_warnings)
        if depth < MAX_DEPTH:  # folders beside them that hold more runs (outputs/: runs/, multirun/)
            for c in subdirs:
                if not is_run_folder(c):
                    found = visit(c, depth + 1) or found
        return found

    for folder in folders:
        if not folder.is_dir():
            warnings.append(f"{folder}: no such folder")
        elif not visit(folder, 0):
            warnings.append(f"{folder}: no run or sweep found (no {METRICS_FILE} or .hydra/ below it)")
    _label(rows)
    return rows, warnings


def _label(rows: list[Row]) -> None:
    """Each run's path below the folder that all of them share (its own name for a single run)."""
    if not rows:
        return
    dirs = [r.path.resolve() for r in rows]
    base = Path(os.path.commonpath(dirs))
    if base in dirs:
        base = base.parent
    for r, d in zip(rows, dirs):
        r.label = d.relative_to(base).as_posix()


def sort_rows(rows: list[Row], column: str, descending: bool = False) -> list[Row]:
    """Numeric columns by value, the rest as text; rows without a value last in either order."""
    numeric = COLUMNS[column][1]
    present = [r for r in rows if r.value(column) is not None]
    missing = [r for r in rows if r.value(column) is None]
    key = (lambda r: float(r.value(column))) if numeric else (lambda r: str(r.value(column)))
    return sorted(present, key=key, reverse=descending) + missing


def _cell_text(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value).replace("|", "\\|")


def to_markdown(rows: list[Row]) -> str:
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---:" if numeric else "---" for _, numeric in COLUMNS.values()) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(_cell_text(r.value(c), spec) for c, (spec, _) in COLUMNS.items()) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[Row]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow(["" if r.value(c) is None else r.value(c) for c in COLUMNS])
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="summ-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="run folders, sweep folders, or folders above them")
    parser.add_argument(
        "--sort",
        choices=list(COLUMNS),
        default=None,
        help="order by this column (numbers by value; rows without a value last); default: as found",
    )
    parser.add_argument("--desc", action="store_true", help="largest first")
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    parser.add_argument("--output", type=Path, default=None, help="write the table here instead of stdout")
    args = parser.parse_args(argv)
    if args.desc and not args.sort:
        parser.error("--desc orders the --sort column: give --sort COLUMN too")
    rows, warnings = collect(args.folders)
    if not rows:  # one line: every folder given and why it held no run
        print(
            f"error: no runs found ({'; '.join(warnings)}): give run folders (with {METRICS_FILE}) "
            f"or sweep folders (outputs/multirun/<time>)",
            file=sys.stderr,
        )
        return 2
    for r in rows:  # two folders of CSVs under one data group are two data sets
        folder = (job_config(r.path).get("data") or {}).get("dir")
        if folder and r.cell.data:
            r.cell.data = f"{r.cell.data}:{folder}"
    datas = sorted({r.cell.data for r in rows if r.cell.data})
    if len(datas) > 1:  # a rate on other data (other lengths, other padding) is no rival
        warnings.append(f"the runs trained on different data ({', '.join(datas)}): compare rates within one data only")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.sort:
        rows = sort_rows(rows, args.sort, args.desc)
    text = to_csv(rows) if args.format == "csv" else to_markdown(rows)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    if args.output.is_dir():
        print(
            f"error: --output {args.output} is a folder: give a file name (like {args.output / 'runs.md'})",
            file=sys.stderr,
        )
        return 2
    try:
        atomic_write_text(args.output, text)
    except WriteFailed as exc:
        print(f"error: {exc}: give --output a file in a folder that can be written", file=sys.stderr)
        return 2
    print(f"{len(rows)} runs: {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
