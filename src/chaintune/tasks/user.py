"""User multiple-choice datasets (JSONL or CSV) with a column mapping, registered like any built-in task."""
from __future__ import annotations

import json
import logging
import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from chaintune.errors import ConfigError, DataError, validation_problems
from chaintune.io import file_sha256
from chaintune.names import NAME_PATTERN
from chaintune.tasks.base import Example, Splits, builtin_task_names, register_task, registered_origin
from chaintune.tasks.readers import read_csv, read_jsonl
from chaintune.tasks.splits import n_test, subsample

log = logging.getLogger(__name__)


Column = Annotated[str, Field(min_length=1)]  # a column name of the user's file


class UserTaskSpec(BaseModel):
    """Where a user dataset lives and which columns hold what."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    path: Path
    kind: Literal["safety", "capability", "other"] = "other"
    prompt_template: str = "Question: {question}\nAnswer:"
    question: Column = "question"
    choices: Column | list[Column] = "choices"
    answer: Column = "answer"
    group: Column | None = None
    id: Column | None = None
    split: Column | None = None  # column whose values are train/validation/test; else a seeded split:
    test_fraction: float = Field(0.2, gt=0, lt=1)  # round(n × test_fraction) records, stratified by (group, answer)

    @field_validator("prompt_template")
    @classmethod
    def _has_question(cls, v: str) -> str:
        try:
            fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(v) if name is not None]
        except ValueError as exc:
            raise ValueError(f"prompt_template is not a valid template ({exc}); write {{{{ and }}}} for literal "
                             "braces") from None
        if not fields or any(f != ("question", "", None) for f in fields):
            raise ValueError("prompt_template must contain {question} and no other {field} (write {{ and }} for "
                             "literal braces)")
        return v


def _cell(row: dict[str, Any], column: str, where: str) -> Any:
    if column not in row or row[column] is None:
        raise DataError(f"{where}: missing column '{column}'", "add it or map another column in the task spec")
    return row[column]


def _text(row: dict[str, Any], column: str, where: str, what: str) -> str:
    """A non-empty string or number cell as text (a list, object or boolean there is an error)."""
    value = _cell(row, column, where)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: the {what} (column '{column}') is a {type(value).__name__}",
                        "store text or a number there")
    text = str(value)
    if not text.strip():
        raise DataError(f"{where}: the {what} is empty", "fix or delete that record")
    return text


def _choices(row: dict[str, Any], spec: UserTaskSpec, where: str) -> list[str]:
    if isinstance(spec.choices, list):
        raw = [_cell(row, c, where) for c in spec.choices]
    else:
        raw = _cell(row, spec.choices, where)
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except (ValueError, RecursionError):  # not JSON (or absurdly nested / huge numbers): 'a|b|c'
                raw = raw.split("|")
    if not isinstance(raw, list) or len(raw) < 2 or not all(
            isinstance(c, (str, int, float)) and not isinstance(c, bool) for c in raw):
        raise DataError(f"{where}: choices must be a list of at least 2 strings",
                        "store them as a JSON list, 'a|b|c', or map several columns")
    choices = [str(c).strip() for c in raw]
    if not all(choices):
        raise DataError(f"{where}: a choice is empty", "remove empty choices")
    return choices


def _gold(value: Any, choices: list[str], where: str) -> int:
    """Answer as an index (int, or digits not among the choices), the exact choice text, or a letter A, B, ..."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: answer {str(value)[:80]} is a {type(value).__name__}",
                        "give the index, the letter or the text of the answer")
    text = str(value).strip()
    if isinstance(value, int) or (re.fullmatch(r"-?[0-9]+", text) and text not in choices):
        idx = int(text)
    elif text in choices:
        idx = choices.index(text)
    elif len(text) == 1 and text.isascii() and text.isalpha():
        idx = ord(text.upper()) - ord("A")
    else:
        raise DataError(f"{where}: answer '{text[:80]}' is not an index, a letter or one of the choices", "fix that record")
    if not 0 <= idx < len(choices):
        raise DataError(f"{where}: answer index {idx} is out of range for {len(choices)} choices", "fix that record")
    return idx


def load_user_examples(spec: UserTaskSpec) -> list[Example]:
    """Parse every record of the user file into Examples; malformed records are errors naming file and line."""
    path = spec.path
    if not path.is_file():
        raise DataError(f"task '{spec.name}': file '{path}' does not exist", "fix 'path' in the task spec")
    fmt = "csv" if path.name.endswith((".csv", ".csv.gz")) else "jsonl"
    rows = read_csv(path) if fmt == "csv" else read_jsonl(path)
    examples, ids = [], set()
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        question = _text(row, spec.question, where, "question")
        choices = _choices(row, spec, where)
        gold = _gold(_cell(row, spec.answer, where), choices, where)
        rid = _text(row, spec.id, where, "id") if spec.id else str(lineno)
        if rid in ids:
            raise DataError(f"{where}: duplicate id '{rid[:80]}'", "make ids unique or drop the 'id' mapping")
        ids.add(rid)
        group = _text(row, spec.group, where, "group") if spec.group else None
        meta = {"split": _text(row, spec.split, where, "split").strip().lower()} if spec.split else {}
        examples.append(Example(id=f"{spec.name}-{rid}", prompt=spec.prompt_template.format(question=question),
                                choices=tuple(f" {c}" for c in choices), gold=gold, group=group, meta=meta))
    if not examples:
        raise DataError(f"task '{spec.name}': '{path}' holds no records", "check the file")
    return examples


def _drop_exact_duplicates(examples: list[Example], spec: UserTaskSpec) -> list[Example]:
    """One example per (question, choices): an exact repeat is dropped and counted in a warning; a repeat with
    another answer or group is an error."""
    kept: dict[tuple, Example] = {}
    for ex in examples:
        first = kept.setdefault((ex.prompt, ex.choices), ex)
        if (first.gold, first.group) != (ex.gold, ex.group):
            raise DataError(f"{spec.path}: records {first.id} and {ex.id} have the same question and choices but a "
                            "different answer or group", "fix or delete one of them")
    if len(kept) < len(examples):
        log.warning("task '%s': dropped %d records of %s that repeat an earlier record (same question, choices and "
                    "answer)", spec.name, len(examples) - len(kept), spec.path)
    return list(kept.values())


def split_user_examples(examples: list[Example], spec: UserTaskSpec, seed: int) -> Splits:
    if spec.split:
        splits: Splits = {}
        for ex in examples:
            if ex.meta["split"] not in ("train", "validation", "test"):
                raise DataError(f"task '{spec.name}': split value '{ex.meta['split']}' of {ex.id}",
                                "use train, validation or test")
            splits.setdefault(ex.meta["split"], []).append(ex)
        return splits
    unique = _drop_exact_duplicates(examples, spec)
    test = subsample(unique, n_test(len(unique), spec.test_fraction), seed, group=lambda e: (e.group, e.gold),
                     salt=spec.name)  # exactly round(n·f) over all strata, even when each stratum is small
    held = {id(e) for e in test}
    return {"train": [e for e in unique if id(e) not in held], "test": test}


def parse_user_task(spec: UserTaskSpec | dict[str, Any]) -> UserTaskSpec:
    """Validate a user task spec (a config's custom_tasks entry) without registering it."""
    try:
        return spec if isinstance(spec, UserTaskSpec) else UserTaskSpec.model_validate(spec)
    except ValidationError as exc:
        name = spec.get("name") if isinstance(spec, dict) else None
        problems = "; ".join(f"{loc}: {msg}" for loc, msg in validation_problems(exc))
        raise ConfigError(f"user task {str(name)[:64]!r}: {problems}" if name else f"user task: {problems}",
                          "fix the task spec (see docs/tasks.md, 'Your own dataset')") from None


def register_user_task(spec: UserTaskSpec | dict[str, Any]) -> str:
    """Register a user MCQ dataset as a task; returns its name. Registering the same spec for the same file content
    again changes nothing (its cached splits stay valid)."""
    spec = parse_user_task(spec)
    if spec.name in builtin_task_names():
        raise ConfigError(f"user task name '{spec.name}' is taken by a built-in task", "choose another name")
    try:  # the file's content is part of what defines the task: an edited file is registered afresh
        origin = f"{spec.model_dump_json()} sha256:{file_sha256(spec.path)}"
    except OSError:
        origin = spec.model_dump_json()  # unreadable: loading it reports the problem
    if registered_origin(spec.name) == origin:
        return spec.name

    def load(data_dir: Path, seed: int) -> Splits:
        return split_user_examples(load_user_examples(spec), spec, seed)

    register_task(spec.name, kind=spec.kind, description=f"user dataset {spec.path}", group_field=spec.group,
                  needs_data_dir=False, data_files=(str(spec.path.resolve()),), origin=origin)(load)
    return spec.name


def register_user_tasks(specs: list[dict[str, Any]]) -> None:
    """Register a validated config's `custom_tasks` (the engine, plan, verify and eval do this explicitly)."""
    for spec in specs:
        register_user_task(spec)
