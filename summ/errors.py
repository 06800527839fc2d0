"""Errors a user can cause and fix. Each carries one line that says what to change."""


class UserError(Exception):
    """Bad input from the user: ends the run with its one-line message and exit code 2."""


class ConfigError(UserError):
    """A config value or combination that cannot work."""


class DataError(UserError):
    """A data file that is missing, unreadable or lacks a column."""


class WeightsNotFound(UserError):
    """A real model whose weights are not available locally."""


class OverBudget(Exception):
    """The measured peak memory passed measure.memory_budget_gb x measure.headroom."""

    def __init__(self, peak_bytes: int, limit_bytes: int):
        super().__init__(f"peak memory {peak_bytes / 2**30:.2f} GiB passed the budget x headroom "
                         f"{limit_bytes / 2**30:.2f} GiB")
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
