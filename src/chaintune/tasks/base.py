"""Record schema, data-directory resolution and the task registry."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from chaintune.errors import ChaintuneError, DataError

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Example:
    """One multiple-choice question. `choices` are continuations of `prompt` and start with a space."""

    id: str
    prompt: str
    choices: tuple[str, ...]
    gold: int
    group: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["choices"] = list(self.choices)
        return record


Splits = dict[str, list[Example]]
"""Split name ('train', 'validation', 'test') → examples."""


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: `load(data_dir, seed)` returns every split available locally."""

    name: str
    kind: str  # "safety" | "capability" | "other"
    description: str
    load: Callable[[Path, int], Splits]
    hf_load: Callable[[int], Splits] | None = None
    group_field: str | None = None
    needs_data_dir: bool = True
    data_files: tuple[str, ...] = ()  # files/folders it reads: relative to the data dir, or absolute (user files)
    origin: str = ""  # what defined it (a user task's spec as JSON): re-registering the same origin is a no-op
    metrics: tuple[str, ...] = ()  # extra metrics it declares beyond accuracy, e.g. ("bbq_bias",)


_REGISTRY: dict[str, TaskSpec] = {}
_ALIASES: dict[str, str] = {}
_ON_REGISTER: list[Callable[[], None]] = []  # e.g. cache invalidation when a task is (re)registered


def builtin_task_names() -> set[str]:
    """Names and aliases of tasks that ship with chaintune (not user-registered)."""
    return {n for n, s in _REGISTRY.items() if s.needs_data_dir} | set(_ALIASES)


def register_task(
    name: str,
    *,
    kind: str = "other",
    description: str = "",
    group_field: str | None = None,
    hf_load: Callable[[int], Splits] | None = None,
    aliases: tuple[str, ...] = (),
    needs_data_dir: bool = True,
    data_files: tuple[str, ...] = (),
    origin: str = "",
    metrics: tuple[str, ...] = (),
) -> Callable[[Callable[[Path, int], Splits]], Callable[[Path, int], Splits]]:
    """Decorator registering `fn(data_dir, seed) -> {split: [Example]}` as task `name`.

    `data_files` lists the files and folders `fn` reads (relative to the data dir, or absolute): their SHA-256
    digests go into every run's environment.json (chaintune.provenance.data_file_hashes).
    """

    def decorate(fn: Callable[[Path, int], Splits]) -> Callable[[Path, int], Splits]:
        for listener in _ON_REGISTER:
            listener()
        _REGISTRY[name] = TaskSpec(name, kind, description or (fn.__doc__ or "").strip().split("\n")[0], fn,
                                   hf_load, group_field, needs_data_dir, tuple(data_files), origin, tuple(metrics))
        for alias in aliases:
            _ALIASES[alias] = name
        return fn

    return decorate


def registered_origin(name: str) -> str | None:
    """The origin string of a registered task, or None if no task of that name is registered."""
    spec = _REGISTRY.get(_ALIASES.get(name, name))
    return None if spec is None else spec.origin


def task_names() -> list[str]:
    return sorted(_REGISTRY)


def get_task(name: str) -> TaskSpec:
    """The registered task `name`; `lmeval:<task>` registers lm-eval's task on first use (chaintune.tasks.lmeval)."""
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY and name.startswith("lmeval:") and len(name) > len("lmeval:"):
        from chaintune.tasks.lmeval import register_lm_eval_prefixed

        register_lm_eval_prefixed(name)
    if key not in _REGISTRY:
        raise ChaintuneError(f"unknown task '{name}'",
                             f"choose one of: {', '.join(task_names())} (or register one with chaintune.tasks.register_task)")
    return _REGISTRY[key]


def canonical_task_name(name: str) -> str:
    return get_task(name).name


def default_data_dir() -> Path | None:
    """`$CHAINTUNE_DATA_DIR`, else `../shared/data` next to the working directory or the checkout, if present."""
    env = os.environ.get("CHAINTUNE_DATA_DIR")
    if env:
        if not Path(env).is_dir():
            raise DataError(f"CHAINTUNE_DATA_DIR='{env}' is not a directory", "fix or unset CHAINTUNE_DATA_DIR")
        return Path(env).resolve()
    checkout_root = Path(__file__).resolve().parents[3]
    for candidate in (Path.cwd() / ".." / "shared" / "data", checkout_root / ".." / "shared" / "data"):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The data directory to read from; None means none is configured (use the Hugging Face hub if online)."""
    if data_dir is None:
        return default_data_dir()
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataError(f"data directory '{path}' does not exist",
                        "pass --data-dir pointing at the folder that holds toxigen/, bbq/, arc/, cqa/, csqa2/ "
                        "(or set CHAINTUNE_DATA_DIR)")
    return path.resolve()


def require_file(path: Path, task: str) -> Path:
    if not path.is_file():
        raise DataError(f"task '{task}' needs the file '{path}', which does not exist",
                        "point --data-dir (or CHAINTUNE_DATA_DIR) at a folder laid out as ../shared/data/README.md describes")
    return path
