"""Test helper, not a test: run.py with the order of device work, device synchronizes and the step
clock's reads recorded, in every process of a launch (tests/test_gpu_contracts.py).

On the CPU a synchronize is a no-op, so the order is what can be checked here: on a GPU a clock
read that no synchronize precedes bills the work queued before it to the window it opens.
Events, in order, go to $SUMM_TEST_EVENTS/rank<N>.json at exit:
  "work"        a module's forward or backward, or an optimizer step (work a GPU would queue)
  "probe"       the memory probe starts ("probe-end": it returned)
  "sync"        summ's device synchronize
  "start"/"lap" the step clock opened a window / closed a step ([name, seconds] for a lap)
  "load"        the machine's load read (/proc), which must fall outside every step's window
"""

import atexit
import json
import os
import runpy
import sys
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from summ.measure import machine, timing  # noqa: E402
from summ.training import loop  # noqa: E402

events: list = []


def install() -> list:
    """Install the recorders in this process (the patched functions stay; the caller restores
    them); returns the handles of the global hooks, to remove."""
    work = lambda *args: events.append("work")  # noqa: E731
    handles = [
        torch.nn.modules.module.register_module_forward_hook(work),
        torch.nn.modules.module.register_module_full_backward_hook(work),
        register_optimizer_step_post_hook(work),
    ]
    synchronize, start, lap, probe = timing.synchronize, timing.StepClock.start, timing.StepClock.lap, loop.probe_memory

    def recorded_sync(device):
        events.append("sync")
        return synchronize(device)

    def recorded_start(clock):
        opened = start(clock)
        events.append("start")
        return opened

    def recorded_lap(clock):
        seconds = lap(clock)
        events.append(["lap", seconds])
        return seconds

    def recorded_probe(*args, **kwargs):
        events.append("probe")
        try:
            return probe(*args, **kwargs)
        finally:
            events.append("probe-end")

    sample = machine.LoadWatch.sample

    def recorded_sample(watch):
        events.append("load")
        return sample(watch)

    timing.synchronize, timing.StepClock.start, timing.StepClock.lap = recorded_sync, recorded_start, recorded_lap
    machine.LoadWatch.sample = recorded_sample
    loop.probe_memory = recorded_probe
    return handles


def _dump() -> None:
    folder = Path(os.environ["SUMM_TEST_EVENTS"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(events))


if __name__ == "__main__":
    install()
    atexit.register(_dump)
    sys.argv[0] = str(ROOT / "run.py")
    runpy.run_path(str(ROOT / "run.py"), run_name="__main__")
