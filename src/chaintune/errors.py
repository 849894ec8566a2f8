"""User-facing errors: one line naming the problem and the fix."""
from __future__ import annotations


class ChaintuneError(Exception):
    """An error caused by user input or environment; the CLI prints it as one line and exits with code 2."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} — {fix}" if fix else problem)


class DataError(ChaintuneError):
    """A data file or record is missing or malformed."""


class ConfigError(ChaintuneError):
    """An experiment config is invalid."""


class TrainingError(ChaintuneError):
    """Training diverged or cannot proceed (NaN loss, empty split, ...)."""
