"""Several processes, one run: what run.py does before Hydra composes anything.

- `accelerate launch --cpu --num_processes N run.py ...` starts one process: accelerate's CPU
  launcher runs N only through MPI (--mpirun_hostfile). Where it was asked for N > 1 without MPI,
  run.py hands the command to torch.distributed.run (the elastic launcher accelerate uses for
  GPUs), which starts the N processes; they train with DDP over gloo.
- Every process of a launch must write to one run folder, but Hydra names it from the clock:
  process 0's timestamp is broadcast to the others before composition (SUMM_RUN_STAMP).
- Only process 0 keeps Hydra's files (.hydra/, run.log); the others log to the console.
"""

from __future__ import annotations

import os
import sys
import time

STAMP_ENV = "SUMM_RUN_STAMP"
# What a collective raises when another process never reached it (gloo's timeout, the pair it then
# closes, a peer gone; NCCL's watchdog under TORCH_NCCL_BLOCKING_WAIT, an aborted communicator)
OUT_OF_STEP = (
    "Timed out waiting",
    "Application timeout caused pair closure",
    "Connection closed by peer",
    "Watchdog caught collective operation timeout",
    "NCCL communicator was aborted",
)
STAMP_FORMAT = "%Y-%m-%d_%H-%M-%S"


def sharded_by(accelerator) -> str | None:
    """ "deepspeed", "fsdp", or None (one process, DDP): how the launch spreads the model's state."""
    kind = str(getattr(accelerator, "distributed_type", "")).rsplit(".", 1)[-1]
    return {"DEEPSPEED": "deepspeed", "FSDP": "fsdp"}.get(kind)


def out_of_step(exc: BaseException) -> bool:
    """`exc` says the processes of this launch are no longer in step (OUT_OF_STEP)."""
    text = str(exc)
    return world_size() > 1 and isinstance(exc, RuntimeError) and any(m in text for m in OUT_OF_STEP)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def requested_cpu_processes() -> tuple[int, int | None] | None:
    """(processes, port) when `accelerate launch --cpu --num_processes N` (N > 1, no MPI) started
    this single process; None otherwise."""
    if world_size() > 1 or os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1"):
        return None
    if "MASTER_ADDR" not in os.environ:  # accelerate sets it only when it was asked for several processes
        return None
    try:
        import psutil
        from accelerate.commands.launch import launch_command_parser

        argv = psutil.Process(os.getppid()).cmdline()
        at = next(i for i, a in enumerate(argv) if a == "launch")
        args, _ = launch_command_parser().parse_known_args(argv[at + 1 :])
    except Exception:  # not accelerate's launcher, or its arguments are not readable
        return None
    if args.mpirun_hostfile or not args.num_processes or args.num_processes < 2:
        return None
    return args.num_processes, args.main_process_port


def relaunch(processes: int, port: int | None) -> int:
    """Run this same command as `processes` processes through torch.distributed.run."""
    from torch.distributed.run import get_args_parser, run

    print(
        f"summ: accelerate launch --cpu starts {processes} processes only through MPI; starting them "
        f"with torch.distributed.run (DDP over gloo)",
        file=sys.stderr,
    )
    args = get_args_parser().parse_args(
        [
            "--nproc_per_node",
            str(processes),
            "--master_port",
            str(port or 29500),
            "--master_addr",
            "127.0.0.1",
            sys.argv[0],
            *sys.argv[1:],
        ]
    )
    os.environ["ACCELERATE_USE_CPU"] = "true"
    run(args)
    return 0


def share_run_stamp() -> None:
    """One launch time for `${summ_now:...}`: fixed at start, so a sweep's folder name does not move
    while its jobs resolve it again one by one, and process 0's clock for every process of a
    distributed launch (one run folder per launch). Children (workers, relaunches) inherit it."""
    if STAMP_ENV in os.environ:
        return
    if world_size() < 2:
        os.environ[STAMP_ENV] = repr(time.time())
        return
    import torch
    from accelerate import PartialState

    state = PartialState(
        cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1") or not torch.cuda.is_available()
    )
    stamp = [time.time() if state.is_main_process else None]
    torch.distributed.broadcast_object_list(stamp, src=0)
    os.environ[STAMP_ENV] = repr(stamp[0])


def now(fmt: str = STAMP_FORMAT) -> str:
    """The resolver behind ${summ_now:FORMAT}: the shared launch time, else the clock."""
    stamp = os.environ.get(STAMP_ENV)
    return time.strftime(fmt, time.localtime(float(stamp) if stamp else time.time()))


def hydra_overrides_for_this_process() -> list[str]:
    """Processes other than 0 leave Hydra's files to process 0 and log to the console."""
    if world_size() > 1 and rank() != 0:
        return ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    return []


def is_main_process() -> bool:
    """Process 0 of the launch (true outside any distributed launch)."""
    return rank() == 0
