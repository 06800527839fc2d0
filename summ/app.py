"""The task function behind run.py: one composed config in, the sweeper's objective out.

Runs the job, prints its summary table, and turns user errors into one line: exit code 2 for a
single run, a penalised trial (with the line logged) inside a multirun so the sweep goes on.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from summ.errors import Interrupted, UserError
from summ.summary import format_summary

log = logging.getLogger("summ")
# transformers' scheduler module imports peft, which imports bitsandbytes, whose CPU backend warns
# on every run that an optional kernel package is absent (it falls back to its own code)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def run(cfg: DictConfig) -> float | tuple[float, float]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from summ.distributed import is_main_process
    from summ.io import atomic_write_json
    from summ.study import record_trial
    from summ.train import METRICS_FILE, objective_value, penalty_value

    hc = HydraConfig.get()
    output_dir, multirun, overrides = Path(hc.runtime.output_dir), hc.mode == RunMode.MULTIRUN, list(hc.overrides.task)
    if multirun:
        from summ.sweep import apply_trial_defaults

        cfg = apply_trial_defaults(cfg, overrides)
    try:
        metrics = _measured_before(cfg, output_dir)
        if metrics is None:
            from summ.train import train

            # tracker run name, and the sweep that groups it (one experiment / group per sweep folder)
            names = ((hc.job.override_dirname or output_dir.name), Path(hc.sweep.dir).name) if multirun else None
            metrics = train(cfg, output_dir, tracking_names=names)
    except Interrupted as exc:  # the sweep stops too: the user asked to stop
        print(f"interrupted: {exc}\nresume with the same command and train.resume_from={exc.checkpoint}",
              file=sys.stderr)
        sys.exit(128 + exc.signum)
    except UserError as exc:
        if multirun:  # the sweep goes on; the cell's folder says why it has no figures
            log.error("job failed: %s", exc)
            if is_main_process() and not (output_dir / METRICS_FILE).exists():
                atomic_write_json(output_dir / METRICS_FILE, {"status": "failed", "error": str(exc)})
            return penalty_value(OmegaConf.to_object(cfg))
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if is_main_process():  # one summary and one trial record per launch
        if multirun:
            record_trial(hc, overrides, {**metrics, "job_dir": str(output_dir)})
        print(format_summary(metrics, output_dir))
    return objective_value(metrics, OmegaConf.to_object(cfg))


def _measured_before(cfg: DictConfig, output_dir: Path) -> Optional[dict]:
    """A finished result for this exact config: the job folder's own (sweep.resume) or a cell of
    another sweep (sweep.reuse_from, copied into the job folder). None: measure it."""
    from summ.io import atomic_write_json
    from summ.sweep import reusable_metrics, reused_from_sweep
    from summ.train import METRICS_FILE, config_hash

    if cfg.sweep.resume:
        prior = reusable_metrics(output_dir, config_hash(cfg))
        if prior is not None:
            log.info("resume: %s already holds a complete %s result for this config; not measured again",
                     output_dir, prior["status"])
            return prior
    if cfg.sweep.reuse_from:
        found = reused_from_sweep(Path(cfg.sweep.reuse_from), config_hash(cfg))
        if found is not None:
            source, prior = found
            log.info("sweep.reuse_from: %s measured this config already (%s); its result is taken",
                     source, prior["status"])
            prior = {**prior, "reused_from": str(source)}
            atomic_write_json(output_dir / METRICS_FILE, prior)
            return prior
    return None


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a hard dependency
    Callback = object  # type: ignore[misc,assignment]


class OutputFolderCallback(Callback):
    """The run or sweep folder is made before Hydra's own mkdir, so a folder that cannot exist
    (its parent is a file) is one line and exit code 2 instead of Hydra's traceback."""

    def _check(self, folder: str) -> None:
        from summ.io import make_folder

        try:
            make_folder(folder)
        except UserError as exc:
            print(f"error: {exc}: set hydra.run.dir / hydra.sweep.dir to a folder that can be created",
                  file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.sweep.dir)
