"""Optuna studies behind hydra-optuna-sweeper: why a trial scored as it did, the best trial as
a command to run again, and the search space that is valid on this device."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from summ.io import atomic_write_text

log = logging.getLogger(__name__)

BEST_FILE = "best_overrides.txt"
TRIAL_ONLY = ("hydra.", "preset=", "measure.steps=", "measure.warmup_steps=", "sweep.")


def precision_choices() -> str:
    """Mixed-precision values this device can train with, as an Optuna sweeper choice."""
    import torch

    values = ["no", "bf16"]  # bf16 autocast runs on CPUs too
    if torch.cuda.is_available():
        values = ["no", "fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    return f"choice({','.join(values)})"


def _is_optuna(hydra_cfg: Any) -> bool:
    target = OmegaConf.select(hydra_cfg, "sweeper._target_", default="") or ""
    return "optuna" in target.lower()


def _matches(params: dict, overrides: list[str]) -> bool:
    given = dict(o.split("=", 1) for o in overrides if "=" in o)
    return all(str(given.get(k, "")).lower() == str(v).lower() for k, v in params.items())


def record_trial(hydra_cfg: Any, overrides: list[str], metrics: dict) -> None:
    """Attach status, error, peak memory and throughput to this job's trial, so that
    `optuna-dashboard <storage>` shows why an infeasible trial got the penalty."""
    if not _is_optuna(hydra_cfg) or not hydra_cfg.sweeper.get("storage"):
        return
    import optuna

    import time

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
        mem, train = metrics.get("memory") or {}, metrics.get("train") or {}
        for key, value in (("status", metrics.get("status")), ("error", metrics.get("error")),
                           ("peak_bytes", mem.get("peak_bytes")), ("samples_per_s", train.get("samples_per_s")),
                           ("tokens_per_s", train.get("tokens_per_s")), ("job_dir", metrics.get("job_dir"))):
            trial.set_user_attr(key, value)
    except Exception as exc:  # attributes are a convenience: never fail the trial for them
        log.warning("could not record trial attributes in the Optuna study: %s", exc)


def write_best(config: DictConfig, sweep_dir: Path) -> Optional[str]:
    """After an Optuna sweep: the best trial's overrides as one command, saved and returned."""
    results = sweep_dir / "optimization_results.yaml"
    if not results.is_file():
        return None
    res = OmegaConf.load(results)
    if "best_params" not in res:  # a multi-objective study has a front, not one best
        return None
    swept = set(res.best_params.keys())
    # keep the user's own choices (model, data, ...); drop the trial's measurement knobs
    fixed = [o for o in config.hydra.overrides.task
             if not o.startswith(TRIAL_ONLY) and o.split("=", 1)[0] not in swept]
    best = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in res.best_params.items()]
    command = "python run.py " + " ".join(fixed + best)
    atomic_write_text(sweep_dir / BEST_FILE,
                      f"# best trial of study {config.hydra.sweeper.study_name}: {res.best_value:.6g} "
                      f"({config.objective}); run it with:\n{command}\n")
    return command


RDB_URLS = ("postgresql", "mysql", "mariadb", "oracle", "mssql")


def prepare_storage(hydra_cfg: Any, attempts: int = 8) -> None:
    """Create Optuna's tables before the sweeper opens its study. Workers that start at the same
    moment on an empty database race to create them (PostgreSQL: UniqueViolation on pg_type) and
    the loser would die; here it waits a moment and finds them made."""
    url = str(OmegaConf.select(hydra_cfg, "sweeper.storage", default="") or "")
    if not _is_optuna(hydra_cfg) or not url.startswith(RDB_URLS):
        return
    import random
    import time

    import optuna
    import sqlalchemy.exc

    for attempt in range(1, attempts + 1):
        try:
            optuna.storages.RDBStorage(url).engine.dispose()
            return
        except sqlalchemy.exc.DBAPIError as exc:
            if attempt == attempts or isinstance(exc, sqlalchemy.exc.OperationalError):
                raise  # OperationalError: no server, wrong password: nothing a retry fixes
            log.info("Optuna tables are being created by another worker (%s); retrying", type(exc.orig).__name__)
            time.sleep(0.2 + random.random())


class OptunaStorageCallback(Callback):
    """Before an Optuna sweep opens its study: the storage's tables exist (prepare_storage)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        prepare_storage(config.hydra)
