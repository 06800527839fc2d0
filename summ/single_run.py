"""One job outside a sweep (`python run.py ...` without -m): its config checked, a result already
measured for it taken (sweep.resume, sweep.reuse_from: summ/jobs.py) or the job run, its summary
printed, and the process's exit code from its status (README, "Exit codes and errors"). It
imports nothing of summ.sweeps (setup.cfg: "a single run imports no sweep module"); a sweep's job
is summ/sweeps/trials.py."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from summ.config import trained_model_name
from summ.console import say
from summ.distributed import is_main_process
from summ.errors import ConfigError, Status, UserError, exit_code
from summ.jobs import measured_before, record_refusal
from summ.pipeline import run_job
from summ.reports.summary import format_summary
from summ.validation import validate


def run_single(cfg: DictConfig, output_dir: Path) -> float:
    """Run the job `cfg` describes in `output_dir`; exits with its status's code unless it ended ok."""
    try:
        validate(cfg)  # once per job, before anything reads the folder (run_job leaves it to its caller)
        _not_a_sweep_preset()
        _same_model_as_trained(cfg)
        metrics = measured_before(cfg, output_dir) or run_job(cfg, output_dir)
    except UserError as exc:
        record_refusal(output_dir, exc)  # whatever happened, the run folder says why
        say(f"error: {exc}", err=True)
        sys.exit(exc.exit_status)
    if is_main_process():  # one summary per launch
        say(format_summary(metrics.to_dict(), output_dir))
    if metrics.status != Status.ok:
        say(f"error: status {metrics.status}: {metrics.error}", err=True)
        sys.exit(exit_code(metrics.status))
    return 0.0


def _not_a_sweep_preset() -> None:
    """Every preset is a sweep (multirun_presets/): run once, it would drop its grid without a word."""
    preset = HydraConfig.get().runtime.choices.get("preset")
    if preset:
        raise ConfigError(f"preset={preset} is a sweep: run it with -m (python run.py -m preset={preset} ...)")


def _same_model_as_trained(cfg: DictConfig) -> None:
    """mode=predict reads the model group from the trained run: a model= given on the command line
    that names another would label the folder and the record with a model that never ran."""
    if cfg.mode != "predict" or not cfg.model.get("path"):
        return
    given = [o.split("=", 1)[1] for o in HydraConfig.get().overrides.task if o.startswith("model=")]
    trained = trained_model_name(cfg.model.path)
    if given and trained and given[-1] != trained:
        raise ConfigError(
            f"model={given[-1]}, but model.path={cfg.model.path} was trained as model={trained}: "
            f"leave model= out (predict reads it from the run), or give model={trained}"
        )
