"""Hydra callbacks (conf/config.yaml lists them): the run or sweep folder checked before Hydra
makes it, the sweeper's settings and an Optuna study's storage prepared before the first trial,
and the reports written, and the exit code set, when a multirun ends."""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from summ.console import say
from summ.distributed import STAMP_ENV, is_main_process
from summ.errors import EXIT_FAILED, EXIT_USER_ERROR, RESOURCE_STATUSES, ConfigError, UserError, exit_code
from summ.files import make_folder
from summ.reports.cells import OK, load_cells
from summ.reports.inference_report import inference_report
from summ.reports.knee_report import build_report
from summ.run_folder import (INFERENCE_REPORT, KNEE_REPORT, METRICS_FILE, earlier_launch, earlier_run, job_dirs,
                             move_aside)
from summ.sweeps.study import (check_study, check_sweeper, fail_unfinished_trials, name_objectives, prepare_storage,
                               watch_asked_trials, write_best)
from summ.validation import check_reuse_from

log = logging.getLogger(__name__)


class OutputFolderCallback(Callback):
    """The run or sweep folder is made before Hydra's own mkdir, so a folder that cannot exist
    (its parent is a file) is one line and exit code 2 instead of Hydra's traceback. A folder
    belongs to one run or one launch: what an earlier one left there is moved aside, before Hydra
    writes .hydra/ and run.log, unless this one resumes it (and a resume with nothing to resume
    is refused)."""

    def _check(self, folder: str) -> None:
        try:
            make_folder(folder)
        except UserError as exc:
            say(f"error: {exc}: set hydra.run.dir / hydra.sweep.dir to a folder that can be created", err=True)
            sys.exit(EXIT_USER_ERROR)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir)
        if is_main_process():  # the others write no file of their own into it
            _refused(lambda: one_run_per_folder(config))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir)
        _refused(lambda: one_launch_per_folder(config))


def _refused(check) -> None:
    try:
        check()
    except ConfigError as exc:
        say(f"error: {exc}", err=True)
        sys.exit(EXIT_USER_ERROR)


def one_run_per_folder(config: DictConfig) -> None:
    """hydra.run.dir used again: the earlier run's files (weights, .hydra/, run.log, results)
    move to superseded_<n>/ unless this run resumes it (train.resume_from, sweep.resume)."""
    folder = Path(config.hydra.run.dir)
    if config.sweep.resume and not (folder / METRICS_FILE).is_file():
        raise ConfigError(f"sweep.resume=true: {folder} holds no earlier result to resume; set hydra.run.dir to the "
                          f"earlier run's folder, or leave sweep.resume out")
    earlier = earlier_run(folder)
    if config.train.resume_from or config.sweep.resume or not earlier:
        return
    own = [p for p in (config.model.get("path"), config.sweep.get("reuse_from")) if p]
    if any(Path(p).expanduser().resolve().is_relative_to(folder.resolve()) for p in own):
        raise ConfigError(f"hydra.run.dir={folder} holds what this run reads ({', '.join(own)}): its earlier files "
                          f"would be moved aside; leave hydra.run.dir out (every run gets a folder of its own)")
    target = move_aside(folder, earlier, "run")
    say(f"warning: {folder} held an earlier run: its {len(earlier)} entries (weights, results, .hydra/, run.log) "
        f"moved to {target}", err=True)


def one_launch_per_folder(config: DictConfig) -> None:
    """hydra.sweep.dir used again: the earlier launch's job folders and reports move to
    superseded_launch[_n]/ (so a report never mixes two launches) unless sweep.resume=true, which
    needs an earlier launch to resume; with it, train.resume_from may be `latest` or a path in one
    job folder (each cell then continues from a checkpoint of its own). Other processes of a
    distributed launch wait for process 0's move."""
    sweep_dir = Path(config.hydra.sweep.dir)
    check_reuse_from(config.sweep.get("reuse_from"))  # before any cell, not once per cell
    resume_from = config.train.get("resume_from")
    if resume_from and not (config.sweep.resume and (resume_from == "latest" or Path(
            resume_from).expanduser().resolve().is_relative_to(sweep_dir.resolve()))):
        raise ConfigError(f"train.resume_from={resume_from} in a sweep: it resumes one run, and every cell would "
                          f"start from it; a sweep goes on with sweep.resume=true hydra.sweep.dir=<its folder> "
                          f"(finished cells kept, the rest measured again)")
    stamp = os.environ.get(STAMP_ENV)
    earlier = earlier_launch(sweep_dir, float(stamp) if stamp else time.time())
    if config.sweep.resume:
        if not any(p.is_dir() for p in earlier):  # job folders of an earlier launch
            raise ConfigError(f"sweep.resume=true: {sweep_dir} holds no job folders of an earlier sweep to resume; "
                              f"set hydra.sweep.dir to that sweep's folder (outputs/multirun/<date_time>), or leave "
                              f"sweep.resume out")
        return
    if not earlier:
        return
    if not is_main_process():
        deadline = time.monotonic() + 300
        while any(p.exists() for p in earlier) and time.monotonic() < deadline:
            time.sleep(0.2)
        return
    jobs = len(set(earlier) & set(job_dirs(sweep_dir)))
    target = move_aside(sweep_dir, earlier, "launch")
    say(f"warning: {sweep_dir} held an earlier launch ({jobs} job folders and {len(earlier) - jobs} other entries: "
        f"reports, or a single run's files): moved to {target}; sweep.resume=true reuses a folder's finished cells "
        f"instead", err=True)


class OptunaStorageCallback(Callback):
    """Before a sweep: its settings checked (one line, exit code 2), and for an Optuna study the
    storage's tables made (prepare_storage) and its objective named."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _refused(lambda: (check_sweeper(config.hydra), prepare_storage(config.hydra), check_study(config)))
        name_objectives(config)
        if "optuna" in str(config.hydra.sweeper.get("_target_", "")).lower():
            watch_asked_trials()


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
        fail_unfinished_trials()  # first: what follows may exit, and Hydra calls no later callback then
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
                cells = load_cells(sweep_dir)[0]
            else:
                analysis = build_report(sweep_dir, tolerance=config.knee.tolerance)
                cells = analysis.cells
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
        if not any(c.status == OK for c in cells):
            say(f"error: {why_none_ok(cells)}: see the notes in {report}", err=True)
            sys.exit(sweep_exit_code(cells))

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


def sweep_exit_code(cells) -> int:
    """A sweep with no ok cell ends like its cells when they agree: 2 when every cell was refused
    for its input (the same bad config, data or key), 3 when none fit or trained; 1 otherwise."""
    if cells and all(c.user_error for c in cells):
        return EXIT_USER_ERROR
    if cells and all(c.status in RESOURCE_STATUSES for c in cells):
        return exit_code("oom")
    return EXIT_FAILED


def why_none_ok(cells) -> str:
    """The one line of a sweep in which no job ended ok: the refusal itself when every job was
    refused for the same input (it is what to change), else the statuses."""
    errors = {c.error for c in cells}
    if cells and all(c.user_error for c in cells) and len(errors) == 1:
        return f"every job of the sweep was refused: {errors.pop()}"
    return f"no job of the sweep ended ok ({', '.join(sorted({c.status for c in cells})) or 'no job'})"
