"""chaintune: chained fine-tuning of causal LMs and measurement of what each stage makes the model forget."""
from __future__ import annotations

from chaintune.runtime import prepare_process

prepare_process()  # before torch is imported: its OpenMP runtime reads the wait policy once (chaintune.runtime)

from chaintune.engine import Outcome, run  # noqa: E402
from chaintune.errors import ChaintuneError, ConfigError, DataError, TrainingError  # noqa: E402
from chaintune.evaluate import EvalResult, evaluate, score_examples  # noqa: E402
from chaintune.models import default_model_dir, load_model, tiny_llama  # noqa: E402
from chaintune.tasks import Example, load_splits, load_task, register_task, register_user_task, task_names  # noqa: E402

__version__ = "0.1.0"

__all__ = ["run", "Outcome", "ChaintuneError", "ConfigError", "DataError", "EvalResult", "Example", "TrainingError", "default_model_dir",
           "evaluate", "load_model", "load_splits", "load_task", "register_task", "register_user_task",
           "score_examples", "task_names", "tiny_llama", "__version__"]
