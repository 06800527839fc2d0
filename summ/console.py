"""What summ prints for people: a line on stdout or stderr that never fails the run."""

from __future__ import annotations

import argparse
import os
import sys


def say(text: str, err: bool = False) -> None:
    """Print for the user; a closed pipe (`| head`, a `| tee` killed by the same Ctrl-C) is not an error."""
    stream = sys.stderr if err else sys.stdout
    try:
        print(text, file=stream, flush=True)
    except (BrokenPipeError, OSError):  # later writes (and the flush at exit) go nowhere, quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        except (OSError, ValueError):
            pass


class OneLineParser(argparse.ArgumentParser):
    """The tools' argument parser: a bad option is one `error:` line naming --help, exit code 2
    (argparse's own prints its usage block first)."""

    def error(self, message: str):  # noqa: D102 (argparse's hook)
        say(f"error: {message}: {self.prog} --help lists the options", err=True)
        sys.exit(2)
