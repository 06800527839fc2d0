"""Hydra callbacks (conf/config.yaml lists them, each does one thing): the run or sweep folder checked
before Hydra makes it; before an Optuna sweep's first trial its settings checked, its storage's tables
made, a continued study checked to be the same search, its objective named and its trials watched;
when a multirun ends, the trials nobody told marked failed, the knee or inference report written, the
study's best command saved, and the exit code set when no job ended ok."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from summ.console import say
from summ.distributed import STAMP_ENV, is_main_process
from summ.errors import EXIT_FAILED, EXIT_USER_ERROR, RESOURCE_STATUSES, ConfigError, Status, UserError, exit_code
from summ.files import make_folder
from summ.reports.cells import load_cells
from summ.reports.inference_report import inference_report
from summ.reports.knee import analyse
from summ.reports.knee_report import build_report
from summ.run_folder import (
    BEST_FILE,
    FINAL_DIR,
    INFERENCE_REPORT,
    KNEE_REPORT,
    METRICS_FILE,
    earlier_launch,
    earlier_run,
    job_dirs,
    move_aside,
)
from summ.sweeps.best_command import write_best
from summ.sweeps.storage import is_optuna, prepare_storage
from summ.sweeps.study import check_settings, check_study, fail_unfinished_trials, name_objectives, watch_asked_trials
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
            refuse_on_config_error(lambda: one_run_per_folder(config))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir)
        refuse_on_config_error(lambda: one_launch_per_folder(config))


def refuse_on_config_error(check: Callable[[], Any]) -> None:
    """Run `check`: a ConfigError it raises is one line on stderr and exit code 2."""
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
        raise ConfigError(
            f"sweep.resume=true: {folder} holds no earlier result to resume; set hydra.run.dir to the "
            f"earlier run's folder, or leave sweep.resume out"
        )
    earlier = earlier_run(folder)
    if config.train.resume_from or config.sweep.resume or not earlier:
        return
    own = [p for p in (config.model.get("path"), config.sweep.get("reuse_from")) if p]
    if any(Path(p).expanduser().resolve().is_relative_to(folder.resolve()) for p in own):
        raise ConfigError(
            f"hydra.run.dir={folder} holds what this run reads ({', '.join(own)}): its earlier files "
            f"would be moved aside; leave hydra.run.dir out (every run gets a folder of its own)"
        )
    target = move_aside(folder, earlier, "run")
    say(
        f"warning: {folder} held an earlier run: its {len(earlier)} entries (weights, results, .hydra/, run.log) "
        f"moved to {target}",
        err=True,
    )


def one_launch_per_folder(config: DictConfig) -> None:
    """hydra.sweep.dir used again: the earlier launch's job folders and reports move to
    superseded_launch[_n]/ (so a report never mixes two launches) unless sweep.resume=true, which
    needs an earlier launch to resume; with it, train.resume_from may be `latest` or a path in one
    job folder (each cell then continues from a checkpoint of its own). Other processes of a
    distributed launch wait for process 0's move."""
    sweep_dir = Path(config.hydra.sweep.dir)
    check_reuse_from(config.sweep.get("reuse_from"))  # before any cell, not once per cell
    resume_from = config.train.get("resume_from")
    if resume_from and not (
        config.sweep.resume
        and (resume_from == "latest" or Path(resume_from).expanduser().resolve().is_relative_to(sweep_dir.resolve()))
    ):
        raise ConfigError(
            f"train.resume_from={resume_from} in a sweep: it resumes one run, and every cell would "
            f"start from it; a sweep goes on with sweep.resume=true hydra.sweep.dir=<its folder> "
            f"(finished cells kept, the rest measured again)"
        )
    stamp = os.environ.get(STAMP_ENV)
    earlier = earlier_launch(sweep_dir, float(stamp) if stamp else time.time())
    if config.sweep.resume:
        if not any(p.is_dir() for p in earlier):  # job folders of an earlier launch
            raise ConfigError(
                f"sweep.resume=true: {sweep_dir} holds no job folders of an earlier sweep to resume; "
                f"set hydra.sweep.dir to that sweep's folder (outputs/multirun/<date_time>), or leave "
                f"sweep.resume out"
            )
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
    say(
        f"warning: {sweep_dir} held an earlier launch ({jobs} job folders and {len(earlier) - jobs} other entries: "
        f"reports, or a single run's files): moved to {target}; sweep.resume=true reuses a folder's finished cells "
        f"instead",
        err=True,
    )


class OptunaSettingsCallback(Callback):
    """Before an Optuna sweep's first trial: its settings that cannot work (trial counts, a storage
    URL Optuna cannot keep a study in) refused in one line, exit code 2. The knee sweeper's are
    checked beside their schema (hydra_plugins/summ_knee_sweeper: KneeSettingsCallback)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if is_optuna(config.hydra):
            refuse_on_config_error(lambda: check_settings(config.hydra))


class OptunaStorageCallback(Callback):
    """Before an Optuna sweep's first trial: its database's tables made once, however many workers
    start together (prepare_storage); a database that cannot be opened is one line, exit code 2."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        refuse_on_config_error(lambda: prepare_storage(config.hydra))


class SameSearchCallback(Callback):
    """Before an Optuna sweep's first trial: a study it would continue must hold the same search
    (check_study); another search is one line, exit code 2."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        refuse_on_config_error(lambda: check_study(config))


class ObjectiveNamesCallback(Callback):
    """Before an Optuna sweep's first trial: its study made (if new) with the sweeper's directions,
    and its values named after the objective (optuna-dashboard shows them)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        name_objectives(config)


class UnfinishedTrialsCallback(Callback):
    """No Optuna trial left RUNNING: the trials the sweeper asks for are watched from the start, and
    those nobody told are marked FAIL when the multirun ends. Listed last in conf/config.yaml, so
    that Hydra, which calls the ends in reverse order, calls this end first: a later one may exit."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if is_optuna(config.hydra):
            watch_asked_trials()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        fail_unfinished_trials()


class SweepEndCallback(Callback):
    """What the end of a multirun does once every start check passed: they are listed before it in
    conf/config.yaml, so its own start says they did. Hydra calls the end even when a start callback
    stopped the sweep (a folder that cannot exist, settings refused): nothing is done then, and that
    first exit code stands. Only process 0 of a launch acts. Subclasses say what: `ended` when the
    sweep ran to its end, `failed` when it stopped on its own error."""

    def __init__(self) -> None:
        self.started = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = True

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.started or not is_main_process():
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        if sys.exc_info()[1] is not None:  # Hydra calls this in a `finally`: the sweep itself failed
            self.failed(config, sweep_dir)
            return  # its own error (an override that cannot compose, Ctrl-C) and exit code stand
        if not sweep_dir.is_dir():
            say(
                f"error: the sweep folder {sweep_dir} does not exist, so no report was written: the jobs ran in "
                f"other folders (a hydra.sweep.dir that names a new folder per job?)",
                err=True,
            )
            sys.exit(EXIT_FAILED)
        self.ended(config, sweep_dir)

    def ended(self, config: DictConfig, sweep_dir: Path) -> None:
        raise NotImplementedError

    def failed(self, config: DictConfig, sweep_dir: Path) -> None:
        """Nothing: the failure's own line and exit code are what the user sees."""


class KneeReportCallback(SweepEndCallback):
    """When a training multirun ends: sweep.csv, knee_report.md and knee.png in the sweep folder,
    its path and recommendation printed; exit code 1 when it cannot be written (the jobs' own
    folders keep their results). A sweep that failed keeps the report of the jobs that ran."""

    def ended(self, config: DictConfig, sweep_dir: Path) -> None:
        if config.get("mode") == "predict":
            return
        try:
            analysis = build_report(sweep_dir, tolerance=config.knee.tolerance)
        except Exception as exc:
            _report_not_written(sweep_dir, exc)
        say(f"\nknee report: {sweep_dir / KNEE_REPORT}")
        say(analysis.reason)

    def failed(self, config: DictConfig, sweep_dir: Path) -> None:
        """The cells that finished before the sweep failed keep their report; nothing is said or
        exited here, so the failure's own line and code are what the user sees."""
        if config.get("mode") == "predict" or not sweep_dir.is_dir() or not job_dirs(sweep_dir):
            return
        try:
            build_report(sweep_dir, tolerance=config.knee.tolerance)
            say(f"knee report of the jobs that ran: {sweep_dir / KNEE_REPORT}", err=True)
        except Exception as exc:  # the sweep's own failure matters more
            log.warning("no report of the jobs that ran: %s", exc)


class InferenceReportCallback(SweepEndCallback):
    """When a mode=predict multirun ends: inference_report.md (generation speed against ROUGE, not a
    knee) in the sweep folder and its path printed; exit code 1 when it cannot be written."""

    def ended(self, config: DictConfig, sweep_dir: Path) -> None:
        if config.get("mode") != "predict":
            return
        try:
            inference_report(sweep_dir, config.knee.tolerance)
        except Exception as exc:
            _report_not_written(sweep_dir, exc)
        say(f"\ninference report: {sweep_dir / INFERENCE_REPORT}")


class BestCommandCallback(SweepEndCallback):
    """When a training multirun over an Optuna study in a database ends: the study's best trial as
    one command that trains its cell (best_overrides.txt, summ/sweeps/best_command.py), printed."""

    def ended(self, config: DictConfig, sweep_dir: Path) -> None:
        if config.get("mode") == "predict":
            return
        command = write_best(config, sweep_dir)
        if command:
            say(f"best trial of the study ({sweep_dir / BEST_FILE}):\n  {command}")


class ThenTrainCallback(SweepEndCallback):
    """sweep.then_train: once a training sweep or search ended with a recommendation, that cell
    trained for its full schedule into <sweep>/final (summ/sweeps/then_train.py), the knee report
    written again to link it, and the run's exit code when it did not end ok."""

    def ended(self, config: DictConfig, sweep_dir: Path) -> None:
        if config.get("mode") == "predict" or not config.sweep.get("then_train"):
            return
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            say(
                "warning: sweep.then_train trains in one process, and this launch has several: nothing trained",
                err=True,
            )
            return
        # the recommendation the knee report (written just before) gave, without writing it twice
        cells, warnings = load_cells(sweep_dir)
        analysis = analyse(cells, config.knee.tolerance, warnings)
        rec = analysis.recommended
        if rec is None:
            if any(c.status == Status.ok for c in analysis.cells):
                say(f"error: sweep.then_train: no cell to train: {analysis.reason}", err=True)
                sys.exit(EXIT_FAILED)
            return  # no cell ran ok: the exit code's line says why
        from summ.errors import Interrupted
        from summ.sweeps.then_train import train_recommended

        final = sweep_dir / FINAL_DIR
        say(f"\nsweep.then_train: the recommended cell (job {rec.job}) trains for its full schedule into {final}")
        try:
            m = train_recommended(sweep_dir, rec.job, rec.overrides)
        except Interrupted as exc:
            say(
                f"interrupted: {exc}\nthe same command with sweep.resume=true hydra.sweep.dir={sweep_dir} keeps the "
                f"finished cells and resumes the final run",
                err=True,
            )
            sys.exit(128 + exc.signum)
        except UserError as exc:
            say(f"error: sweep.then_train: {exc}", err=True)
            sys.exit(EXIT_USER_ERROR)
        build_report(sweep_dir, tolerance=config.knee.tolerance)  # its recommendation now links the run
        say(f"final run: {final / METRICS_FILE} ({m.status})")
        if m.status != Status.ok:
            sys.exit(exit_code(m.status))


class SweepExitCodeCallback(SweepEndCallback):
    """When a multirun ends with no job ok: one line that says why, and the exit code of its cells
    (sweep_exit_code); 0 otherwise (the jobs' own folders keep their results either way)."""

    def ended(self, config: DictConfig, sweep_dir: Path) -> None:
        cells = load_cells(sweep_dir)[0]
        if not any(c.status == Status.ok for c in cells):
            report = sweep_dir / (INFERENCE_REPORT if config.get("mode") == "predict" else KNEE_REPORT)
            say(f"error: {why_none_ok(cells)}: see the notes in {report}", err=True)
            sys.exit(sweep_exit_code(cells))


def _report_not_written(sweep_dir: Path, exc: Exception) -> NoReturn:
    say(
        f"error: the report could not be written in {sweep_dir} ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else ''}); the jobs' results are kept: rebuild it with "
        f"summ-report {sweep_dir}",
        err=True,
    )
    sys.exit(EXIT_FAILED)


def sweep_exit_code(cells) -> int:
    """A sweep with no ok cell ends like its cells when they agree: 2 when every cell was refused
    for its input (the same bad config, data or key), 3 when none fit or trained; 1 otherwise."""
    if cells and all(c.user_error for c in cells):
        return EXIT_USER_ERROR
    if cells and all(c.status in RESOURCE_STATUSES for c in cells):
        return exit_code(Status.oom)
    return EXIT_FAILED


def why_none_ok(cells) -> str:
    """The one line of a sweep in which no job ended ok: the refusal itself when every job was
    refused for the same input (it is what to change), else the statuses."""
    errors = {c.error for c in cells}
    if cells and all(c.user_error for c in cells) and len(errors) == 1:
        return f"every job of the sweep was refused: {errors.pop()}"
    return f"no job of the sweep ended ok ({', '.join(sorted({c.status for c in cells})) or 'no job'})"
