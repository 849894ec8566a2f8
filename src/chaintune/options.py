"""Command-line values checked before any work starts: numbers within the bounds of the config field they stand
for, a user JSONL/CSV file as `--task` (with the column mapping a config's custom_tasks take), and output files
that must be writable and outside the data. Imports nothing heavy, so `chaintune --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import math
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

from chaintune.errors import ChaintuneError

USER_FILE_SUFFIXES = (".jsonl", ".csv", ".jsonl.gz", ".csv.gz")
BOUND_SYMBOLS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}


def _checked(text: str, kind: type, bounds: dict[str, float]) -> int | float:
    """`text` as an int or a finite float within `bounds` ({"ge": 1, "le": 10}), else an argparse error."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not {'an integer' if kind is int else 'a number'}") from None
    inside = all({"ge": value >= b, "gt": value > b, "le": value <= b, "lt": value < b}[k] for k, b in bounds.items())
    if not (math.isfinite(value) and inside):
        allowed = " and ".join(f"{BOUND_SYMBOLS[k]} {int(v) if float(v).is_integer() else v}" for k, v in bounds.items())
        raise argparse.ArgumentTypeError(f"{text} is out of range (allowed: a finite number {allowed})")
    return value


def number(kind: type, **bounds: float) -> Callable[[str], int | float]:
    """An argparse `type`: an int or finite float within `bounds` (ge, gt, le, lt)."""
    def convert(text: str) -> int | float:
        return _checked(text, kind, bounds)

    convert.__name__ = kind.__name__
    return convert


def int_list(**bounds: float) -> Callable[[str], tuple[int, ...]]:
    """An argparse `type`: comma-separated integers, each within `bounds` (e.g. "3,5,10")."""
    def convert(text: str) -> tuple[int, ...]:
        parts = [p.strip() for p in text.split(",")]
        if not text.strip() or not all(parts):
            raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers (e.g. 3,5,10)")
        return tuple(int(_checked(p, int, bounds)) for p in parts)

    convert.__name__ = "int_list"
    return convert


def column_list(text: str) -> tuple[str, ...]:
    """An argparse `type`: comma-separated column names, none empty or repeated (e.g. "category,context_condition")."""
    parts = tuple(p.strip() for p in text.split(","))
    if not all(parts):
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of column names (e.g. "
                                         "category,context_condition)")
    if len(set(parts)) < len(parts):
        raise argparse.ArgumentTypeError(f"'{text}' names a column twice")
    return parts


_BYTE_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20,
               "gib": 2**30, "tib": 2**40}


def memory_size(text: str) -> float:
    """An argparse `type`: a memory size per device in bytes, from '80GiB', '80 GB', '40g' (GiB) or plain bytes;
    between 1 MiB and 1 TiB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?i?b?)\s*", text.lower())
    if not match or match.group(2) not in _BYTE_UNITS and match.group(2) not in ("k", "m", "g", "t"):
        raise argparse.ArgumentTypeError(f"'{text}' is not a memory size (e.g. 80GiB, 24GB, 40g)")
    unit = match.group(2) + ("ib" if match.group(2) in ("k", "m", "g", "t") else "")
    value = float(match.group(1)) * _BYTE_UNITS[unit]
    if not 2**20 <= value <= 2**40:
        raise argparse.ArgumentTypeError(f"{text} is out of range (allowed: 1MiB to 1TiB per device)")
    return value


def like_field(where: str) -> Callable[[str], int | float]:
    """An argparse `type` with the kind and bounds of a config field, e.g. "config:TaskSettings.eval_limit" — one
    range for `--limit` and `eval_limit:`. The model is looked up when a value is parsed, not for `--help`."""
    def convert(text: str) -> int | float:
        module, _, path = where.partition(":")
        owner, name = path.split(".")
        info = getattr(importlib.import_module(f"chaintune.{module}"), owner).model_fields[name]
        bounds = {k: getattr(m, k) for m in info.metadata for k in BOUND_SYMBOLS if getattr(m, k, None) is not None}
        return _checked(text, float if "float" in str(info.annotation) else int, bounds)

    convert.__name__ = where.rpartition(".")[2]
    return convert


# ------------------------------------------------------------------------------------------------ a file as --task
MAPPING = {"question": "question", "choices": "choices", "answer": "answer", "group": "group", "id": "id",
           "split_column": "split", "prompt_template": "prompt_template", "kind": "kind",
           "test_fraction": "test_fraction"}  # option dest → UserTaskSpec field


def add_file_task_options(parser: argparse.ArgumentParser) -> None:
    """The column mapping of a user file given as --task (the same keys as a config's custom_tasks entry)."""
    group = parser.add_argument_group("a JSONL/CSV file as --task (docs/tasks.md, 'Your own dataset')")
    group.add_argument("--question", metavar="COLUMN", help="column holding the question (default: question)")
    group.add_argument("--choices", metavar="COLUMN", action="append",
                       help="column holding the choices as a JSON list or 'a|b|c' (default: choices); repeat it to "
                            "name one column per choice")
    group.add_argument("--answer", metavar="COLUMN", help="column holding the answer: index, letter or choice text")
    group.add_argument("--group", metavar="COLUMN", help="column holding each question's group (optional)")
    group.add_argument("--id", metavar="COLUMN", help="column holding a unique id (default: the line number)")
    group.add_argument("--split-column", metavar="COLUMN",
                       help="column with train/validation/test (default: a seeded split, --test-fraction)")
    group.add_argument("--prompt-template", help="prompt around {question} (default: 'Question: {question}\\nAnswer:')")
    group.add_argument("--kind", choices=["safety", "capability", "other"], help="the task's kind (default: other)")
    group.add_argument("--test-fraction", type=like_field("tasks.user:UserTaskSpec.test_fraction"),
                       help="share of the records held out as the test split (default 0.2: round(n × 0.2))")


def is_file_task(task: str) -> bool:
    return task.endswith(USER_FILE_SUFFIXES)


def task_from_args(args: argparse.Namespace) -> str:
    """The task `--task` names: a registered task, or a user JSONL/CSV file registered under its file name."""
    from chaintune.tasks import builtin_task_names, canonical_task_name, register_user_task

    mapping = {field: getattr(args, dest) for dest, field in MAPPING.items() if getattr(args, dest) is not None}
    if not is_file_task(args.task):
        if mapping:
            raise ChaintuneError(f"--{next(iter(mapping)).replace('_', '-')} applies to a JSONL/CSV file as --task, "
                                 f"not to the task '{args.task}'", "drop the column options, or pass a file")
        return canonical_task_name(args.task)
    path = Path(args.task).expanduser()
    stem = path.name[:-len(next(s for s in USER_FILE_SUFFIXES if path.name.endswith(s)))]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", stem).lstrip("_.-")[:60] or "file"
    if name in builtin_task_names():
        name = f"{name}_file"
    choices = mapping.get("choices")
    if choices is not None:
        mapping["choices"] = choices[0] if len(choices) == 1 else choices
    return register_user_task({"name": name, "path": str(path.resolve())} | mapping)


# ------------------------------------------------------------------------------------------------ output files
def check_output_file(path: Path, data_dir: Path | None, data_files: tuple[str, ...], what: str) -> Path:
    """`path` can be written (its folder is created and probed) and lies outside the data: before any work."""
    from chaintune.io import probe_writable
    from chaintune.rundir import check_outside_data

    path = Path(path).expanduser()
    check_outside_data(path, data_dir, data_files, what=what, folder=False)
    if path.is_dir():
        raise ChaintuneError(f"{what} '{path}' is a folder", f"pass a file name, e.g. {path / 'result.json'}")
    probe_writable(path.parent, f"the folder of {what}", f"pass a writable {what} path")
    return path


def save_results(files: dict[Path, Callable[[Path], Any]]) -> list[Path]:
    """Write computed results (path → writer); if a path cannot be written after all, every file is saved in a
    new temporary folder instead and the error says where, so nothing computed is lost."""
    try:
        for path, write in files.items():
            write(path)
        return list(files)
    except (ChaintuneError, OSError) as exc:
        spare = Path(tempfile.mkdtemp(prefix="chaintune-results-"))
        for path, write in files.items():
            write(spare / path.name)
        problem = exc.problem if isinstance(exc, ChaintuneError) else f"cannot write ({exc})"
        raise ChaintuneError(f"{problem}; the results were saved to '{spare}' instead",
                             "copy them from there") from None
