"""User-facing errors: one line naming the problem and the fix."""
from __future__ import annotations

import re

_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")  # what str.splitlines() splits on


def one_line(text: str) -> str:
    """`text` with every line break escaped (\\n, \\x1e, ...), so user data quoted in a message cannot split it, and
    every lone surrogate (text that is not valid Unicode) escaped, so the message can always be printed."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _LINE_BREAKS.sub(lambda m: repr(m.group())[1:-1], text)


class ChaintuneError(Exception):
    """An error caused by user input or environment; the CLI prints it as one line and exits with code 2."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = one_line(problem)
        self.fix = one_line(fix) if fix else fix
        super().__init__(f"{self.problem} — {self.fix}" if self.fix else self.problem)


def validation_problems(exc: Exception) -> list[tuple[str, str]]:
    """(location, message) of every error of a pydantic ValidationError: `training.lr`, `Input should be ...`;
    an unknown key reads "unknown key", and pydantic's "Value error, " prefix is dropped."""
    problems = []
    for err in exc.errors():  # type: ignore[attr-defined]
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        problems.append((loc, msg))
    return problems


class DataError(ChaintuneError):
    """A data file or record is missing or malformed."""


class ConfigError(ChaintuneError):
    """An experiment config is invalid."""


class TrainingError(ChaintuneError):
    """Training diverged or cannot proceed (NaN loss, empty split, ...)."""
