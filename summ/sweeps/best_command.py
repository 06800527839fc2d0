"""The best trial of a single-objective Optuna study as one command that trains its cell anew
(best_overrides.txt in the sweep folder): the config groups and values the trial's job folder
recorded, less the trial's measurement knobs, quoted as Hydra's override grammar reads them back,
and what that command trains, in words."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from summ.run_folder import BEST_FILE, HYDRA_DIR, read_metrics, write_text
from summ.sweeps.storage import has_storage

log = logging.getLogger(__name__)


def write_best(config: DictConfig, sweep_dir: Path) -> str | None:
    """After a single-objective Optuna sweep: the study's best trial as one command that trains
    that cell anew (reproduce_command), saved to best_overrides.txt and returned."""
    if not has_storage(config.hydra):
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
    write_text(
        sweep_dir,
        BEST_FILE,
        f"# best trial {best.number} of study {study.study_name}: {best.value:.6g} "
        f"({config.objective}), measured in {job_dir}; train that cell with:\n"
        + (f"# {plan}\n" if plan else "")
        + f"{command}\n",
    )
    return command + (f"\n  ({plan})" if plan else "")


def what_it_runs(job_dir: Path) -> str | None:
    """What the best trial's command trains, in words: its schedule in epochs and optimizer steps
    (the same rules as the run: train.total_samples, train.max_steps, then train.epochs) and the
    training time at the trial's measured samples/s. None when the trial's record lacks them."""
    m = read_metrics(job_dir).record
    cfg = OmegaConf.load(job_dir / HYDRA_DIR / "config.yaml")
    eff, n, sps = (m.effective_batch_size, m.train_set_size, m.train and m.train.samples_per_s) if m else (0, 0, 0)
    if m and m.max_tokens and m.train and m.train.optimizer_steps:  # a token budget: its measured mean a step
        eff = round(m.train.samples / m.train.optimizer_steps)
    if not (eff and n and sps):
        return None
    from summ.training.schedule import schedule_length

    per_epoch = n // eff
    # the run's own rule, without the trial's measured window (reproduce_command drops it)
    steps = schedule_length(OmegaConf.merge(cfg, {"measure": {"samples": None, "steps": None}}), per_epoch, eff)
    key = next(k for k in ("total_samples", "max_steps", "epochs") if cfg.train.get(k))
    rule = f"train.{key}={cfg.train[key]}"
    seconds = steps * eff / sps
    return (
        f"it trains {steps:,} optimizer steps of {eff} samples ({rule}; {steps / max(per_epoch, 1):.3g} epochs "
        f"of {n:,} samples): about {_duration(seconds)} at the trial's {sps:.1f} samples/s, evaluation not "
        f"counted; add train.max_steps=<n> or train.epochs=<n> to shorten it"
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


# Settings that only shape a measurement trial; the command trains the cell for real.
TRIAL_KEYS = (
    "measure.steps",
    "measure.warmup_steps",
    "measure.samples",
    "measure.warmup_samples",
    "objective",
    "objective_penalty",
)


def reproduce_command(job_dir: Path) -> str:
    """`python run.py ...` for the cell measured in `job_dir`: the config groups it chose where they
    differ from the defaults (data=synthetic from a preset, say), then every value that differs from
    those groups' defaults (the swept settings and whatever a preset or the user set), less the
    trial's measurement knobs and the sweep section."""
    from hydra import compose

    job_cfg = OmegaConf.load(job_dir / HYDRA_DIR / "config.yaml")
    chosen = OmegaConf.load(job_dir / HYDRA_DIR / "hydra.yaml").hydra.runtime.choices
    defaults = compose(config_name="config", return_hydra_config=True).hydra.runtime.choices
    groups = [
        f"{g}={c}"
        for g, c in chosen.items()
        if g in defaults and g != "preset" and "/" not in g and c is not None and c != defaults[g]
    ]
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
