"""chaintune: chained fine-tuning of causal LMs and measurement of what each stage makes the model forget.

The public names below are imported on first use (PEP 562), so `chaintune --help` and `chaintune tasks` start
without loading torch, transformers or scipy.
"""
from __future__ import annotations

import importlib
from typing import Any

from chaintune.runtime import prepare_process

prepare_process()  # before torch is imported: its OpenMP runtime reads the wait policy once (chaintune.runtime)

from chaintune.errors import ChaintuneError, ConfigError, DataError, TrainingError  # noqa: E402

__version__ = "0.1.0"

_LAZY = {"run": "engine", "Outcome": "engine", "EvalResult": "evaluate", "evaluate": "evaluate",
         "score_examples": "evaluate", "default_model_dir": "models", "load_model": "models", "tiny_llama": "models",
         "Example": "tasks", "load_splits": "tasks", "load_task": "tasks", "register_task": "tasks",
         "register_user_task": "tasks", "task_names": "tasks"}

__all__ = ["run", "Outcome", "ChaintuneError", "ConfigError", "DataError", "EvalResult", "Example", "TrainingError",
           "default_model_dir", "evaluate", "load_model", "load_splits", "load_task", "register_task",
           "register_user_task", "score_examples", "task_names", "tiny_llama", "__version__"]


def __getattr__(name: str) -> Any:
    """A public name from its module, or a submodule (`chaintune.rundir`), imported when first asked for."""
    if name in _LAZY:
        return getattr(importlib.import_module(f"chaintune.{_LAZY[name]}"), name)
    try:
        return importlib.import_module(f"chaintune.{name}")
    except ModuleNotFoundError:
        raise AttributeError(f"module 'chaintune' has no attribute '{name}'") from None
