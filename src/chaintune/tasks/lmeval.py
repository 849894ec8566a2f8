"""lm-evaluation-harness tasks as chaintune tasks: any lm-eval `multiple_choice` task, read through lm-eval's own
`TaskManager` and its `fewshot_context` (zero-shot: description + doc_to_text) / `doc_to_choice` / `doc_to_target`.

`lmeval:<task>` names one directly; a `custom_tasks` entry with an `lm_eval:` key (a task name or a task YAML file)
gives it a plain name, a kind and a group field. lm-eval is imported only when such a task is loaded or listed (it
takes seconds). Its data come from `datasets`: offline, from local files named in the task YAML (`dataset_path: json`
with `dataset_kwargs: {data_files: ...}`) or from the Hugging Face datasets cache.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from chaintune.errors import ConfigError, DataError
from chaintune.names import NAME_PATTERN
from chaintune.tasks.base import Example, Splits, register_task, registered_origin

PREFIX = "lmeval:"
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")  # dataset_path values that read local data_files
RESERVED = frozenset({"id", "group", "gold", "pred", "pred_norm", "correct", "correct_norm", "logliks", "stage",
                      "eval_task"})  # prediction columns: doc fields of these names are not kept as metadata
MAX_META_CHARS = 100  # a text field is kept as metadata only if every doc's value is at most this long
_FIX = "see `chaintune tasks --lm-eval` and docs/tasks.md ('lm-evaluation-harness tasks')"


class LmEvalTaskSpec(BaseModel):
    """A custom_tasks entry that points at an lm-eval task."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    lm_eval: str = Field(min_length=1)  # an lm-eval task name, or a task YAML file
    include_path: Path | None = None  # a folder of extra lm-eval task YAMLs
    kind: Literal["safety", "capability", "other"] = "other"
    group: str | None = Field(None, min_length=1)  # a doc field holding each question's group

    @property
    def yaml_file(self) -> Path | None:
        return Path(self.lm_eval) if self.lm_eval.endswith((".yaml", ".yml")) else None


def task_manager(include_path: str | os.PathLike | None = None, defaults: bool = True) -> Any:
    """lm-eval's TaskManager over its own task YAMLs (`defaults`) and those under `include_path`."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("lm-eval tasks need the lm-evaluation-harness package, which is not installed",
                          "pip install lm-eval (or chaintune[test])") from None
    return TaskManager(include_path=str(include_path) if include_path else None, include_defaults=defaults)


def multiple_choice_tasks(include_path: str | os.PathLike | None = None,
                          defaults: bool = True) -> list[dict[str, str]]:
    """[{task, data, config}] of every multiple-choice task lm-eval knows (`defaults`; indexing them takes 10 s or
    more) and those under `include_path`; `data` is "local files" for a task reading data_files, else the Hugging
    Face dataset it needs (from the datasets cache, when offline)."""
    rows = []
    for name, entry in sorted(task_manager(include_path, defaults).task_index.items()):
        cfg = entry.cfg or {}
        if cfg.get("output_type") != "multiple_choice" or not cfg.get("task"):
            continue
        dataset = str(cfg.get("dataset_path") or "")
        rows.append({"task": f"{PREFIX}{name}", "data": "local files" if dataset in LOCAL_BUILDERS else dataset,
                     "config": str(entry.yaml_path or "")})
    return rows


def load_lm_eval_task(spec: LmEvalTaskSpec) -> Any:
    """lm-eval's task object (a ConfigurableTask) with its data loaded; one-line errors for anything unusable."""
    yaml_file = spec.yaml_file
    if yaml_file is not None and not yaml_file.is_file():
        raise DataError(f"task '{spec.name}': lm-eval task config '{yaml_file}' does not exist", _FIX)
    manager = task_manager(spec.include_path, defaults=yaml_file is None)
    target = str(yaml_file.resolve()) if yaml_file else spec.lm_eval
    if yaml_file is None and spec.lm_eval not in manager.task_index:
        raise DataError(f"task '{spec.name}': lm-eval knows no task '{spec.lm_eval}'", _FIX)
    try:
        tasks = manager.load([target])["tasks"]
    except Exception as exc:  # datasets and lm-eval raise many kinds (offline, missing files, bad YAML)
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise DataError(f"task '{spec.name}': lm-eval could not load '{spec.lm_eval}' ({type(exc).__name__}: "
                        f"{first})", "offline, point the task YAML at local files (dataset_path: json and "
                        "dataset_kwargs: data_files) or fill the Hugging Face datasets cache") from None
    if len(tasks) != 1:
        raise DataError(f"task '{spec.name}': '{spec.lm_eval}' is a group of {len(tasks)} lm-eval tasks",
                        f"name one of them: {', '.join(sorted(tasks)[:8])}")
    task = next(iter(tasks.values()))
    if task.OUTPUT_TYPE != "multiple_choice" or task.multiple_input:
        what = "several contexts per question" if task.multiple_input else f"output_type {task.OUTPUT_TYPE}"
        raise DataError(f"task '{spec.name}': lm-eval task '{spec.lm_eval}' has {what}",
                        "use a multiple_choice task whose choices continue one context")
    return task


def _gold(target: Any, choices: list[str], where: str) -> int:
    if isinstance(target, str) and target in choices:
        return choices.index(target)
    if isinstance(target, int) and not isinstance(target, bool) and 0 <= target < len(choices):
        return target
    raise DataError(f"{where}: doc_to_target gives {str(target)[:80]!r}, not a choice or a choice index",
                    "use a task with one correct choice per question")


def _metadata_fields(docs: list[dict[str, Any]]) -> list[str]:
    """Doc fields kept with every prediction: those whose every value is a number, a boolean or a short text."""
    def scalar(v: Any) -> bool:
        return isinstance(v, (int, float, bool)) or (isinstance(v, str) and len(v) <= MAX_META_CHARS)

    fields = set(docs[0]) if docs else set()
    return sorted(f for f in fields - RESERVED if all(f in d and scalar(d[f]) for d in docs))


def task_examples(task: Any, spec: LmEvalTaskSpec) -> Splits:
    """test = the docs lm-eval evaluates (its test split, else its validation split), validation = the validation
    docs when a test split exists, train = the training docs; train/validation questions that also occur in test
    are dropped (chaintune.tasks.builtin.without_test_duplicates)."""
    from chaintune.tasks.builtin import without_test_duplicates

    sources = {"test": task.test_docs() if task.has_test_docs() else task.validation_docs()}
    if task.has_test_docs() and task.has_validation_docs():
        sources["validation"] = task.validation_docs()
    if task.has_training_docs():
        sources["train"] = task.training_docs()
    delimiter = task.config.target_delimiter
    splits: Splits = {}
    for split, docs in sources.items():
        docs = list(docs)
        fields = _metadata_fields(docs)
        examples = []
        for i, doc in enumerate(docs):
            where = f"lm-eval task '{spec.lm_eval}', {split} doc {i}"
            choices = [str(c) for c in task.doc_to_choice(doc)]
            group = None
            if spec.group is not None:
                if doc.get(spec.group) is None or isinstance(doc[spec.group], (list, dict)):
                    raise DataError(f"{where}: no scalar field '{spec.group}' for the group",
                                    f"name one of the docs' fields: {', '.join(sorted(doc))}")
                group = str(doc[spec.group])
            examples.append(Example(id=f"{spec.name}-{split}-{i}", prompt=task.fewshot_context(doc, 0),
                                    choices=tuple(f"{delimiter}{c}" for c in choices),
                                    gold=_gold(task.doc_to_target(doc), choices, where), group=group,
                                    meta={f: doc[f] for f in fields}))
        splits[split] = examples
    return without_test_duplicates(splits)


def register_lm_eval_prefixed(name: str) -> None:
    """Register `lmeval:<task>` (a name outside NAME_PATTERN: its spec is built unvalidated, kind other, no group)."""
    register_lm_eval_task(LmEvalTaskSpec.model_construct(name=name, lm_eval=name[len(PREFIX):], include_path=None,
                                                         kind="other", group=None))


def register_lm_eval_task(spec: LmEvalTaskSpec) -> str:
    """Register an lm-eval task (lm-eval is imported when it is first loaded); returns its name."""
    origin = spec.model_dump_json()
    if registered_origin(spec.name) == origin:
        return spec.name

    def load(data_dir: Path, seed: int) -> Splits:
        return task_examples(load_lm_eval_task(spec), spec)

    files = (str(spec.yaml_file.resolve()),) if spec.yaml_file else ()
    register_task(spec.name, kind=spec.kind, description=f"lm-eval task {spec.lm_eval}", group_field=spec.group,
                  needs_data_dir=False, data_files=files, origin=origin)(load)
    return spec.name
