"""A Hydra sweeper that finds the batch-size knee in few trials.

Like DeepSpeed's autotuner and Ludwig's batch-size tuner, but at a fixed accumulation or a fixed
effective batch and with memory measured rather than guessed:

1. Double the micro-batch from `min_batch_size` (accumulation fixed, or derived from
   `effective_batch_size`) until a cell ends oom or over_budget, or `patience` + 1 readings in
   a row do not beat the best by `tolerance` (a drop is measured a second time before it counts).
2. Bisect, down to `resolution` x the size: above the best for the memory edge, else below it
   for the knee (the smallest micro-batch as fast as the best).
3. Before each trial, once two cells have run ok, the memory model of the knee report
   (peak = a + b x micro-batch x positions) predicts the peak; a cell predicted over the limit
   is not run and counts as bad.
The search itself is summ.sweeps.knee_search.knee_search; this class measures each cell as a Hydra job.
Its settings are KneeSweeperConf, checked in one place, check_settings, before the first trial
(KneeSettingsCallback, listed in conf/config.yaml).

Each trial is an ordinary job (its metrics in its folder), so the knee report, `sweep.resume`
and `summ-report` work as for a grid. The decisions are written to knee_search.json.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from summ.errors import ConfigError
from summ.files import atomic_write_json
from summ.reports.cells import Cell, read_job
from summ.run_folder import KNEE_SEARCH_FILE, MULTIRUN_YAML, job_dirs, write_text
from summ.sweeps.callbacks import refuse_on_config_error
from summ.sweeps.knee_search import Trial, knee_search, predicted_over_limit

log = logging.getLogger(__name__)


@dataclass
class KneeSweeperConf:
    """The knee sweeper's settings (hydra.sweeper.*), checked before the first trial by check_settings."""

    _target_: str = "hydra_plugins.summ_knee_sweeper.knee_sweeper.KneeSweeper"
    # the size searched: batch_size (samples per micro-batch) or max_tokens (a token budget per
    # micro-batch: min_batch_size and max_batch_size are then in padded positions)
    size: str = "batch_size"
    min_batch_size: int = 1
    max_batch_size: int = 512
    gradient_accumulation_steps: int = 1  # used when effective_batch_size is null
    effective_batch_size: int | None = None  # fixed samples per update; accumulation derived
    # a doubling that gains less than this is past the knee (-1: stop on memory only); by default
    # the knee report's own tolerance, so the search and its report judge "as fast" alike
    tolerance: float = "${knee.tolerance}"  # type: ignore[assignment]  # an interpolation, resolved to a float
    # flat doublings (within the tolerance of the best) in a row before stopping: one flat doubling is
    # not yet the knee, noise often reads flat
    patience: int = 1
    resolution: float = 0.25  # stop bisecting when the gap is under this fraction of the good size
    max_trials: int = 12
    use_memory_model: bool = True


ConfigStore.instance().store(group="hydra/sweeper", name="knee", node=KneeSweeperConf, provider="summ")

# (key, low, high, whether high itself is allowed): tolerance -1 stops on memory only; resolution 1
# does not bisect between powers of two
RANGES = (("tolerance", -1.0, 1.0, False), ("resolution", 0.0, 1.0, True))
SIZES = ("batch_size", "max_tokens")  # hydra.sweeper.size: the batch key the search sets


def check_settings(sweeper: DictConfig) -> None:
    """Settings of the knee sweeper (hydra.sweeper) that cannot work: one ConfigError naming the key."""
    for key in ("min_batch_size", "max_batch_size", "max_trials"):
        value = sweeper.get(key)
        if value is not None and value < 1:
            raise ConfigError(f"hydra.sweeper.{key}={value} is invalid: it must be >= 1")
    for key, low, high, closed in RANGES:
        value = sweeper.get(key)
        if value is not None and not (low <= value < high or (closed and value == high)):
            raise ConfigError(
                f"hydra.sweeper.{key}={value} is invalid: it must be in [{low:g}, {high:g}{']' if closed else ')'}"
            )
    size = sweeper.get("size", "batch_size")
    if size not in SIZES:
        raise ConfigError(f"hydra.sweeper.size={size} is invalid: it must be one of {', '.join(SIZES)}")
    if size == "max_tokens" and sweeper.get("effective_batch_size") is not None:
        raise ConfigError(
            "hydra.sweeper.size=max_tokens fills micro-batches by positions, so no effective batch can be kept: "
            "set hydra.sweeper.effective_batch_size=null and hydra.sweeper.gradient_accumulation_steps"
        )
    if sweeper.min_batch_size > sweeper.max_batch_size:
        raise ConfigError(
            f"hydra.sweeper.min_batch_size={sweeper.min_batch_size} exceeds "
            f"hydra.sweeper.max_batch_size={sweeper.max_batch_size}"
        )


class KneeSettingsCallback(Callback):
    """Before a knee sweep's first trial (conf/config.yaml lists it): check_settings, a refusal in
    one line and exit code 2."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if "knee" in str(config.hydra.sweeper.get("_target_", "")).lower():
            refuse_on_config_error(lambda: check_settings(config.hydra.sweeper))


class KneeSweeper(Sweeper):
    def __init__(
        self,
        min_batch_size: int,
        max_batch_size: int,
        gradient_accumulation_steps: int,
        effective_batch_size: int | None,
        tolerance: float,
        resolution: float,
        max_trials: int,
        use_memory_model: bool,
        patience: int = 1,
        size: str = "batch_size",
    ) -> None:
        self.size = size
        self.min_bs, self.max_bs = min_batch_size, max_batch_size
        self.ga, self.eff = gradient_accumulation_steps, effective_batch_size
        self.tolerance, self.resolution, self.max_trials, self.patience = tolerance, resolution, max_trials, patience
        self.use_memory_model = use_memory_model
        self.returns: list[JobReturn] = []
        self.job_idx = 0
        self.limit_bytes: int | None = None
        self.read: dict[str, Cell] = {}  # the sweep folder's cells by job folder, each read once

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # ------------------------------------------------------------------ cells
    def _accumulation(self, bs: int) -> int | None:
        if self.eff is None or self.size == "max_tokens":
            return self.ga
        return self.eff // bs if self.eff % bs == 0 else None

    def _run(self, bs: int, arguments: list[str]):
        ga = self._accumulation(bs)
        overrides = [
            *arguments,
            f"batch.{self.size}={bs}",
            f"batch.gradient_accumulation_steps={ga}",
            "batch.effective_batch_size=null",
        ]
        ret = self.launcher.launch([tuple(overrides)], initial_job_idx=self.job_idx)[0]
        self.job_idx += 1
        self.returns.append(ret)
        out = Path(ret.hydra_cfg.hydra.runtime.output_dir)
        cell = read_job(out, f"job {out.name}")[0]  # a job without usable metrics: status missing/corrupt
        self.read[out.name] = cell
        if cell.limit_bytes:
            self.limit_bytes = cell.limit_bytes
        trial = Trial(bs, ga, cell.status, cell.samples_per_s, cell.peak_bytes, out.name)
        log.info(
            "knee: %s %d x %d -> %s%s",
            "micro-batch" if self.size == "batch_size" else "batch.max_tokens",
            bs,
            ga,
            trial.status,
            f", {trial.samples_per_s:.2f} samples/s" if trial.samples_per_s else "",
        )
        return trial

    def _predicted_over(self, bs: int) -> float | None:
        """The predicted peak when the memory model says `bs` will not fit, else None."""
        if not self.use_memory_model or not self.limit_bytes:
            return None
        return predicted_over_limit([c for c in self._cells() if c.ok], bs, self.limit_bytes)

    def _cells(self) -> list[Cell]:
        """The sweep folder's cells in job order, as load_cells reads them, but each folder read
        once: those this sweep measured are kept from _run, the rest (a resumed sweep's earlier
        jobs) read at their first prediction."""
        dirs = job_dirs(Path(self.config.hydra.sweep.dir))
        for d in dirs:
            if d.name not in self.read:
                self.read[d.name] = read_job(d, f"job {d.name}")[0]
        return [self.read[d.name] for d in dirs]

    # ------------------------------------------------------------------ search
    def sweep(self, arguments: list[str]) -> Any:
        if any("," in a.split("=", 1)[-1] or "(" in a for a in arguments):
            raise ValueError(
                f"the knee sweeper chooses the batch itself: pass single values only (got {' '.join(arguments)})"
            )
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        write_text(sweep_dir, MULTIRUN_YAML, OmegaConf.to_yaml(self.config))
        result = knee_search(
            lambda bs: self._run(bs, arguments),
            self._predicted_over,
            self._accumulation,
            min_batch_size=self.min_bs,
            max_batch_size=self.max_bs,
            tolerance=self.tolerance,
            resolution=self.resolution,
            max_trials=self.max_trials,
            patience=self.patience,
        )
        summary = {
            **{k: v for k, v in result.items() if k != "trials"},
            "cells": [t.__dict__ for t in sorted(result["trials"].values(), key=lambda t: t.batch_size)],
        }
        atomic_write_json(sweep_dir / KNEE_SEARCH_FILE, summary)
        log.info(
            "knee search: %d trials; %s; %s; the rule's answer among the cells measured: %s %s",
            result["trials_run"],
            result["stopped_doubling"],
            bracket(result["last_good"], result["first_bad"], self.size),
            "micro-batch" if self.size == "batch_size" else "batch.max_tokens",
            result["answer"],
        )
        return self.returns


def bracket(lo: int | None, hi: int | None, size: str = "batch_size") -> str:
    """Where the search left the edge it looked for, in words."""
    what = "micro-batch" if size == "batch_size" else "batch.max_tokens"
    if lo is None and hi is None:
        return "no cell fitted"
    if lo is None or hi is None or lo == hi:
        return f"the edge is {what} {lo if lo is not None else hi} itself (nothing to bisect around it)"
    return f"the edge lies between {what} {lo} and {hi}"
