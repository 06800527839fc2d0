"""An Optuna study behind hydra-optuna-sweeper: the sampler's seed, the sweeper's settings and the
search a continued study must share checked before the first trial, the objective's names, each
trial's record (why it scored as it did, the job folder and config hash that let a later trial of
the same config be answered without measuring) and no trial left RUNNING when a sweep stops.
Where the study is kept: summ/sweeps/storage.py; its best trial as a command: summ/sweeps/best_command.py."""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from summ.errors import ConfigError
from summ.run_folder import RunMetrics
from summ.sweeps.storage import check_storage_url, has_storage, shown

log = logging.getLogger(__name__)


def register_resolvers() -> None:
    """${summ_study_seed:BASE,STORAGE,STUDY}: the sampler seed of the Optuna presets."""
    OmegaConf.register_resolver(
        "summ_study_seed", lambda base, storage=None, name=None: study_seed(base, storage, name), replace=True
    )


def study_seed(base: int, storage: str | None, study_name: str | None) -> int:
    """The resolver behind ${summ_study_seed:...}: `base` plus the trials the study already holds.
    A seeded sampler started again on the same study would otherwise propose the very trials it
    proposed last time; this stays reproducible (the same study state gives the same seed)."""
    if not storage or not study_name:
        return int(base)
    import optuna

    try:
        return int(base) + len(optuna.load_study(study_name=study_name, storage=storage).trials)
    except Exception:  # no such study yet (KeyError), or no database file: a new study
        return int(base)


def check_settings(hydra_cfg: Any) -> None:
    """Settings of the Optuna sweeper that cannot work, refused before the first trial."""
    sweeper = hydra_cfg.sweeper
    check_storage_url(str(sweeper.get("storage") or ""))
    for key in ("n_trials", "n_jobs"):
        value = sweeper.get(key)
        if value is not None and value < 1:
            raise ConfigError(f"hydra.sweeper.{key}={value} is invalid: it must be >= 1")


def check_study(config: DictConfig) -> None:
    """A study this sweep would continue (same storage and name) must be the same search: the same
    directions, objective and parameters with the same choices or ranges. Otherwise it is refused
    before any trial starts, naming the study and the difference (Optuna itself fails on the first
    trial, leaving it RUNNING, or mixes two searches in one study)."""
    hydra_cfg = config.hydra
    if not has_storage(hydra_cfg):
        return
    import optuna

    name, storage = hydra_cfg.sweeper.study_name, str(hydra_cfg.sweeper.storage)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # a new study
        return
    problems = []
    direction = hydra_cfg.sweeper.direction
    wanted = [str(d).lower() for d in direction] if OmegaConf.is_list(direction) else [str(direction).lower()]
    held = [d.name.lower() for d in study.directions]
    if held != wanted:
        problems.append(f"directions {held} in the study, {wanted} here")
    names = metric_names(str(config.objective))
    if study.metric_names and study.metric_names != names:
        problems.append(f"objective {study.metric_names} in the study, {names} here")
    space, searched = search_space(hydra_cfg), {}
    for trial in study.get_trials(deepcopy=False):
        searched.update(trial.distributions)
    for key in sorted(set(searched) | set(space)) if searched else ():
        if key not in space or key not in searched:
            problems.append(f"{key} searched {'in the study only' if key in searched else 'here only'}")
        elif searched[key] != space[key]:
            problems.append(f"{key}: {_distribution(searched[key])} in the study, {_distribution(space[key])} here")
    if problems:
        raise ConfigError(
            f"the Optuna study {name} in {shown(storage)} holds another search ({'; '.join(problems)}): "
            f"give this sweep a study of its own (hydra.sweeper.study_name=<new name>), or run it "
            f"with that study's settings"
        )


def search_space(hydra_cfg: Any) -> dict:
    """The distributions the Optuna sweeper will suggest from: its params and the command line's
    sweep overrides, less the fixed ones (as the sweeper itself reads them)."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    params = [f"{k}={v}" for k, v in (hydra_cfg.sweeper.get("params") or {}).items()]
    arguments = [o for o in hydra_cfg.overrides.task if not o.lstrip("+~").startswith("hydra.")]
    space, fixed, _ = create_params_from_overrides(params + arguments)
    return {k: v for k, v in space.items() if k not in fixed}


def _distribution(d: Any) -> str:
    choices = getattr(d, "choices", None)
    if choices is not None:
        return "choice(" + ",".join(str(c) for c in choices) + ")"
    return f"{type(d).__name__.replace('Distribution', '').lower()}({d.low},{d.high})"


def metric_names(objective: str) -> list[str]:
    """What the study's values are, for optuna-dashboard and study.trials_dataframe()."""
    if objective == "seconds_per_sample_and_rouge":
        return ["train_seconds_per_sample", "rouge_mean"]
    return [objective]


def name_objectives(config: DictConfig) -> None:
    """Create the study (if new) with the sweeper's directions and name its values."""
    hydra_cfg = config.hydra
    if not has_storage(hydra_cfg):
        return
    import optuna

    direction = hydra_cfg.sweeper.direction
    directions = [str(d) for d in direction] if OmegaConf.is_list(direction) else [str(direction)]
    study = optuna.create_study(
        study_name=hydra_cfg.sweeper.study_name,
        storage=hydra_cfg.sweeper.storage,
        directions=directions,
        load_if_exists=True,
    )
    names = metric_names(str(config.objective))
    if len(names) == len(directions) and study.metric_names != names:
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2, and still the way to name them
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)


def record_trial(hydra_cfg: Any, overrides: Sequence[str], metrics: RunMetrics, job_dir: Path) -> None:
    """Attach status, error, peak memory and throughput to this job's trial, so that
    `optuna-dashboard <storage>` shows why an infeasible trial got the penalty, plus the config
    hash and job folder that let a later trial of the same config be answered without measuring."""
    if not has_storage(hydra_cfg):
        return
    import optuna

    try:
        study = optuna.load_study(study_name=hydra_cfg.sweeper.study_name, storage=hydra_cfg.sweeper.storage)
        for attempt in range(5):  # a busy shared database may show this job's trial a moment late
            running = [
                t
                for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                if _matches(t.params, overrides)
            ]
            if running:
                break
            time.sleep(0.5 * (attempt + 1))
        else:
            log.warning(
                "no running trial of study %s has this job's parameters: its attributes are not recorded",
                hydra_cfg.sweeper.study_name,
            )
            return
        trial = optuna.trial.Trial(study, max(running, key=lambda t: t.number)._trial_id)
        mem, train = metrics.memory, metrics.train
        for key, value in (
            ("status", metrics.status),
            ("error", metrics.error),
            ("peak_bytes", mem and mem.peak_bytes),
            ("samples_per_s", train and train.samples_per_s),
            ("tokens_per_s", train and train.tokens_per_s),
            ("job_dir", str(job_dir)),
            ("config_hash", metrics.config_hash),
            ("reused_from", metrics.reused_trial),
        ):
            if key != "reused_from" or value is not None:
                trial.set_user_attr(key, value)
    except Exception as exc:  # attributes are a convenience: never fail the trial for them
        log.warning("could not record trial attributes in the Optuna study: %s", exc)


def _matches(params: dict, overrides: Sequence[str]) -> bool:
    given = dict(o.split("=", 1) for o in overrides if "=" in o)
    return all(str(given.get(k, "")).lower() == str(v).lower() for k, v in params.items())


def finished_trial_for(hydra_cfg: Any, cfg_hash: str) -> tuple[int, str] | None:
    """(number, job folder) of the newest COMPLETE trial of this Optuna study whose config hash is
    `cfg_hash` and that measured it itself (not a reuse), or None."""
    if not has_storage(hydra_cfg):
        return None
    import optuna

    try:
        study = optuna.load_study(study_name=hydra_cfg.sweeper.study_name, storage=hydra_cfg.sweeper.storage)
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    except Exception as exc:  # no study yet, or a storage that cannot answer: measure
        log.debug("no earlier trials to reuse: %s", exc)
        return None
    same = [
        t
        for t in done
        if t.user_attrs.get("config_hash") == cfg_hash
        and t.user_attrs.get("job_dir")
        and t.user_attrs.get("reused_from") is None
    ]
    if not same:
        return None
    t = max(same, key=lambda t: t.number)
    return t.number, t.user_attrs["job_dir"]


_ASKED: list = []  # (study, trial number) of every trial this process's sweeper asked for


def watch_asked_trials() -> None:
    """Record the trials the Optuna sweeper asks for, so that none is left RUNNING when the sweep
    stops before telling the study (Ctrl-C, a launch out of step, a sweeper error)."""
    import optuna

    ask = optuna.study.Study.ask
    if getattr(ask, "summ_watched", False):
        return

    def asked(study, *args, **kwargs):
        trial = ask(study, *args, **kwargs)
        _ASKED.append((study, trial.number))
        return trial

    asked.summ_watched, asked.original = True, ask
    optuna.study.Study.ask = asked


def fail_unfinished_trials() -> list[int]:
    """Tell FAIL for every trial this process asked for and nobody told (Optuna then samples past
    them); stop recording. Returns their numbers."""
    if not _ASKED and "optuna" not in sys.modules:
        return []
    import optuna

    failed = []
    for study, number in _ASKED:
        try:
            if study.get_trials(deepcopy=False)[number].state == optuna.trial.TrialState.RUNNING:
                study.tell(number, state=optuna.trial.TrialState.FAIL)
                failed.append(number)
        except Exception as exc:  # the storage cannot answer: say so, the sweep's own error stands
            log.warning("could not mark trial %d of study %s failed: %s", number, study.study_name, exc)
    _ASKED.clear()
    ask = optuna.study.Study.ask
    optuna.study.Study.ask = getattr(ask, "original", ask)
    if failed:
        log.warning(
            "trials %s were stopped before the study heard their result: marked FAIL", ", ".join(map(str, failed))
        )
    return failed
