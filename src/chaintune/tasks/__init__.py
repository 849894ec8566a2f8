"""Task registry: every task yields `Example` records split into train / (validation) / test (SPEC.md §2).

>>> from chaintune.tasks import load_task
>>> test = load_task("toxigenqa", "test", limit=200)
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

from chaintune.errors import ChaintuneError, DataError
from chaintune.hub import require_hub
from chaintune.tasks import builtin as _builtin  # noqa: F401  (registers the built-in tasks)
from chaintune.tasks.base import (_ON_REGISTER, SPLITS, Example, Splits, TaskSpec, builtin_task_names, canonical_task_name,
                                  default_data_dir, get_task, register_task, resolve_data_dir, task_names)
from chaintune.tasks.splits import subsample
from chaintune.tasks.user import UserTaskSpec, parse_user_task, register_user_task, register_user_tasks

__all__ = ["Example", "Splits", "TaskSpec", "SPLITS", "UserTaskSpec", "builtin_task_names", "canonical_task_name",
           "default_data_dir", "get_task", "load_splits", "load_task", "parse_user_task", "register_task",
           "register_user_task", "register_user_tasks", "resolve_data_dir", "task_names"]


@functools.lru_cache(maxsize=32)
def _load_splits_cached(name: str, data_dir: Path | None, seed: int) -> Splits:
    spec = get_task(name)
    if data_dir is not None or not spec.needs_data_dir:
        return spec.load(data_dir or Path("."), seed)
    fix = "pass --data-dir, set CHAINTUNE_DATA_DIR, or place the data in ../shared/data"
    if spec.hf_load is None:
        raise DataError(f"task '{name}' needs a data directory and none was found", fix)
    require_hub(f"task '{name}' without a data directory", fix)
    try:
        return spec.hf_load(seed)
    except Exception as exc:  # network errors surface from many libraries
        raise DataError(f"task '{name}': no data directory and the Hugging Face dataset could not be loaded "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                        "pass --data-dir or set CHAINTUNE_DATA_DIR") from None


_ON_REGISTER.append(_load_splits_cached.cache_clear)


def _tasks_with_split(kind: str, split: str, data_dir: str | os.PathLike | None, exclude: str) -> list[str]:
    found = []
    for name in task_names():
        if name != exclude and get_task(name).kind == kind:
            try:
                if split in load_splits(name, data_dir):
                    found.append(name)
            except ChaintuneError:
                pass
    return found


def load_splits(name: str, data_dir: str | os.PathLike | None = None, seed: int = 0) -> Splits:
    """All splits of a task that are available (split name → examples); `seed` fixes the train/test split."""
    spec = get_task(name)
    cached = _load_splits_cached(spec.name, resolve_data_dir(data_dir) if spec.needs_data_dir else None, seed)
    return {split: list(examples) for split, examples in cached.items()}


def load_task(name: str, split: str = "test", data_dir: str | os.PathLike | None = None, limit: int | None = None,
              seed: int = 0, split_seed: int = 0) -> list[Example]:
    """Examples of one split; `limit` subsamples deterministically (seeded by `seed`, stratified by group)."""
    if split not in SPLITS:
        raise ChaintuneError(f"unknown split '{split}'", f"use one of {', '.join(SPLITS)}")
    splits = load_splits(name, data_dir, split_seed)
    if split not in splits:
        have = ", ".join(sorted(splits)) or "none"
        spec = get_task(name)
        alternatives = ", ".join(_tasks_with_split(spec.kind, split, data_dir, spec.name)) or "none here"
        raise DataError(f"task '{name}' has no '{split}' split here (available: {have})",
                        f"use a {spec.kind} task that has one ({alternatives}) or add the file "
                        "(see ../shared/data/README.md)")
    examples = splits[split]
    if not examples:
        raise DataError(f"task '{name}': the '{split}' split is empty", "check the data files")
    if limit is not None and limit < 1:
        raise ChaintuneError(f"limit must be a positive number, got {limit}", "pass --limit 1 or more")
    return subsample(examples, limit, seed, group=lambda e: e.group, salt=f"{get_task(name).name}/{split}")
