"""The task function behind run.py: one composed config in, the sweeper's objective out.

A single run prints its summary and exits with the code of its status (summ/errors.py: 0 ok,
1 failed, 2 user error, 3 oom / over_budget / diverged, 130 / 143 interrupted). Inside a multirun
a job never exits: a failure is recorded in its folder and penalised, and the sweep goes on.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from summ.errors import Interrupted, UserError, exit_code

log = logging.getLogger("summ")


def quiet_third_party() -> None:
    """Silence what libraries print on every run and that says nothing about this one: warnings
    about other code and bars for a single file. Their warnings about the run itself stay."""
    import warnings

    # bitsandbytes' CPU backend: an optional kernel package is absent (it falls back to its own code)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # accelerate's save of a model with tied embeddings: "Removed shared tensor ... should be OK"
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    # peft reads and calls transformers' deprecated names itself; nothing for us to change
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*deprecated", category=FutureWarning)


def say(text: str, err: bool = False) -> None:
    """Print for the user; a closed pipe (`| head`, a `| tee` killed by the same Ctrl-C) is not an error."""
    import os

    stream = sys.stderr if err else sys.stdout
    try:
        print(text, file=stream, flush=True)
    except (BrokenPipeError, OSError):  # later writes (and the flush at exit) go nowhere, quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        except (OSError, ValueError):
            pass


def guard_hydra_writes() -> None:
    """Hydra writes .hydra/*.yaml of every job itself, before our code runs: a full disk there would
    end in its traceback. Make it one line and exit code 2, like our own writes. A log handler that
    cannot write (the same full disk) stays quiet instead of printing a traceback per line."""
    import hydra.core.utils as hydra_utils

    logging.raiseExceptions = False
    save = hydra_utils._save_config
    if getattr(save, "summ_guarded", False):
        return

    def guarded(cfg, filename, output_dir):
        try:
            save(cfg, filename, output_dir)
        except OSError as exc:
            say(f"error: cannot write {output_dir}/{filename}: {exc.strerror or exc}: free space or set "
                f"hydra.run.dir / hydra.sweep.dir to a folder that can take the run's files", err=True)
            sys.exit(exit_code("failed", user_error=True))

    guarded.summ_guarded = True
    hydra_utils._save_config = guarded


def run(cfg: DictConfig) -> float | tuple[float, float]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from summ.distributed import is_main_process
    from summ.io import atomic_write_json
    from summ.study import record_trial
    from summ.train import METRICS_FILE, objective_value, penalty_value

    quiet_third_party()
    hc = HydraConfig.get()
    output_dir, multirun, overrides = Path(hc.runtime.output_dir), hc.mode == RunMode.MULTIRUN, list(hc.overrides.task)
    if multirun:
        from summ.sweep import apply_trial_defaults

        cfg = apply_trial_defaults(cfg, overrides)
    try:
        metrics = _measured_before(cfg, output_dir, hc if multirun else None, overrides)
        if metrics is None:
            from summ.train import train

            # tracker run name, and the sweep that groups it (one experiment / group per sweep folder)
            names = ((hc.job.override_dirname or output_dir.name), Path(hc.sweep.dir).name) if multirun else None
            metrics = train(cfg, output_dir, tracking_names=names)
    except Interrupted as exc:  # the sweep stops too: the user asked to stop
        say(f"interrupted: {exc}\nresume with the same command and train.resume_from={exc.checkpoint}", err=True)
        sys.exit(128 + exc.signum)
    except KeyboardInterrupt:  # outside the training loop (setup, evaluation): nothing to resume from
        say(f"interrupted: Ctrl-C before training finished; metrics.json in {output_dir} says where", err=True)
        sys.exit(130)
    except UserError as exc:
        if is_main_process() and not (output_dir / METRICS_FILE).exists():  # "whatever happened": say why
            try:
                atomic_write_json(output_dir / METRICS_FILE, {"status": "failed", "error": str(exc)})
            except UserError:  # the folder cannot take it either (a full disk): the line below says why
                pass
        if multirun:  # the sweep goes on; the cell's folder says why it has no figures
            log.error("job failed: %s", exc)
            return penalty_value(OmegaConf.to_object(cfg))
        say(f"error: {exc}", err=True)
        sys.exit(exit_code("failed", user_error=True))
    if is_main_process():  # one summary and one trial record per launch
        if multirun:
            record_trial(hc, overrides, {**metrics, "job_dir": str(output_dir)})
        from summ.summary import format_summary

        say(format_summary(metrics, output_dir))
    if not multirun and metrics.get("status") != "ok":
        say(f"error: status {metrics.get('status')}: {metrics.get('error')}", err=True)
        sys.exit(exit_code(metrics.get("status", "failed")))
    return objective_value(metrics, OmegaConf.to_object(cfg))


def _measured_before(cfg: DictConfig, output_dir: Path, hc=None, overrides=()) -> Optional[dict]:
    """A finished result for this exact config: the job folder's own (sweep.resume), a cell of
    another sweep (sweep.reuse_from, copied into the job folder), or an earlier trial of the same
    Optuna study. None: measure it."""
    from summ.io import atomic_write_json
    from summ.sweep import reusable_metrics, reused_from_study, reused_from_sweep, set_aside_earlier_result
    from summ.train import METRICS_FILE, config_hash

    if cfg.sweep.resume:
        prior = reusable_metrics(output_dir, config_hash(cfg))
        if prior is not None:
            log.info("resume: %s already holds a complete %s result for this config; not measured again",
                     output_dir, prior["status"])
            return prior
    found = None
    if cfg.sweep.reuse_from:
        found = reused_from_sweep(Path(cfg.sweep.reuse_from), config_hash(cfg))
        if found is not None:
            log.info("sweep.reuse_from: %s measured this config already (%s); its result is taken",
                     found[0], found[1]["status"])
    if found is None and hc is not None:
        found = reused_from_study(hc, overrides, config_hash(cfg))
        if found is not None:
            log.info("trial %s of study %s measured this config already (%s, %s); its result is taken, not "
                     "measured again", found[1].get("reused_trial"), hc.sweeper.study_name, found[0],
                     found[1]["status"])
    if found is None:
        set_aside_earlier_result(output_dir, config_hash(cfg))
        return None
    source, prior = found
    prior = {**prior, "reused_from": str(source)}
    atomic_write_json(output_dir / METRICS_FILE, prior)
    return prior


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
            say(f"error: {exc}: set hydra.run.dir / hydra.sweep.dir to a folder that can be created", err=True)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.sweep.dir)
