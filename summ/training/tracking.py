"""Experiment tracking through Accelerate's trackers (TensorBoard, MLflow, Weights & Biases).

Four calls wire it into a job:

    acc = Accelerator(..., **accelerator_kwargs(cfg.tracking, run_dir))   # log_with, project_dir
    tracking = start(acc, cfg.tracking, resolved_config, run_name, group)
    tracking.log_step(record, step)   # every optimizer step; honours tracking.log_every_steps
    tracking.finish(metrics)          # the run's final figures once, then the trackers end

The config is logged as hyperparameters (dotted keys), each optimizer step's figures under
`step/` (loss, lr, samples_per_s, tokens_per_s, step_time_s, peak_mem_bytes) and the final
the metrics record's figures under their own paths (`train/samples_per_s`, `memory/peak_bytes`,
`eval/rouge1`, ...). A sweep's jobs are one run each, grouped by the sweep folder's name: the
MLflow experiment, the wandb group, a TensorBoard folder when `tracking.dir` is shared.

Tracking never breaks a run: a missing package, a tracker that cannot start or fails later
costs one warning line and tracking is off for the rest of that run. Only the main process
logs. The run folder's metrics and step history stay the record either way.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The importable package behind each tracker (TensorBoard: either writer works with Accelerate).
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",), "wandb": ("wandb",)}
DEFAULT_MLFLOW_URI = "sqlite:///outputs/mlflow.db"  # relative to the working directory
STEP_KEYS = ("loss", "lr", "samples_per_s", "tokens_per_s", "step_time_s", "peak_mem_bytes", "epoch")
STRING_KEYS = ("status", "error")  # metrics fields kept as text (MLflow: run tags)


def _installed(name: str) -> bool:
    """Importable here and known to Accelerate as available."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    return (
        any(importlib.util.find_spec(p) is not None for p in _PACKAGES[name])
        and LoggerType(name) in get_available_trackers()
    )


def tensorboard_dir(tcfg, run_dir: Path) -> Path:
    """Where TensorBoard event files go: tracking.dir, or the run's own tracking/ folder."""
    return Path(tcfg.dir) if tcfg.dir else Path(run_dir) / "tracking"


def accelerator_kwargs(tcfg, run_dir: Path) -> dict:
    """`log_with` (and `project_dir` for TensorBoard) for Accelerator(...); {} for no tracking or
    when the tracker's package is missing (one warning line: the run goes on untracked)."""
    if tcfg.name == "none":  # (an unknown name fails at composition: an enum)
        return {}
    if not _installed(tcfg.name):
        log.warning(
            "tracking.name=%s needs the %s package (pip install %s, or pip install -e '.[track]'): "
            "this run is not tracked",
            tcfg.name,
            _PACKAGES[tcfg.name][0],
            _PACKAGES[tcfg.name][0],
        )
        return {}
    if tcfg.name == "tensorboard":
        return {"log_with": "tensorboard", "project_dir": str(tensorboard_dir(tcfg, run_dir))}
    return {"log_with": tcfg.name}


def mlflow_tracking_uri(tcfg) -> str:
    """tracking.mlflow_tracking_uri, else $MLFLOW_TRACKING_URI, else a local SQLite store
    (MLflow's recommended local backend; its file store is deprecated)."""
    return tcfg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_MLFLOW_URI


def wandb_mode(tcfg) -> str:
    return tcfg.wandb_mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


def hyperparameters(config: Any, max_value_len: int | None = None) -> dict[str, Any]:
    """A resolved config (a DictConfig, the Config dataclass or a dict) as flat `a.b.c` keys with
    scalar values: lists as JSON text, None as "null", enums by value; text longer than
    `max_value_len` is cut (MLflow's parameter limit)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True, enum_to_str=True)
    elif dataclasses.is_dataclass(config):  # the typed Config object
        config = dataclasses.asdict(config)
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
            return
        if isinstance(node, enum.Enum):
            node = node.value
        if node is None:
            node = "null"
        elif isinstance(node, (list, tuple)):
            node = json.dumps(node, ensure_ascii=False, default=str)
        elif not isinstance(node, (bool, int, float, str)):
            node = str(node)
        if max_value_len is not None and isinstance(node, str) and len(node) > max_value_len:
            node = node[: max_value_len - 1] + "…"
        flat[prefix] = node

    walk("", config)
    return flat


def final_figures(metrics: Mapping) -> dict[str, float]:
    """The numbers of a metrics record as `section/key` paths (train/samples_per_s,
    memory/peak_bytes, eval/rouge1, kfold/rouge_mean/mean ...); flags, text, lists and
    missing or non-finite values are left out."""
    out: dict[str, float] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(node, (int, float)) and not isinstance(node, bool) and math.isfinite(node):
            out[prefix] = node

    walk("", metrics)
    return out


class Tracking:
    """One run's tracker, as returned by start(). Inactive (every call a no-op) when tracking is
    off, on other processes than the main one, or after a tracker error, which is reported
    once as a warning: tracking never breaks a run."""

    def __init__(self, accelerator=None, name: str = "none", log_every_steps: int = 1):
        self._acc, self.name, self.every = accelerator, name, max(1, log_every_steps)
        self._pending: tuple[dict, int] | None = None  # the latest step not logged yet
        self._last_step: int | None = None
        self._logged_steps = 0

    @property
    def active(self) -> bool:
        return self._acc is not None

    def log_step(self, record: Mapping, step: int) -> None:
        """Log one optimizer step's figures: the first step, every `log_every_steps`-th step and
        (from finish) the last one."""
        if not self.active:
            return
        values = {
            f"step/{k}": float(record[k])
            for k in STEP_KEYS
            if isinstance(record.get(k), (int, float)) and not isinstance(record.get(k), bool)
        }
        self._last_step = step
        if self._logged_steps == 0 or step % self.every == 0:
            self._pending = None
            self._send(values, step, "logging a step")
            self._logged_steps += 1
        else:
            self._pending = (values, step)

    def finish(self, metrics: Mapping) -> None:
        """The last step if it is still pending, the final figures once, then end the trackers."""
        if not self.active:
            return
        if self._pending is not None:
            self._send(*self._pending, "logging the last step")
            self._pending = None
        step = self._last_step or 0
        if self.name == "mlflow":  # the final figures are waited on, so a refusal is reported here
            self._synchronous_mlflow()
        self._send(final_figures(metrics), step, "logging the final metrics")
        text = {k: str(metrics[k]) for k in STRING_KEYS if metrics.get(k) is not None}
        if text and self.active:
            self._log_text(text, step)
        self._end()  # a no-op when a failure above has ended the trackers already

    # ------------------------------------------------------------------ internals
    def _send(self, values: dict, step: int, what: str) -> None:
        if not self.active or not values:
            return
        try:
            self._acc.log(values, step=step)
        except Exception as exc:  # a tracker's own failure: never the run's
            self._disable(what, exc)

    def _log_text(self, text: dict, step: int) -> None:
        try:
            if self.name == "mlflow":  # MLflow metrics are numbers only: text goes to the run's tags
                import mlflow

                mlflow.set_tags(text)
            else:
                self._acc.log(text, step=step)
        except Exception as exc:
            self._disable("logging the run status", exc)

    def _synchronous_mlflow(self) -> None:
        """The steps queued so far sent, and what follows sent at once (MLflow's own thread would
        only print its error)."""
        try:
            import mlflow

            mlflow.flush_async_logging()
            mlflow.config.enable_async_logging(False)
        except Exception as exc:
            self._disable("sending the queued steps", exc)

    def _disable(self, what: str, exc: BaseException) -> None:
        log.warning(
            "tracking (%s) failed while %s, and is off for the rest of this run: %s",
            self.name,
            what,
            f"{type(exc).__name__}: {exc}".splitlines()[0],
        )
        self._end(quiet=True)

    def _end(self, quiet: bool = False) -> None:
        """End every tracker of the accelerator (a writer closed, an MLflow run ended, so the next
        job of a sweep starts clean). Not accelerator.end_training(): that also destroys the
        process group, which the next job in this process still needs."""
        acc, self._acc = self._acc, None
        if acc is None:
            return
        failure = None
        if self.name == "mlflow":
            try:
                import mlflow

                if mlflow.active_run() is not None:  # with no run, flushing would open a store: ./mlflow.db
                    mlflow.flush_async_logging()
            except Exception as exc:
                failure = exc
        for tracker in list(acc.trackers):
            try:
                tracker.finish()
            except Exception as exc:
                failure = failure or exc
        acc.trackers.clear()
        if failure is not None and not quiet:
            log.warning(
                "tracking (%s) failed while ending the run: %s",
                self.name,
                f"{type(failure).__name__}: {failure}".splitlines()[0],
            )


def _run_setup(tcfg, run_name: str, group: str | None) -> tuple[str, dict, int | None]:
    """(project name for init_trackers, its init_kwargs, the parameter text limit) per tracker."""
    if tcfg.name == "tensorboard":
        # events in <dir>/<project name>; a shared tracking.dir keeps a sweep's runs in one folder
        name = f"{group}/{run_name}" if tcfg.dir and group else run_name
        return name, {}, None
    if tcfg.name == "wandb":
        wdir = Path(tcfg.dir or "outputs")
        wdir.mkdir(parents=True, exist_ok=True)
        return (
            tcfg.project,
            {"wandb": {"name": run_name, "group": group, "mode": wandb_mode(tcfg), "dir": str(wdir.resolve())}},
            None,
        )
    import mlflow
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    uri = mlflow_tracking_uri(tcfg)
    kwargs: dict[str, Any] = {"run_name": run_name}
    if uri.startswith("sqlite:///"):  # a local store: artifacts beside the database, not in ./mlruns
        db = Path(uri[len("sqlite:///") :])
        db.parent.mkdir(parents=True, exist_ok=True)
        kwargs["logging_dir"] = str((db.parent / "mlartifacts").resolve())
    _check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    # a logged step is queued and sent by MLflow's own thread, not waited on inside the step
    # (TensorBoard's writer and wandb queue theirs already); flushed when the run ends
    mlflow.config.enable_async_logging(True)
    return group or tcfg.project, {"mlflow": kwargs}, MAX_PARAM_VAL_LENGTH


def _check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """An MLflow server that does not answer is found out in seconds, not after the client's
    minutes of retries (it backs off seven times before it gives up); the run goes on without it."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    # later requests of this run: fewer retries and a shorter wait, should the server go away mid-run
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # it answered (a proxy, an older server without /health): let MLflow's client judge
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConnectionError(
            f"the MLflow server at {uri} does not answer ({reason}): check "
            f"tracking.mlflow_tracking_uri, or leave it unset for the local store"
        ) from None


def start(accelerator, tcfg, config: Any, run_name: str, group: str | None) -> Tracking:
    """Start the configured tracker for one run and log `config` (the resolved config) as its
    hyperparameters. `group` is the sweep folder's name for a multirun job, None for a single
    run. The accelerator must have been built with accelerator_kwargs(tcfg, run_dir), which
    also placed TensorBoard's files."""
    if tcfg.name == "none" or not accelerator.is_main_process:
        return Tracking()
    if tcfg.name not in {str(t) for t in accelerator.log_with}:
        return Tracking()  # the package is missing: accelerator_kwargs() has said so
    tracking = Tracking(accelerator, tcfg.name, tcfg.log_every_steps)
    try:
        project, init_kwargs, max_len = _run_setup(tcfg, run_name, group)
        accelerator.init_trackers(project, config=hyperparameters(config, max_len), init_kwargs=init_kwargs)
    except Exception as exc:  # an unreachable server, a bad URI, an unwritable folder ...
        tracking._disable("starting", exc)
    return tracking
