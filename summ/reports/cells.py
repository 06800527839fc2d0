"""A sweep's cells as the reports read them: one Cell per job folder, from its metrics record
(summ/run_folder.py reads it) and the overrides Hydra recorded for it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from summ.errors import Status
from summ.run_folder import HYDRA_DIR, METRICS_FILE, RunMetrics, job_config, job_dirs, job_overrides, read_metrics


@dataclass
class Cell:
    job: str
    overrides: list[str]
    status: str
    error: str | None = None
    user_error: bool = False  # refused for its input: a config, data, weights or key to change
    model: str | None = None
    data: str | None = None
    batch_size: int | None = None  # null with a token budget
    max_tokens: int | None = None  # batch.max_tokens: the micro-batches' budget of padded positions
    gradient_accumulation_steps: int | None = None
    effective_batch_size: int | None = None  # null with a token budget
    mixed_precision: str | None = None
    gradient_checkpointing: bool | None = None
    optimizer: str | None = None  # as built (adamw_fused, adamw_8bit, ...)
    attention: str | None = None  # as built (sdpa, sdpa_varlen, ...): a preset may pick it per cell
    config_hash: str | None = None
    reused_from: str | None = None
    copy_of: str | None = None  # the job of this same sweep whose result this one took (an Optuna repeat)
    interval_of: str = "steps"  # what samples_per_s_interval spans: the per-step rates, or the "runs"' means
    samples_per_s: float | None = None
    samples_per_s_interval: list | None = None  # [q1, q3] of the per-step rates
    samples: int | None = None
    optimizer_steps: int | None = None  # measured
    tokens: int | None = None
    tokens_per_s: float | None = None
    seconds_per_sample: float | None = None
    step_time_s_median: float | None = None
    step_time_s_p90: float | None = None
    peak_bytes: int | None = None  # the worst of observed and probe
    observed_peak_bytes: int | None = None
    probe_peak_bytes: int | None = None
    alloc_retries: int | None = None
    num_ooms: int | None = None
    busy: bool = False  # timed while other work competed for the machine
    capacity_fraction: float | None = None
    budget_bytes: int | None = None
    budget_source: str | None = None  # measure.memory_budget_gb, or the device's capacity
    limit_bytes: int | None = None
    positions: int | None = None  # padded positions of the largest micro-batch
    probe_positions: int | None = None  # padded positions of the probe's worst-case micro-batch
    pad_fraction: float | None = None  # share of the positions that were padding
    epoch_seconds_projected: float | None = None
    mfu: float | None = None
    hfu: float | None = None
    eval_loss: float | None = None
    rouge1: float | None = None
    rouge2: float | None = None
    rougeL: float | None = None
    rouge_mean: float | None = None
    components: dict | None = None  # metrics.memory.components: the training peak by part, bytes
    phase_seconds: dict | None = None  # metrics.train.phase_seconds: the measured steps' seconds by phase
    flags: list[str] = field(default_factory=list)
    caveats: list[str] = field(default_factory=list)  # settings that change what its figures mean

    @property
    def ok(self) -> bool:
        return self.status == Status.ok and bool(self.samples_per_s)

    @property
    def micro(self) -> int | None:
        """The size a knee is found in: the token budget where set, else the micro-batch's samples."""
        return self.max_tokens if self.max_tokens is not None else self.batch_size

    @property
    def by_tokens(self) -> bool:
        return self.max_tokens is not None

    @property
    def per_step(self) -> tuple | None:
        """What one optimizer step holds, a fixed-effective-batch series' key: ("samples", the
        effective batch), or ("tokens", the budget x accumulation) for a token budget."""
        if self.by_tokens:
            return (
                ("tokens", self.max_tokens * self.gradient_accumulation_steps)
                if self.gradient_accumulation_steps
                else None
            )
        return ("samples", self.effective_batch_size) if self.effective_batch_size else None

    @property
    def samples_per_step(self) -> float | None:
        """The effective batch; a token budget's mean over the measured steps."""
        if self.effective_batch_size:
            return self.effective_batch_size
        return self.samples / self.optimizer_steps if self.samples and self.optimizer_steps else None

    @property
    def split_text(self) -> str:
        """How the batch is split: "8 x 2", or "2048 tokens x 2"."""
        size = f"{self.max_tokens} tokens" if self.by_tokens else f"{self.batch_size}"
        return f"{size} x {self.gradient_accumulation_steps}"

    @property
    def micro_text(self) -> str:
        return f"{self.max_tokens}-token micro-batches" if self.by_tokens else f"micro-batch {self.batch_size}"

    @property
    def step_text(self) -> str:
        """What one optimizer step holds, in words: "effective 16", "2048 tokens a step, a mean 21.3 samples"."""
        if not self.by_tokens:
            return f"effective {self.effective_batch_size}"
        mean = self.samples_per_step
        return f"{self.per_step[1]} tokens a step" + (f", a mean {mean:.1f} samples" if mean else "")

    @property
    def budget_fraction(self) -> float | None:
        if self.peak_bytes is None or not self.budget_bytes:
            return None
        return self.peak_bytes / self.budget_bytes

    def part_bytes(self, key: str) -> int | None:
        """A memory component (`weights_bytes`, `activations_bytes`, ...), None where not counted."""
        return (self.components or {}).get(key)

    def phase_per_sample(self, phase: str) -> float | None:
        """Seconds of `phase` per sample over the measured steps."""
        if not self.phase_seconds or not self.samples or phase not in self.phase_seconds:
            return None
        return self.phase_seconds[phase] / self.samples

    def settings(self) -> dict[str, str]:
        """The cell's own overrides other than the batch split (preset and Hydra's keys aside), and
        the attention it was built with where no override names one (preset=optuna_levers picks it
        from packing: the report shows it where it differs between cells)."""
        out = {"model.attn_implementation": self.attention} if self.attention else {}
        for o in self.overrides:
            key, _, value = o.lstrip("+~").partition("=")
            if not key.startswith(
                (
                    "batch.batch_size",
                    "batch.max_tokens",
                    "batch.gradient_accumulation_steps",
                    "batch.effective_batch_size",
                    "hydra.",
                    "preset",
                )
            ):
                out[key] = value
        return out

    def other_settings(self) -> tuple:
        """Everything that defines the cell except how the batch is split."""
        rest = tuple(sorted(o for o in self.overrides if not o.split("=", 1)[0].lstrip("+~").startswith("batch.")))
        return (self.model, self.mixed_precision, self.gradient_checkpointing, rest)


def load_cells(sweep_dir: Path) -> tuple[list[Cell], list[str]]:
    """One Cell per job folder; missing or corrupt metrics become a warning and a row."""
    cells, warnings = [], []
    dirs = job_dirs(sweep_dir)
    recorded = [(d / HYDRA_DIR / "overrides.yaml").is_file() for d in dirs]
    if any(recorded):  # a job whose overrides are gone would be grouped as if it set nothing beyond the batch
        warnings += [
            f"job {d.name}: no .hydra/overrides.yaml, so its own settings are unknown: it is grouped with "
            f"the cells that set nothing beyond the batch, which may be wrong"
            for d, known in zip(dirs, recorded)
            if not known and (d / METRICS_FILE).is_file()
        ]
    for d in dirs:
        cell, warning = read_job(d, f"job {d.name}")
        if cell.reused_from and Path(cell.reused_from).parent.resolve() == Path(sweep_dir).resolve():
            cell.copy_of = Path(cell.reused_from).name
        cells.append(cell)
        if warning:
            warnings.append(warning)
    return cells, warnings


def read_job(d: Path, label: str) -> tuple[Cell, str | None]:
    """A job or run folder as a Cell, and a warning (`label`: how to name it) when its
    metrics file is missing or unusable: then the Cell comes from its saved config."""
    overrides = job_overrides(d)
    found = read_metrics(d)
    if found.record is not None:
        return cell_from_metrics(d.name, overrides, found.record), None
    if found.problem == "missing":
        return _from_config(d, overrides, Status.missing), f"{label}: no {METRICS_FILE} (the job did not finish)"
    return _from_config(d, overrides, Status.corrupt), f"{label}: {METRICS_FILE} is {found.problem}; skipped"


def _from_config(d: Path, overrides: list[str], status: str) -> Cell:
    cfg = job_config(d)
    batch = cfg.get("batch") or {}
    tokens, ga = batch.get("max_tokens"), batch.get("gradient_accumulation_steps")
    bs = None if tokens else batch.get("batch_size")
    return Cell(
        job=d.name,
        overrides=overrides,
        status=status,
        model=(cfg.get("model") or {}).get("name"),
        batch_size=bs,
        max_tokens=tokens,
        gradient_accumulation_steps=ga,
        effective_batch_size=bs * ga if bs and ga else None,
    )


def cell_from_metrics(job: str, overrides: list[str], m: RunMetrics) -> Cell:
    t, mem, ev = m.train, m.memory, m.eval or {}
    return Cell(
        job=job,
        overrides=overrides,
        status=m.status,
        error=m.error,
        user_error=m.user_error,
        model=m.model,
        data=m.data,
        batch_size=m.batch_size,
        max_tokens=m.max_tokens,
        gradient_accumulation_steps=m.gradient_accumulation_steps,
        effective_batch_size=m.effective_batch_size,
        mixed_precision=m.mixed_precision,
        gradient_checkpointing=m.gradient_checkpointing,
        optimizer=m.optimizer,
        attention=m.attention,
        config_hash=m.config_hash,
        reused_from=m.reused_from,
        samples_per_s=t and t.samples_per_s,
        samples_per_s_interval=t and t.samples_per_s_interval,
        tokens_per_s=t and t.tokens_per_s,
        seconds_per_sample=t and t.seconds_per_sample,
        step_time_s_median=t and t.step_time_s_median,
        step_time_s_p90=t and t.step_time_s_p90,
        samples=t and t.samples,
        optimizer_steps=t and t.optimizer_steps,
        tokens=t and t.tokens,
        positions=t and t.max_micro_batch_positions,
        pad_fraction=t and t.pad_fraction,
        peak_bytes=mem and mem.peak_bytes,
        observed_peak_bytes=mem and mem.observed_peak_bytes,
        probe_peak_bytes=mem and mem.probe_peak_bytes,
        probe_positions=mem and mem.probe_positions,
        capacity_fraction=mem and mem.fraction,
        budget_bytes=mem and mem.budget_bytes,
        budget_source=mem and mem.budget_source,
        limit_bytes=mem and mem.limit_bytes,
        alloc_retries=mem and mem.alloc_retries,
        num_ooms=mem and mem.num_ooms,
        components=mem and mem.components and dataclasses.asdict(mem.components),
        phase_seconds=t and t.phase_seconds,
        busy=bool((m.machine or {}).get("busy")),
        caveats=list(m.caveats or []),
        epoch_seconds_projected=m.epoch_seconds_projected,
        mfu=m.mfu,
        hfu=m.hfu,
        eval_loss=ev.get("loss"),
        rouge1=ev.get("rouge1"),
        rouge2=ev.get("rouge2"),
        rougeL=ev.get("rougeL"),
        rouge_mean=ev.get("rouge_mean"),
    )
