"""Errors a user can cause and fix (each carries one line that says what to change), and the
exit codes a script or a scheduler reads from a run: their table is README's "Exit codes and
errors" (tests/test_exit_codes.py runs each of its rows)."""

import enum

EXIT_OK, EXIT_FAILED, EXIT_USER_ERROR, EXIT_RESOURCE = 0, 1, 2, 3


class Status(enum.StrEnum):
    """What became of a run: its record's `status` (run_folder.RunMetrics), written, read and compared
    as the plain string."""

    ok = "ok"
    oom = "oom"  # out of memory
    over_budget = "over_budget"  # peak memory over measure.memory_budget_gb x measure.headroom
    diverged = "diverged"  # the loss stopped being a number
    failed = "failed"  # a crash, a refused input (user_error) or a service down: the error says which
    interrupted = "interrupted"  # SIGINT / SIGTERM
    # A sweep's cell as the reports and the knee search call it where no run's status says it
    missing = "missing"  # the job left no record: it did not finish
    corrupt = "corrupt"  # a record that cannot be read
    reused = "reused"  # took another job's result (same config)
    remeasured = "remeasured"  # measured again later (merged into the last reading)
    predicted_over_budget = "predicted_over_budget"  # not run: the knee search's memory model says it cannot fit


RUN_STATUSES = (Status.ok, Status.oom, Status.over_budget, Status.diverged, Status.failed, Status.interrupted)
MEMORY_STATUSES = (Status.oom, Status.over_budget)  # the cell did not fit
RESOURCE_STATUSES = (*MEMORY_STATUSES, Status.diverged)  # exit code 3
FINAL_STATUSES = (Status.ok, *RESOURCE_STATUSES)  # measuring the same config again would not change them


def exit_code(status: str, user_error: bool = False) -> int:
    """The process exit code for a run's status (see the table above)."""
    if status == Status.ok:
        return EXIT_OK
    if user_error:
        return EXIT_USER_ERROR
    return EXIT_RESOURCE if status in RESOURCE_STATUSES else EXIT_FAILED


class UserError(Exception):
    """Bad input from the user: ends the run with its one-line message and exit code 2."""

    exit_status = EXIT_USER_ERROR


class ServiceDown(UserError):
    """A service the run needs (the Solar API) could not be reached: one line like a user error,
    but exit code 1 (the table above: a service down), since the input may well be right."""

    exit_status = EXIT_FAILED


class ConfigError(UserError):
    """A config value or combination that cannot work."""


class DataError(UserError):
    """A data file that is missing, unreadable or lacks a column."""


class WeightsNotFound(UserError):
    """A real model whose weights are not available locally."""


class OverBudget(Exception):
    """The measured peak memory passed measure.memory_budget_gb x measure.headroom."""

    def __init__(self, peak_bytes: int, limit_bytes: int):
        super().__init__(
            f"peak memory {peak_bytes / 2**30:.2f} GiB passed the budget x headroom {limit_bytes / 2**30:.2f} GiB"
        )
        self.peak_bytes = peak_bytes
        self.limit_bytes = limit_bytes


class Diverged(Exception):
    """The training loss became NaN or infinite."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped training; a checkpoint was saved to resume from."""

    def __init__(self, signum: int, step: int, checkpoint):
        import signal

        super().__init__(f"{signal.Signals(signum).name} at optimizer step {step}; checkpoint {checkpoint}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class ProcessesOutOfStep(Exception):
    """A collective of a several-process launch timed out or lost a peer: the processes are no longer
    in step, and no later collective of the launch can be trusted. The run's record is written
    first; a sweep stops here, its finished cells kept (sweep.resume=true goes on from them)."""


class AgreedFailure:
    """A failure every process of a launch raises together, after one collective told them all (an
    out-of-memory error or any error in one process's training step, summ/training/processes.py):
    the processes are still in step, and a sweep goes on to its next cell."""


class FailedOnAProcess(RuntimeError, AgreedFailure):
    """Another process of a launch (or this one) failed in a training step: every process ends the run with it."""
