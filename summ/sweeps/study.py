"""Optuna studies behind hydra-optuna-sweeper: why a trial scored as it did, a configuration
never measured twice, the best trial as a command that trains it, the sampler's seed, the
sweeper's settings checked, and storage that several workers can open at once."""
from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from summ.errors import ConfigError
from summ.files import make_folder
from summ.run_folder import BEST_FILE, HYDRA_DIR, RunMetrics, read_metrics, write_text

log = logging.getLogger(__name__)



def study_seed(base: int, storage: Optional[str], study_name: Optional[str]) -> int:
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


def _is_optuna(hydra_cfg: Any) -> bool:
    target = OmegaConf.select(hydra_cfg, "sweeper._target_", default="") or ""
    return "optuna" in target.lower()


def _matches(params: dict, overrides: Sequence[str]) -> bool:
    given = dict(o.split("=", 1) for o in overrides if "=" in o)
    return all(str(given.get(k, "")).lower() == str(v).lower() for k, v in params.items())


def register_resolvers() -> None:
    """${summ_study_seed:BASE,STORAGE,STUDY}: the sampler seed of the Optuna presets."""
    OmegaConf.register_resolver("summ_study_seed", lambda base, storage=None, name=None: study_seed(base, storage, name),
                                replace=True)


def record_trial(hydra_cfg: Any, overrides: Sequence[str], metrics: RunMetrics, job_dir: Path) -> None:
    """Attach status, error, peak memory and throughput to this job's trial, so that
    `optuna-dashboard <storage>` shows why an infeasible trial got the penalty, plus the config
    hash and job folder that let a later trial of the same config be answered without measuring."""
    if not _is_optuna(hydra_cfg) or not hydra_cfg.sweeper.get("storage"):
        return
    import optuna

    try:
        study = optuna.load_study(study_name=hydra_cfg.sweeper.study_name, storage=hydra_cfg.sweeper.storage)
        for attempt in range(5):  # a busy shared database may show this job's trial a moment late
            running = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                       if _matches(t.params, overrides)]
            if running:
                break
            time.sleep(0.5 * (attempt + 1))
        else:
            log.warning("no running trial of study %s has this job's parameters: its attributes are not recorded",
                        hydra_cfg.sweeper.study_name)
            return
        trial = optuna.trial.Trial(study, max(running, key=lambda t: t.number)._trial_id)
        mem, train = metrics.memory, metrics.train
        for key, value in (("status", metrics.status), ("error", metrics.error),
                           ("peak_bytes", mem and mem.peak_bytes), ("samples_per_s", train and train.samples_per_s),
                           ("tokens_per_s", train and train.tokens_per_s), ("job_dir", str(job_dir)),
                           ("config_hash", metrics.config_hash), ("reused_from", metrics.reused_trial)):
            if key != "reused_from" or value is not None:
                trial.set_user_attr(key, value)
    except Exception as exc:  # attributes are a convenience: never fail the trial for them
        log.warning("could not record trial attributes in the Optuna study: %s", exc)


def finished_trial_for(hydra_cfg: Any, cfg_hash: str) -> Optional[tuple[int, str]]:
    """(number, job folder) of the newest COMPLETE trial of this Optuna study whose config hash is
    `cfg_hash` and that measured it itself (not a reuse), or None."""
    if not _is_optuna(hydra_cfg) or not hydra_cfg.sweeper.get("storage"):
        return None
    import optuna

    try:
        study = optuna.load_study(study_name=hydra_cfg.sweeper.study_name, storage=hydra_cfg.sweeper.storage)
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    except Exception as exc:  # no study yet, or a storage that cannot answer: measure
        log.debug("no earlier trials to reuse: %s", exc)
        return None
    same = [t for t in done if t.user_attrs.get("config_hash") == cfg_hash and t.user_attrs.get("job_dir")
            and t.user_attrs.get("reused_from") is None]
    if not same:
        return None
    t = max(same, key=lambda t: t.number)
    return t.number, t.user_attrs["job_dir"]


def write_best(config: DictConfig, sweep_dir: Path) -> Optional[str]:
    """After a single-objective Optuna sweep: the study's best trial as one command that trains
    that cell anew (reproduce_command), saved to best_overrides.txt and returned."""
    if not _is_optuna(config.hydra) or not config.hydra.sweeper.get("storage"):
        return None
    import optuna

    study = optuna.load_study(study_name=config.hydra.sweeper.study_name, storage=config.hydra.sweeper.storage)
    if len(study.directions) != 1:  # a multi-objective study has a front (pareto_report.md), not one best
        return None
    try:
        best = study.best_trial
    except ValueError:  # no COMPLETE trial
        return None
    job_dir = best.user_attrs.get("job_dir")
    if not job_dir or not (Path(job_dir) / HYDRA_DIR / "config.yaml").is_file():
        log.warning("the best trial (%d) left no job folder to rebuild its command from", best.number)
        return None
    command = reproduce_command(Path(job_dir))
    plan = what_it_runs(Path(job_dir))
    write_text(sweep_dir, BEST_FILE, f"# best trial {best.number} of study {study.study_name}: {best.value:.6g} "
                                     f"({config.objective}), measured in {job_dir}; train that cell with:\n"
                                     + (f"# {plan}\n" if plan else "") + f"{command}\n")
    return command + (f"\n  ({plan})" if plan else "")


def what_it_runs(job_dir: Path) -> Optional[str]:
    """What the best trial's command trains, in words: its schedule in epochs and optimizer steps
    (the same rules as the run: train.total_samples, train.max_steps, then train.epochs) and the
    training time at the trial's measured samples/s. None when the trial's record lacks them."""
    m = read_metrics(job_dir).record
    cfg = OmegaConf.load(job_dir / HYDRA_DIR / "config.yaml")
    eff, n, sps = (m.effective_batch_size, m.train_set_size, m.train and m.train.samples_per_s) if m else (0, 0, 0)
    if not (eff and n and sps):
        return None
    from summ.training.measurement import schedule_length

    per_epoch = n // ((m.batch_size or 1) * (m.num_processes or 1)) // (m.gradient_accumulation_steps or 1)
    # the run's own rule, without the trial's measured window (reproduce_command drops it)
    steps = schedule_length(OmegaConf.merge(cfg, {"measure": {"samples": None, "steps": None}}), per_epoch, eff)
    key = next(k for k in ("total_samples", "max_steps", "epochs") if cfg.train.get(k))
    rule = f"train.{key}={cfg.train[key]}"
    seconds = steps * eff / sps
    return (f"it trains {steps:,} optimizer steps of {eff} samples ({rule}; {steps / max(per_epoch, 1):.3g} epochs "
            f"of {n:,} samples): about {_duration(seconds)} at the trial's {sps:.1f} samples/s, evaluation not "
            f"counted; add train.max_steps=<n> or train.epochs=<n> to shorten it")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


# Settings that only shape a measurement trial; the command trains the cell for real.
TRIAL_KEYS = ("measure.steps", "measure.warmup_steps", "measure.samples", "measure.warmup_samples",
              "objective", "objective_penalty")


def reproduce_command(job_dir: Path) -> str:
    """`python run.py ...` for the cell measured in `job_dir`: the config groups it chose where they
    differ from the defaults (data=synthetic from a preset, say), then every value that differs from
    those groups' defaults (the swept settings and whatever a preset or the user set), less the
    trial's measurement knobs and the sweep section."""
    from hydra import compose

    job_cfg = OmegaConf.load(job_dir / HYDRA_DIR / "config.yaml")
    chosen = OmegaConf.load(job_dir / HYDRA_DIR / "hydra.yaml").hydra.runtime.choices
    defaults = compose(config_name="config", return_hydra_config=True).hydra.runtime.choices
    groups = [f"{g}={c}" for g, c in chosen.items() if g in defaults and g != "preset" and "/" not in g
              and c is not None and c != defaults[g]]
    base = compose(config_name="config", overrides=groups)
    wanted = _leaves(OmegaConf.to_container(job_cfg, resolve=True, enum_to_str=True))
    have = _leaves(OmegaConf.to_container(base, resolve=True, enum_to_str=True))

    def kept(key: str) -> bool:
        return key in wanted and not key.startswith("sweep.") and key not in TRIAL_KEYS

    # the job's own overrides first (the swept settings, shown even where they equal a default)
    own = [o.split("=", 1)[0].lstrip("+~") for o in OmegaConf.load(job_dir / HYDRA_DIR / "overrides.yaml") if "=" in o]
    keys = [k for k in own if kept(k)]
    keys += [k for k in wanted if kept(k) and k not in keys and k in have and wanted[k] != have[k]]
    return " ".join(["python run.py", *groups, *(f"{k}={_override_value(wanted[k])}" for k in keys)])


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _override_value(v: Any) -> str:
    """A value as Hydra's override grammar reads it back."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_override_value(x) for x in v) + "]"
    text = str(v)
    if isinstance(v, str) and (not text or any(c in text for c in " ,=[]{}()'\"\\:$")):
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return text


RDB_URLS = ("postgresql", "mysql", "mariadb", "oracle", "mssql")


def prepare_storage(hydra_cfg: Any, attempts: int = 8) -> None:
    """Create Optuna's tables before the sweeper opens its study. Workers that start at the same
    moment on an empty database race to create them (PostgreSQL: UniqueViolation on pg_type) and
    the loser would die; here it waits a moment and finds them made."""
    url = str(OmegaConf.select(hydra_cfg, "sweeper.storage", default="") or "")
    if _is_optuna(hydra_cfg) and url.startswith("sqlite:///"):  # SQLite makes the file, not its folder
        make_folder(Path(url[len("sqlite:///"):]).parent)
    if not _is_optuna(hydra_cfg) or not url.startswith(RDB_URLS):
        return
    import random

    import optuna
    import sqlalchemy.exc

    for attempt in range(1, attempts + 1):
        try:
            optuna.storages.RDBStorage(url).engine.dispose()
            return
        except ModuleNotFoundError as exc:  # the database's driver
            raise ConfigError(f"hydra.sweeper.storage={_shown(url)} needs the Python module {exc.name}: "
                              f"pip install -e '.[postgres]' for PostgreSQL") from None
        except sqlalchemy.exc.DBAPIError as exc:
            if attempt == attempts or isinstance(exc, sqlalchemy.exc.OperationalError):
                # OperationalError: no server, wrong password: nothing a retry fixes
                reason = (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0]
                raise ConfigError(f"cannot open the Optuna storage hydra.sweeper.storage={_shown(url)} ({reason}): "
                                  f"check that the server is up and the host, user, password and database") from None
            log.info("Optuna tables are being created by another worker (%s); retrying", type(exc.orig).__name__)
            time.sleep(0.2 + random.random())


def _shown(url: str) -> str:
    """A storage URL fit for a message: its password hidden."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: nothing in it to hide
        return url


def check_sweeper(hydra_cfg: Any) -> None:
    """Settings of the Optuna or knee sweeper that cannot work, refused before the first trial."""
    sweeper = hydra_cfg.sweeper
    target = str(sweeper.get("_target_", "")).lower()
    if "optuna" in target:
        counts, ranges = ("n_trials", "n_jobs"), ()
        storage = str(sweeper.get("storage") or "")
        if storage and not storage.startswith(("sqlite:///", *RDB_URLS)):
            raise ConfigError(f"hydra.sweeper.storage={_shown(storage)} is not a database Optuna can keep a study in: "
                              f"give sqlite:///<file>.db, postgresql://<user>:<password>@<host>/<database>, or null "
                              f"for a study in memory")
    elif "knee" in target:
        # tolerance -1: stop on memory only; resolution 1: no bisection between powers of two
        counts, ranges = ("min_batch_size", "max_batch_size", "max_trials"), (("tolerance", -1.0, 1.0, ")"),
                                                                              ("resolution", 0.0, 1.0, "]"))
    else:
        return
    for key in counts:
        value = sweeper.get(key)
        if value is not None and value < 1:
            raise ConfigError(f"hydra.sweeper.{key}={value} is invalid: it must be >= 1")
    for key, low, high, end in ranges:
        value = sweeper.get(key)
        if value is not None and not (low <= value < high or (end == "]" and value == high)):
            raise ConfigError(f"hydra.sweeper.{key}={value} is invalid: it must be in [{low:g}, {high:g}{end}")
    if "knee" in target and sweeper.min_batch_size > sweeper.max_batch_size:
        raise ConfigError(f"hydra.sweeper.min_batch_size={sweeper.min_batch_size} exceeds "
                          f"hydra.sweeper.max_batch_size={sweeper.max_batch_size}")


def check_study(config: DictConfig) -> None:
    """A study this sweep would continue (same storage and name) must be the same search: the same
    directions, objective and parameters with the same choices or ranges. Otherwise it is refused
    before any trial starts, naming the study and the difference (Optuna itself fails on the first
    trial, leaving it RUNNING, or mixes two searches in one study)."""
    hydra_cfg = config.hydra
    if not _is_optuna(hydra_cfg) or not hydra_cfg.sweeper.get("storage"):
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
        raise ConfigError(f"the Optuna study {name} in {_shown(storage)} holds another search ({'; '.join(problems)}): "
                          f"give this sweep a study of its own (hydra.sweeper.study_name=<new name>), or run it "
                          f"with that study's settings")


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
        log.warning("trials %s were stopped before the study heard their result: marked FAIL",
                    ", ".join(map(str, failed)))
    return failed


def metric_names(objective: str) -> list[str]:
    """What the study's values are, for optuna-dashboard and study.trials_dataframe()."""
    if objective == "seconds_per_sample_and_rouge":
        return ["train_seconds_per_sample", "rouge_mean"]
    return [objective]


def name_objectives(config: DictConfig) -> None:
    """Create the study (if new) with the sweeper's directions and name its values."""
    hydra_cfg = config.hydra
    if not _is_optuna(hydra_cfg) or not hydra_cfg.sweeper.get("storage"):
        return
    import optuna

    direction = hydra_cfg.sweeper.direction
    directions = [str(d) for d in direction] if OmegaConf.is_list(direction) else [str(direction)]
    study = optuna.create_study(study_name=hydra_cfg.sweeper.study_name, storage=hydra_cfg.sweeper.storage,
                                directions=directions, load_if_exists=True)
    names = metric_names(str(config.objective))
    if len(names) == len(directions) and study.metric_names != names:
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2, and still the way to name them
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)
