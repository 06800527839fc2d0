"""The task function behind run.py: one composed config in, the sweeper's objective out.

A single run (summ/single_run.py) prints its summary and exits with the code of its status
(README, "Exit codes and errors"). Inside a multirun a job is a trial (summ/sweeps/trials.py): it never exits, and the
sweep goes on. Here: the dispatch between the two, what stops either (Ctrl-C, processes out of
step), and what Hydra does before our code runs, ended like our own errors.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

from omegaconf import DictConfig

from summ.console import say
from summ.errors import Interrupted, ProcessesOutOfStep, Status, UserError, exit_code
from summ.resolvers import register_configs
from summ.run_folder import METRICS_FILE
from summ.sweeps.study import register_resolvers

log = logging.getLogger("summ")


def check_environment() -> None:
    """What the environment asks of every run, read once at start-up: a bad SUMM_FAILPOINTS is one
    line and exit code 2, before Hydra composes anything."""
    from summ import failpoints

    try:
        failpoints.load()
    except UserError as exc:
        say(f"error: {exc}", err=True)
        sys.exit(exit_code(Status.failed, user_error=True))


def register() -> None:
    """Schemas and resolvers, before Hydra composes anything (run.py, tests)."""
    register_configs()
    register_resolvers()


def run(cfg: DictConfig) -> float | tuple[float, float]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    quiet_third_party()
    hc = HydraConfig.get()
    output_dir, overrides = Path(hc.runtime.output_dir), list(hc.overrides.task)
    try:
        if hc.mode == RunMode.MULTIRUN:
            return _trial(cfg, hc, output_dir, overrides)
        from summ.single_run import run_single  # here, not at start-up: it loads torch (--help does not)

        return run_single(cfg, output_dir)
    except Interrupted as exc:  # a sweep stops too: the user asked to stop
        say(f"interrupted: {exc}\n{_how_to_go_on(hc, exc.checkpoint)}", err=True)
        sys.exit(128 + exc.signum)
    except ProcessesOutOfStep as exc:  # no later collective of this launch can be trusted: stop here
        where = (
            f"the sweep stops; its finished cells are kept: summ-report {hc.sweep.dir} writes their report, "
            f"and the same command with sweep.resume=true hydra.sweep.dir={hc.sweep.dir} measures the rest"
            if hc.mode == RunMode.MULTIRUN
            else f"{output_dir / METRICS_FILE} says where"
        )
        say(f"error: {exc}: {where}", err=True)
        sys.exit(exit_code(Status.failed))
    except KeyboardInterrupt:  # outside the training loop (setup, evaluation): nothing to resume from
        say(
            f"interrupted: Ctrl-C before the run finished; {output_dir / METRICS_FILE} says where"
            + (f"\n{_how_to_go_on(hc, None)}" if hc.mode == RunMode.MULTIRUN else ""),
            err=True,
        )
        sys.exit(130)


def _how_to_go_on(hc, checkpoint) -> str:
    """After Ctrl-C: a sweep goes on with sweep.resume (its finished cells kept, the rest measured
    again); one run from its checkpoint."""
    from hydra.types import RunMode

    if hc.mode == RunMode.MULTIRUN:
        return (
            f"the sweep's finished cells are kept: go on with the same command and sweep.resume=true "
            f"hydra.sweep.dir={hc.sweep.dir} (the other cells are measured again)"
        )
    return f"resume with the same command and train.resume_from={checkpoint}"


def _trial(cfg: DictConfig, hc, output_dir: Path, overrides: list[str]):
    from summ.distributed import is_main_process
    from summ.reports.summary import format_summary
    from summ.sweeps.trials import run_trial

    metrics, objective = run_trial(cfg, hc, output_dir, overrides)
    if metrics is not None and is_main_process():
        say(format_summary(metrics.to_dict(), output_dir))
    return objective


def guard_hydra() -> None:
    """What Hydra does before our code runs ends like our own errors: a config it cannot compose (an
    unknown key or group option, a wrong type, a value outside a closed choice) in one line and exit
    code 2, and a full disk while it writes .hydra/*.yaml of a job likewise. A log handler that
    cannot write (the same full disk) stays quiet instead of printing a traceback per line."""
    import hydra._internal.utils as hydra_internal
    import hydra.core.utils as hydra_utils

    logging.raiseExceptions = False
    report = hydra_internal.run_and_report
    if not getattr(report, "summ_guarded", False):

        def reported(func):
            try:
                return func()
            except Exception as exc:
                full = os.environ.get("HYDRA_FULL_ERROR") == "1"  # Hydra's switch for the whole traceback
                if not full and _composing(exc):
                    say(
                        f"error: {_config_error(exc)}: python run.py --help lists the groups and their options, "
                        f"--cfg job every setting",
                        err=True,
                    )
                    sys.exit(exit_code(Status.failed, user_error=True))
                if not full and _disk_refused(exc):  # Hydra's own files
                    where = f" ({exc.filename})" if exc.filename else ""
                    say(
                        f"error: {exc.strerror}{where} while Hydra wrote the sweep's files: free space or set "
                        f"hydra.run.dir / hydra.sweep.dir to a folder that can take them",
                        err=True,
                    )
                    sys.exit(exit_code(Status.failed, user_error=True))
                error = exc  # anything else: Hydra's own report
                return report(lambda: _raise(error))

        reported.summ_guarded = True
        hydra_internal.run_and_report = reported
    _one_line_flags()
    save = hydra_utils._save_config
    if getattr(save, "summ_guarded", False):
        return

    def guarded(cfg, filename, output_dir):
        try:
            save(cfg, filename, output_dir)
        except OSError as exc:
            say(
                f"error: cannot write {output_dir}/{filename}: {exc.strerror or exc}: free space or set "
                f"hydra.run.dir / hydra.sweep.dir to a folder that can take the run's files",
                err=True,
            )
            sys.exit(exit_code(Status.failed, user_error=True))

    guarded.summ_guarded = True
    hydra_utils._save_config = guarded


def _one_line_flags() -> None:
    """A flag Hydra's parser does not know (`python run.py --badflag`): one line and exit code 2,
    instead of argparse's usage block."""
    hydra_main = sys.modules["hydra.main"]  # the module: `hydra.main` the attribute is the decorator
    made = hydra_main.get_args_parser
    if getattr(made, "summ_guarded", False):
        return

    def parser():
        p = made()

        def error(message: str):
            say(f"error: {message}: python run.py --help lists the groups, --hydra-help Hydra's own flags", err=True)
            sys.exit(exit_code(Status.failed, user_error=True))

        p.error = error
        return p

    parser.summ_guarded = True
    hydra_main.get_args_parser = parser


def _raise(exc: BaseException):
    raise exc


def _disk_refused(exc: BaseException) -> bool:
    """A full disk, a quota, a read-only or forbidden folder: the place, not the program."""
    import errno

    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


def _composing(exc: BaseException) -> bool:
    """Hydra's and OmegaConf's own errors, and a ValueError or TypeError raised inside them (a group
    given a number, `model=3`), are the config's; anything else is not."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, (HydraException, OmegaConfBaseException)):
        return True
    if not isinstance(exc, (ValueError, TypeError)):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = tb.tb_frame.f_code.co_filename.replace("\\", "/") if tb is not None else ""
    return "/hydra/" in where or "/omegaconf/" in where


def _config_error(exc: BaseException) -> str:
    """Hydra's error and its cause on one line: no stack-trace hint, no search path, no node types,
    and not its advice to add an unknown key with `+` (the schema refuses those)."""
    import re

    parts = []
    for e in (exc, exc.__cause__):
        if e is None:
            continue
        text = str(e).split("Config search path")[0]
        lines = [line.strip() for line in text.splitlines()]
        text = " ".join(
            line
            for line in lines
            if line
            and not line.startswith(
                ("Set the environment variable", "full_key", "reference_type", "object_type", "provider=")
            )
        )
        text = re.sub(r"\s*To append to your config use \S+", "", text).strip(" .")
        if text and text not in parts:
            parts.append(text)
    return ": ".join(parts) or type(exc).__name__


def quiet_third_party() -> None:
    """Silence what libraries print on every run and that says nothing about this one: warnings
    about other code and bars for a single file. Their warnings about the run itself stay."""
    # bitsandbytes' CPU backend: an optional kernel package is absent (it falls back to its own code)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # the `kernels` package bitsandbytes imports: "Skipping publisher trust check ... offline mode" (we are offline)
    logging.getLogger("kernels").setLevel(logging.ERROR)
    # accelerate's save of a model with tied embeddings: "Removed shared tensor ... should be OK"
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    # peft reads and calls transformers' deprecated names itself; nothing for us to change
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*deprecated", category=FutureWarning)
