"""The run folder's contract: the names of the files a run and a sweep leave, the metrics record
written into metrics.json, and the one reader every consumer uses (reports, compare, plots, sweep
resume and reuse, the knee sweeper, ensembles).

One policy for a folder whose metrics.json cannot be used: `read_metrics` returns no record and a
one-line problem ("missing", or "corrupt: <why>"); the caller decides whether that is a warning
row (reports) or a cell to measure again (resume). A figure that is not a number makes the file
corrupt, so no report ever formats a string as a rate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from summ.errors import RUN_STATUSES, Status
from summ.figures import MemoryComponents, MemoryFigures, TrainFigures
from summ.files import atomic_write_json, atomic_write_text, read_jsonl, write_jsonl

log = logging.getLogger(__name__)

GIB = 2**30  # bytes in a GiB: every *_bytes figure is shown in GiB

# A run folder (or a sweep's job folder)
METRICS_FILE = "metrics.json"  # RunMetrics, written whatever happened
HISTORY_FILE = "train_history.jsonl"  # one line per optimizer step: loss, lr, step time, memory
DEV_PREDICTIONS_FILE = "dev_predictions.csv"
OOF_PREDICTIONS_FILE = "oof_predictions.csv"  # a K-fold member's held-out fold
ENSEMBLE_PREDICTIONS_FILE, ENSEMBLE_REPORT = "ensemble_predictions.csv", "ensemble_report.md"  # summ-ensemble
OOF_CANDIDATES_FILE = "oof_candidates.jsonl"  # what the stacking selector trains on
SUBMISSION_FILE = "submission.csv"
DATA_QUALITY_FILE = "data_quality.csv"
ERROR_LOG = "error.log"  # the traceback of an unforeseen failure
MODEL_DIR = "model"  # weights (or LoRA adapter), tokenizer and SAVED_CONFIG, for mode=predict
SAVED_CONFIG = "summ_config.yaml"
CHECKPOINTS_DIR = "checkpoints"
PROFILE_DIR = "profile"  # measure.profile: the recorded step's trace (and CUDA memory snapshot)
HYDRA_DIR = ".hydra"
# What a run leaves besides Hydra's files: moved aside together when a result is superseded.
RESULT_FILES = (
    METRICS_FILE,
    HISTORY_FILE,
    DEV_PREDICTIONS_FILE,
    ERROR_LOG,
    DATA_QUALITY_FILE,
    OOF_PREDICTIONS_FILE,
    OOF_CANDIDATES_FILE,
    SUBMISSION_FILE,
)
RUN_PLOTS = ("loss.png", "throughput.png", "memory.png")
RUN_LOG, TRACKING_DIR = "run.log", "tracking"
# Everything a run leaves in its folder: moved aside together when the folder is used again
RUN_ENTRIES = (
    *RESULT_FILES,
    *RUN_PLOTS,
    MODEL_DIR,
    CHECKPOINTS_DIR,
    PROFILE_DIR,
    HYDRA_DIR,
    RUN_LOG,
    TRACKING_DIR,
    ENSEMBLE_PREDICTIONS_FILE,
    ENSEMBLE_REPORT,
)

# A sweep folder
SWEEP_CSV, KNEE_REPORT, KNEE_PNG = "sweep.csv", "knee_report.md", "knee.png"
PARETO_REPORT, PARETO_PNG = "pareto_report.md", "pareto.png"
INFERENCE_REPORT, INFERENCE_PNG = "inference_report.md", "inference.png"
BEST_FILE = "best_overrides.txt"  # an Optuna study's best trial as a command
FINAL_DIR = "final"  # sweep.then_train: the recommended cell trained for its full schedule (a run folder)
KNEE_SEARCH_FILE = "knee_search.json"  # the knee sweeper's path
MULTIRUN_YAML = "multirun.yaml"
OPTUNA_RESULTS = "optimization_results.yaml"
SWEEP_FILES = (
    SWEEP_CSV,
    KNEE_REPORT,
    KNEE_PNG,
    PARETO_REPORT,
    PARETO_PNG,
    INFERENCE_REPORT,
    INFERENCE_PNG,
    BEST_FILE,
    KNEE_SEARCH_FILE,
    MULTIRUN_YAML,
    OPTUNA_RESULTS,
    FINAL_DIR,
)
SUPERSEDED = "superseded_"  # the prefix of a folder that holds what an earlier run or launch left


@dataclass
class RunMetrics:
    """metrics.json: one run's outcome and figures. Sections that only some runs have (eval,
    predict, kfold, solar, ...) are plain dicts documented where they are filled."""

    status: Status = Status.failed
    error: str | None = None
    phase: str | None = None  # where a failure happened: setup, load, train, eval, predict, ensemble
    user_error: bool = False  # refused for its input (config, data, weights, key, folder): exit code 2
    mode: str = "train"
    model: str | None = None
    data: str | None = None
    device: str | None = None
    num_processes: int | None = None
    batch_size: int | None = None  # samples per micro-batch; null with max_tokens (they vary)
    max_tokens: int | None = None  # batch.max_tokens: each micro-batch's budget of padded positions
    gradient_accumulation_steps: int | None = None
    effective_batch_size: int | None = None  # samples per optimizer step; null with max_tokens
    mixed_precision: str | None = None
    gradient_checkpointing: bool | None = None
    optimizer: str | None = None  # as built (summ/training/optimizers.py: said): adamw_fused, adamw_8bit, ...
    attention: str | None = None  # as built: transformers' pick (sdpa, eager) where model.attn_implementation is null
    quantization: str | None = None
    lora: bool | None = None
    config_hash: str | None = None
    random_init: bool = False  # a test-size model with random weights: its ROUGE means nothing
    trainable_params: int | None = None
    total_params: int | None = None
    train_set_size: int | None = None  # samples one epoch draws from (after fold, quality filter, augmentation)
    eval_set_size: int | None = None
    train: TrainFigures | None = None
    memory: MemoryFigures | None = None
    eval: dict | None = None  # loss, rouge1/2/L, rouge_sum, rouge_mean, n, generation speed, tta, quantized, oof
    epoch_seconds_projected: float | None = None  # one epoch's padded positions at the measured positions/s
    mfu: float | None = None  # model FLOPs utilisation: flops_per_token x tokens/s / peak
    hfu: float | None = None  # hardware FLOPs utilisation: padding and recompute included
    wall_seconds: float | None = None  # the whole job: setup, training, evaluation
    machine: dict | None = None  # what competed with the run: load average, CPU time, other GPU processes
    caveats: list | None = None  # settings that change what a figure means (measurement.Measurement.plan)
    reused: dict | None = None  # what this cell took from earlier cells of its sweep (data, model)
    recommended_cell: dict | None = None  # sweep.then_train: the sweep, job and overrides this run trains
    resumed_from: dict | None = None
    profile: dict | None = None  # measure.profile: the recorded step and its files (trace, CUDA memory snapshot)
    checkpoint: str | None = None
    augmentation: dict | None = None
    data_quality: dict | None = None
    folds: list | None = None
    kfold: dict | None = None
    trained_from: str | None = None
    lora_adapter: bool | None = None
    inference: dict | None = None
    predict: dict | None = None
    solar: dict | None = None
    reused_from: str | None = None  # a finished cell of another sweep or trial whose result this is
    reused_trial: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == Status.ok

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def write_metrics(folder: Path, record: RunMetrics) -> None:
    atomic_write_json(Path(folder) / METRICS_FILE, record.to_dict())


def write_history(folder: Path, history: list[dict]) -> None:
    write_jsonl(Path(folder) / HISTORY_FILE, history)


def read_history(folder: Path) -> list[dict]:
    return read_jsonl(Path(folder) / HISTORY_FILE)


@dataclass
class MetricsRead:
    record: RunMetrics | None
    problem: str | None = None  # "missing", or "corrupt: <why>"
    raw: dict = field(default_factory=dict)  # the file as read (keys a newer summ wrote are kept here)


def read_metrics(folder: Path) -> MetricsRead:
    """The run's metrics.json as a RunMetrics; no record and a one-line problem when it is
    missing or unusable (not JSON, no status, a figure that is not a number)."""
    path = Path(folder) / METRICS_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return MetricsRead(None, "missing")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return MetricsRead(None, f"corrupt: {str(exc).splitlines()[0]}")
    try:
        return MetricsRead(_record(raw), None, raw)
    except (TypeError, ValueError) as exc:
        return MetricsRead(None, f"corrupt: {exc}", raw if isinstance(raw, dict) else {})


def _record(raw: Any) -> RunMetrics:
    if not isinstance(raw, dict) or raw.get("status") not in RUN_STATUSES:
        raise ValueError(f"no valid status (one of {', '.join(RUN_STATUSES)})")
    top = {**_typed(RunMetrics, raw, ""), "status": Status(raw["status"])}
    top["train"] = None if raw.get("train") is None else TrainFigures(**_typed(TrainFigures, raw["train"], "train."))
    top["memory"] = None if raw.get("memory") is None else _memory(raw["memory"])
    return RunMetrics(**top)


def _memory(raw: Any) -> MemoryFigures:
    memory = _typed(MemoryFigures, raw, "memory.")
    if memory.get("components") is not None:
        memory["components"] = MemoryComponents(**_typed(MemoryComponents, memory["components"], "memory.components."))
    return MemoryFigures(**memory)


_NUMBER_TYPES = ("int", "float", "Optional[int]", "Optional[float]", "int | None", "float | None")  # either spelling


def _typed(cls, raw: Any, prefix: str) -> dict:
    """The fields of `cls` found in `raw`, each number checked to be one."""
    if not isinstance(raw, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'the file'} is not an object")
    out = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        value = raw[f.name]
        if (
            str(f.type) in _NUMBER_TYPES
            and value is not None
            and (isinstance(value, bool) or not isinstance(value, (int, float)))
        ):
            raise ValueError(f"{prefix}{f.name} is {value!r}, not a number")
        out[f.name] = value
    return out


def read_predictions(folder: Path, name: str = DEV_PREDICTIONS_FILE) -> list[dict] | None:
    """The rows of a predictions CSV (fname, prediction, reference, all_references), or None."""
    import csv

    path = Path(folder) / name
    if not path.is_file():
        return None
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def read_yaml(path: Path) -> Any:
    """A YAML file, or None when it is missing or unreadable."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def job_overrides(folder: Path) -> list[str]:
    """The overrides Hydra recorded for a job (the cell's own settings)."""
    found = read_yaml(Path(folder) / HYDRA_DIR / "overrides.yaml")
    return [str(o) for o in found] if isinstance(found, list) else []


def job_config(folder: Path) -> dict:
    """The job's composed config as Hydra saved it ({} when absent)."""
    found = read_yaml(Path(folder) / HYDRA_DIR / "config.yaml")
    return found if isinstance(found, dict) else {}


def is_run_folder(folder: Path) -> bool:
    return (Path(folder) / METRICS_FILE).is_file() or (Path(folder) / HYDRA_DIR).is_dir()


def job_dirs(sweep_dir: Path) -> list[Path]:
    """A sweep's job folders, in job order (0, 1, ..., then any others by name); not the final run."""
    dirs = [d for d in Path(sweep_dir).iterdir() if d.is_dir() and d.name != FINAL_DIR and is_run_folder(d)]
    return sorted(dirs, key=lambda d: (0, int(d.name)) if d.name.isdigit() else (1, d.name))


def set_aside(folder: Path, cfg_hash: str, resuming: bool = False) -> Path | None:
    """A folder that already holds a result the new run will not reuse (another config under
    sweep.resume, a failed cell, a command run again into the same folder): its result files move
    to superseded_<their config hash>[_n]/ inside it, never overwritten. Returns that folder."""
    folder = Path(folder)
    present = [folder / f for f in RESULT_FILES if (folder / f).exists()]
    if not present:
        return None
    present += [folder / f for f in (*RUN_PLOTS, MODEL_DIR) if (folder / f).exists()]  # results too, not in use
    earlier = read_metrics(folder)
    old_hash = (earlier.record.config_hash if earlier.record else earlier.raw.get("config_hash")) or "unknown"
    target = move_aside(folder, present, old_hash)
    if resuming:  # train.resume_from: the record of the run this one continues (its checkpoints stay)
        log.info("%s: the interrupted run's record moved to %s; this run continues from its checkpoint", folder, target)
        return target
    why = "another config" if old_hash not in (cfg_hash, "unknown") else "an unfinished or failed run"
    log.warning(
        "%s held a result of %s (config %s, this run's %s): moved to %s; it is measured again",
        folder,
        why,
        old_hash,
        cfg_hash,
        target,
    )
    return target


def earlier_run(folder: Path) -> list[Path]:
    """What an earlier run left in a run folder (RUN_ENTRIES and K-fold members' fold_<k>/), and
    what an earlier sweep left there (its job folders and reports): a folder holds one or the other."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    own = [
        p
        for p in sorted(folder.iterdir())
        if p.name in RUN_ENTRIES or (p.name.startswith("fold_") and p.name[5:].isdigit() and p.is_dir())
    ]
    return own + [p for p in job_dirs(folder) + [folder / f for f in SWEEP_FILES] if p.exists() and p not in own]


def earlier_launch(sweep_dir: Path, launched_at: float) -> list[Path]:
    """What an earlier launch left in a sweep folder (its job folders and sweep files, or a single
    run's files), those not touched since this launch started (`launched_at`, seconds since the epoch)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return []
    return [p for p in earlier_run(sweep_dir) if p.stat().st_mtime < launched_at]


def unused(name: Callable[[int], Path]) -> Path:
    """The first of name(1), name(2), ... that does not exist: where an earlier file goes aside."""
    n = 1
    while name(n).exists():
        n += 1
    return name(n)


def move_aside(folder: Path, items: list[Path], label: str) -> Path:
    """`items` (entries of `folder`) into a new folder <folder>/superseded_<label>[_n]/; returns it."""
    folder = Path(folder)
    target = unused(lambda n: folder / f"{SUPERSEDED}{label}{'' if n == 1 else f'_{n}'}")
    target.mkdir(parents=True)
    for path in items:
        path.replace(target / path.name)
    return target


_MARK = re.compile(r"\n<!-- written by summ: sha256 ([0-9a-f]{16}) -->\n$")


def write_report(folder: Path, name: str, text: str, keep_earlier: bool = False) -> Path:
    """A report people read and may annotate or protect (knee_report.md, sweep.csv, ...): rewritten
    in place only while it is as summ wrote it (a Markdown report carries the digest of its text in
    a last-line comment) and its owner may write it; otherwise the earlier file first moves aside
    to <stem>.earlier[_n]<suffix>, its text and permissions as they were. `keep_earlier`: an
    earlier file always moves aside (a result of other settings, not a copy of this one)."""
    path = Path(folder) / name
    if path.is_file() and (keep_earlier or not path.stat().st_mode & 0o200 or not _as_written(path)):
        target = unused(lambda n: path.with_name(f"{path.stem}.earlier{'' if n == 1 else f'_{n}'}{path.suffix}"))
        path.replace(target)
        log.warning(
            "%s %s: kept as %s; the new one is %s",
            path,
            "held an earlier result" if keep_earlier else "was edited or made read-only since summ wrote it",
            target.name,
            path.name,
        )
    if path.suffix == ".md":
        text += f"\n<!-- written by summ: sha256 {_digest(text)} -->\n"
    return write_text(folder, name, text)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _as_written(path: Path) -> bool:
    """A Markdown report whose last line still carries the digest of the text above it (other
    reports: always)."""
    if path.suffix != ".md":
        return True
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    mark = _MARK.search(text)
    return mark is not None and mark.group(1) == _digest(text[: mark.start()])


def write_text(folder: Path, name: str, text: str) -> Path:
    """One of the files named above, written atomically."""
    path = Path(folder) / name
    atomic_write_text(path, text)
    return path
