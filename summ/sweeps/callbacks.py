"""Hydra callbacks (conf/config.yaml lists them): the run or sweep folder checked before Hydra
makes it, the sweeper's settings and an Optuna study's storage prepared before the first trial,
and the reports written, and the exit code set, when a multirun ends."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from summ.console import say
from summ.distributed import is_main_process
from summ.errors import EXIT_FAILED, EXIT_USER_ERROR, RESOURCE_STATUSES, ConfigError, UserError, exit_code
from summ.files import make_folder
from summ.reports.cells import OK, load_cells
from summ.reports.inference_report import inference_report
from summ.reports.knee_report import build_report
from summ.run_folder import INFERENCE_REPORT, KNEE_REPORT, job_dirs
from summ.sweeps.study import check_sweeper, name_objectives, prepare_storage, write_best

log = logging.getLogger(__name__)


class OutputFolderCallback(Callback):
    """The run or sweep folder is made before Hydra's own mkdir, so a folder that cannot exist
    (its parent is a file) is one line and exit code 2 instead of Hydra's traceback."""

    def _check(self, folder: str) -> None:
        try:
            make_folder(folder)
        except UserError as exc:
            say(f"error: {exc}: set hydra.run.dir / hydra.sweep.dir to a folder that can be created", err=True)
            sys.exit(EXIT_USER_ERROR)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir)


class OptunaStorageCallback(Callback):
    """Before a sweep: its settings checked (one line, exit code 2), and for an Optuna study the
    storage's tables made (prepare_storage) and its objective named."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_sweeper(config.hydra)
            prepare_storage(config.hydra)
        except ConfigError as exc:
            say(f"error: {exc}", err=True)
            sys.exit(EXIT_USER_ERROR)
        name_objectives(config)


class KneeReportCallback(Callback):
    """When a multirun ends: the knee report (or, for mode=predict jobs, the inference report) in
    the sweep folder, the study's best command, and the exit code: non-zero when the report cannot
    be written or no job ended ok (the jobs' own folders keep their results either way). Hydra
    calls the end even when a start callback stopped the sweep (a folder that cannot exist,
    settings refused): there is no report then, and that first exit code stands."""

    def __init__(self) -> None:
        self.started = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = True  # listed after the checks in conf/config.yaml: they all passed

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.started or not is_main_process():
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        if sys.exc_info()[1] is not None:  # Hydra calls this in a `finally`: the sweep itself failed
            self._report_what_ran(config, sweep_dir)
            return  # its own error (an override that cannot compose, Ctrl-C) and exit code stand
        if not sweep_dir.is_dir():
            say(f"error: the sweep folder {sweep_dir} does not exist, so no report was written: the jobs ran in "
                f"other folders (a hydra.sweep.dir that names a new folder per job?)", err=True)
            sys.exit(EXIT_FAILED)
        predict = config.get("mode") == "predict"
        report = sweep_dir / (INFERENCE_REPORT if predict else KNEE_REPORT)
        try:
            if predict:  # an inference sweep: speed against ROUGE, not a knee
                inference_report(sweep_dir, config.knee.tolerance)
                statuses = [c.status for c in load_cells(sweep_dir)[0]]
            else:
                analysis = build_report(sweep_dir, tolerance=config.knee.tolerance)
                statuses = [c.status for c in analysis.cells]
        except Exception as exc:
            say(f"error: the report could not be written in {sweep_dir} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); the jobs' results are kept: rebuild it with "
                f"summ-report {sweep_dir}", err=True)
            sys.exit(EXIT_FAILED)
        say(f"\n{'inference' if predict else 'knee'} report: {report}")
        if not predict:
            say(analysis.reason)
            command = write_best(config, sweep_dir)
            if command:
                say(f"best trial of the study ({sweep_dir / 'best_overrides.txt'}):\n  {command}")
        if OK not in statuses:
            say(f"error: no job of the sweep ended ok ({', '.join(sorted(set(statuses))) or 'no job'}): see the notes "
                f"in {report}", err=True)
            resource = bool(statuses) and all(s in RESOURCE_STATUSES for s in statuses)
            sys.exit(exit_code("oom") if resource else EXIT_FAILED)

    @staticmethod
    def _report_what_ran(config: DictConfig, sweep_dir: Path) -> None:
        """The cells that finished before the sweep failed keep their report; nothing is said or
        exited here, so the failure's own line and code are what the user sees."""
        if config.get("mode") == "predict" or not sweep_dir.is_dir() or not job_dirs(sweep_dir):
            return
        try:
            build_report(sweep_dir, tolerance=config.knee.tolerance)
            say(f"knee report of the jobs that ran: {sweep_dir / KNEE_REPORT}", err=True)
        except Exception as exc:  # the sweep's own failure matters more
            log.warning("no report of the jobs that ran: %s", exc)
