"""Checkpoints and interruption: a run that stops (SIGINT, SIGTERM, train.save_every_steps) can
continue where it was, with the same optimizer step count, schedule position and data order.

A checkpoint is Accelerate's state (model, optimizer, the registered scheduler, every process's
RNG) plus summ's own position in the data (epoch, micro-batches consumed in it) and the step
history so far, in <run dir>/checkpoints/step_<n>/. It is written under a temporary name and
renamed when complete, so `latest` never picks half a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import threading
from pathlib import Path

from summ.config import config_hash
from summ.errors import ConfigError
from summ.files import atomic_write_text, read_jsonl, write_jsonl
from summ.run_folder import CHECKPOINTS_DIR

log = logging.getLogger(__name__)

FOLDER = CHECKPOINTS_DIR
STATE_FILE = "summ_state.json"
HISTORY = "history.jsonl"
# what a checkpoint must match to be resumed: the config, less where and how it is saved
IDENTITY_FREE = (
    "train.resume_from",
    "train.save_every_steps",
    "train.keep_checkpoints",
    "tracking",
    "save_visualizations",
)


def identity(cfg) -> str:
    """The hash a checkpoint is saved with and must match to be resumed (`cfg`: the composed DictConfig)."""
    return config_hash(cfg, leave_out=IDENTITY_FREE)


def _complete(d: Path) -> bool:
    return d.is_dir() and d.name.startswith("step_") and (d / STATE_FILE).is_file()


def _steps(folder: Path) -> list[Path]:
    found = [d for d in folder.glob("step_*") if _complete(d) and d.name[5:].isdigit()]
    return sorted(found, key=lambda d: int(d.name[5:]))


def latest(run_dir: Path) -> Path | None:
    """The run folder's newest complete checkpoint, or None."""
    found = _steps(Path(run_dir) / FOLDER)
    return found[-1] if found else None


def resolve(resume_from: str, run_dir: Path) -> Path:
    """train.resume_from -> one complete checkpoint folder, or a one-line ConfigError."""
    if resume_from == "latest":
        found = latest(run_dir)
        if found is None:
            raise ConfigError(
                f"train.resume_from=latest: {run_dir / FOLDER} holds no checkpoint; pass "
                f"hydra.run.dir=<the interrupted run's folder>, or train.resume_from=<its folder>"
            )
        return found
    path = Path(resume_from).expanduser()
    if _complete(path):
        return path
    found = _steps(path / FOLDER) if path.is_dir() else []
    if not found:
        raise ConfigError(
            f"train.resume_from={resume_from} is neither a checkpoint nor a run folder with "
            f"{FOLDER}/step_<n>: give one of those, or latest"
        )
    return found[-1]


def save(
    accelerator,
    run_dir: Path,
    step: int,
    position: dict,
    history: list[dict],
    keep: int,
    identity: str,
    stopping: bool = False,
) -> Path:
    """Every process calls this (Accelerate saves each one's RNG state); process 0 renames and prunes.
    SIGINT and SIGTERM wait until it is done: a checkpoint is written whole, or the previous one stays.
    A signal that waited is acted on once the save is done, unless this save is the stop's own."""
    with signals_deferred(deliver_after=not stopping):
        return _save(accelerator, run_dir, step, position, history, keep, identity)


@contextlib.contextmanager
def signals_deferred(deliver_after: bool):
    """SIGINT / SIGTERM noted, not acted on, for the duration (a second Ctrl-C during torch.save
    would leave a half-written checkpoint and a traceback). With deliver_after, each signal that
    waited is raised again once the previous handlers are back (a stop asked for during a periodic
    save is not lost); without, the stop this save belongs to is already under way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    waited: list[int] = []

    def wait(signum, frame):
        waited.append(signum)
        log.warning("%s while a checkpoint is being written: it finishes first", signal.Signals(signum).name)

    for s in previous:
        signal.signal(s, wait)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum in waited if deliver_after else ():
            signal.raise_signal(signum)


def _save(accelerator, run_dir: Path, step: int, position: dict, history: list[dict], keep: int, identity: str) -> Path:
    folder = run_dir / FOLDER
    final, tmp = folder / f"step_{step}", folder / f".step_{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()  # every process has written its part (its RNG state, its shard)
    if accelerator.is_main_process:
        atomic_write_text(tmp / STATE_FILE, json.dumps({"step": step, **position, "config": identity}))
        write_jsonl(tmp / HISTORY, history)
        if final.exists():
            shutil.rmtree(final)
        tmp.replace(final)
        for old in _steps(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint: %s", final)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, checkpoint: Path, identity: str) -> tuple[dict, list[dict]]:
    """Restore Accelerate's state; return summ's position and the history up to it. The
    checkpoint must come from the same config (batch, data, seed, model...): its data position
    means nothing under another."""
    position = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    if position.pop("config", identity) != identity:
        raise ConfigError(
            f"{checkpoint} was written by a run with another config (batch, data, seed, model or "
            f"schedule): resume with that run's settings, or start anew without train.resume_from"
        )
    accelerator.load_state(str(checkpoint))
    return position, read_jsonl(checkpoint / HISTORY)


class StopRequest:
    """SIGINT / SIGTERM during training: noted, acted on at the end of the optimizer step."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def note(signum, frame):
            if self.signum is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            self.signum = signum
            log.warning(
                "%s: saving a checkpoint at the end of this optimizer step (Ctrl-C again to stop at once)",
                signal.Signals(signum).name,
            )

        for s in previous:
            signal.signal(s, note)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
