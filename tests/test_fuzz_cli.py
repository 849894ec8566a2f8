"""Property tests of the CLI's error boundary (issue 19): random bad values at every option of every command, and at
every field of an experiment config (through `--set`), end in exit code 2 and one line on stderr — no traceback, and
no work started. The options and fields are read from the parser and the config schema, so a new one is covered (or
this file says it lacks a strategy)."""
from __future__ import annotations

import argparse
import json
import math
import re
import types
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from chaintune.cli import build_parser, main
from chaintune.config import Chain, ExperimentConfig, Stage, TaskSettings, TrainingConfig
from chaintune.names import NAME_PATTERN
from chaintune.options import column_list
from chaintune.plan import load_sweep
from chaintune.tasks import builtin_task_names, task_names
from chaintune.tasks.user import UserTaskSpec

SETTINGS = settings(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
NOT_FUZZED = {("run", "--address"): "handed to ray.init (Ray's own errors); covered by tests/test_sweep.py"}
NOT_FUZZED_FIELDS = {"executor.address": NOT_FUZZED[("run", "--address")]}
COLUMNS = {"question", "choices", "answer", "grp"}  # the columns of the mcq files
CUSTOM = {"mcq_a", "mcq_b"}


def commands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def value_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every argument that takes a value: options (not flags, not --help) and positionals."""
    return [a for a in parser._actions if a.nargs != 0 and not isinstance(a, argparse._HelpAction)]


def typed(action: argparse.Action) -> bool:
    return action.type is not None and action.type is not str


def expect_one_line(capsys, argv: list[str]) -> str:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("chaintune: error:"), (argv, code, err, out[-800:])
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------------------------- CLI options
def test_every_numeric_option_is_range_checked():
    """Each option with a numeric type refuses ±10¹³ and NaN: none is checked for its type alone. (`--group-by`'s
    column list is text; its bad values are drawn by the next test.)"""
    for name, parser in commands().items():
        for action in (a for a in value_actions(parser) if typed(a) and a.type is not column_list):
            for text in ("-10000000000000", "10000000000000", "-1e13", "1e13", "nan"):
                with pytest.raises(argparse.ArgumentTypeError):
                    action.type(text)


RAW = st.one_of(st.integers(-10**15, 10**15).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                st.text(max_size=12), st.sampled_from(["", "-0", "1e999", "0x10", "1_0", " 3", "½", "NaN", "-inf"]))


@settings(SETTINGS, max_examples=150)
@given(data=st.data())
@pytest.mark.timeout(120)
def test_bad_typed_or_choice_values_are_one_line(capsys, data):
    """Numbers out of range or not numbers, and values outside an option's choices, on every command."""
    cases = [(name, a) for name, p in commands().items() for a in value_actions(p) if typed(a) or a.choices]
    name, action = data.draw(st.sampled_from(cases), label="option")
    raw = data.draw(RAW, label="value")
    if typed(action):
        try:
            action.type(raw)
            assume(False)  # a valid value: not what this test is about
        except argparse.ArgumentTypeError:
            pass
    else:
        assume(raw not in action.choices)
    required = {"eval": ["--task", "t"], "curvature": ["--task", "t"], "run": ["c.yaml"], "plan": ["c.yaml"],
                "summarize": ["r"], "report": ["r"], "power": ["r"], "verify": ["r"], "tasks": [],
                "export": ["r", "--run", "x", "--out", "o"]}[name]
    expect_one_line(capsys, [name, *required, action.option_strings[0], raw] if action.option_strings else [name, raw])


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, mcq_data_dir, mcq_config) -> dict[str, Path]:
    """Paths the string options are tried against: a user file, the tiny model, a plain file and folder, and a
    valid experiment config."""
    root = tmp_path_factory.mktemp("fuzz-cli")
    (root / "file").write_text("not a folder")
    (root / "folder").mkdir()
    config = root / "c.yaml"
    config.write_text(yaml.safe_dump(base_config(mcq_config, root / "out")))
    load_sweep(config)  # the base is valid: each failure below comes from the one bad value
    return {"root": root, "task": mcq_data_dir / "mcq_a.jsonl", "model": tiny_model_dir, "config": config,
            "data": mcq_data_dir}


def missing_paths(root: Path) -> st.SearchStrategy[str]:
    """Paths under `root/missing/` that do not exist (one component, never '.' or '..')."""
    return st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00/"), min_size=1,
                   max_size=20).filter(lambda t: t not in (".", "..")).map(lambda t: str(root / "missing" / t))


def bad_device(text: str) -> bool:
    from chaintune.errors import ChaintuneError
    from chaintune.models import pick_device

    try:
        pick_device(text)
    except ChaintuneError:
        return True
    return False


def bad_template(text: str) -> bool:
    try:
        UserTaskSpec(name="t", path="p", prompt_template=text)
    except ValueError:
        return True
    return False


def string_strategies(w: dict[str, Path]) -> dict[str, st.SearchStrategy[str]]:
    """Bad values of every option or positional that takes free text, by its dest."""
    root, columns = w["root"], st.text(max_size=15).filter(lambda t: t not in COLUMNS)
    names = st.text(max_size=20).filter(lambda t: t not in set(task_names()) | builtin_task_names()
                                        and not t.endswith((".jsonl", ".csv")) and not t.startswith("lmeval:"))
    return {
        "model": missing_paths(root) | st.from_regex(r"[a-z]{1,8}/[a-z]{1,8}", fullmatch=True)
        | st.just(str(root / "folder")),
        "task": names | missing_paths(root).map(lambda p: p + ".jsonl"),
        "adapter": missing_paths(root) | st.just(str(root / "folder")),
        "device": st.text(max_size=12).filter(bad_device),
        "data_dir": missing_paths(root) | st.just(str(root / "file")),
        "output": st.sampled_from([str(root / "folder"), str(root / "file" / "x.json")])
        | missing_paths(root / "file"),
        "question": columns, "answer": columns, "group": columns, "id": columns, "split_column": columns,
        "choices": columns, "prompt_template": st.text(max_size=30).filter(bad_template),
        "config": missing_paths(root) | st.just(str(root / "folder")) | st.just(str(root / "file")),
        "run_dir": missing_paths(root) | st.just(str(root / "folder")) | st.just(str(root / "file")),
        "set": st.text(max_size=30).filter(lambda t: t.partition("=")[0].split(".")[0]
                                           not in ExperimentConfig.model_fields),
        "out": st.sampled_from([str(root / "r.html"), str(root / "r.md"), str(root / "file")]),
        "include": missing_paths(root) | st.just(str(root / "file")),
        "stage": st.text(max_size=20), "run": st.text(max_size=20),
    }


def test_every_text_option_has_a_strategy(world):
    known = string_strategies(world)
    for name, parser in commands().items():
        for action in value_actions(parser):
            option = action.option_strings[0] if action.option_strings else action.dest
            if not (typed(action) or action.choices or (name, option) in NOT_FUZZED):
                assert action.dest in known, f"`chaintune {name} {option}` has no bad-value strategy"


@settings(SETTINGS, max_examples=120)
@given(data=st.data())
@pytest.mark.timeout(180)
def test_bad_text_values_are_one_line(capsys, world, monkeypatch, data):
    """Every free-text option and positional, on otherwise valid arguments: the bad value alone fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id fails at once, whatever the network
    strategies = string_strategies(world)
    w = world
    valid = {"eval": ["--task", str(w["task"]), "--model", str(w["model"]), "--output", str(w["root"] / "e.json")],
             "curvature": ["--task", str(w["task"]), "--model", str(w["model"]), "--examples", "2"],
             "run": [str(w["config"])], "plan": [str(w["config"])], "summarize": [str(w["root"] / "no-run")],
             "report": [str(w["root"] / "no-run")], "power": [str(w["root"] / "no-run")],
             "verify": [str(w["root"] / "no-run")], "tasks": [],
             "export": [str(w["root"] / "no-run"), "--run", "r", "--out", str(w["root"] / "export")]}
    cases = [(name, a) for name, p in commands().items() for a in value_actions(p)
             if not typed(a) and not a.choices and a.dest in strategies]
    name, action = data.draw(st.sampled_from(cases), label="option")
    value = data.draw(strategies[action.dest], label="value")
    argv = [*valid[name], action.option_strings[0], value] if action.option_strings else [value]
    line = expect_one_line(capsys, [name, *argv])
    assert not (w["root"] / "out" / "stages").exists(), line


# --------------------------------------------------------------------------------------------- config fields
def base_config(mcq_config, out: Path) -> dict:
    """A valid experiment that touches every section: two stages, replay, curvature, limits, two user tasks."""
    cfg = mcq_config(out)
    cfg["chains"][0]["stages"][1]["replay"] = {"task": "mcq_a", "fraction": 0.1}
    cfg["curvature"] = {"after": ["first"], "examples": 2}
    return cfg


def _plain(annotation) -> tuple[list, bool]:
    """The annotation's member types without None, and whether None is allowed."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    return [a for a in args if a is not type(None)], type(None) in args


def _model(annotation) -> type[BaseModel] | None:
    members, _ = _plain(annotation)
    return members[0] if len(members) == 1 and isinstance(members[0], type) and issubclass(members[0], BaseModel) \
        else None


def leaves(model: type[BaseModel], prefix: str) -> list[tuple[str, object]]:
    """(dotted path, FieldInfo) of every field below `model`; list items and mappings at index 0 / task mcq_a."""
    found = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        found.append((path, info))
        nested = _model(info.annotation)
        if nested is not None:
            found += leaves(nested, f"{path}.")
        elif name == "chains":
            found += leaves(Chain, f"{path}.0.")
        elif name == "stages":  # a stage's own keys and its training overrides
            found += leaves(Stage, f"{path}.1.") + leaves(TrainingConfig, f"{path}.1.")
        elif name == "custom_tasks":
            found += leaves(UserTaskSpec, f"{path}.0.")
        elif name == "tasks":
            found += leaves(TaskSettings, f"{path}.mcq_a.")
    return found


BOUND_NAMES = ("ge", "gt", "le", "lt")


def bounds(info) -> dict[str, float]:
    return {k: getattr(m, k) for m in info.metadata for k in BOUND_NAMES if getattr(m, k, None) is not None}


def out_of_range(kind: type, b: dict[str, float]) -> st.SearchStrategy:
    if kind is int:
        parts = {"ge": lambda v: st.integers(max_value=math.ceil(v) - 1), "gt": lambda v: st.integers(max_value=math.floor(v)),
                 "le": lambda v: st.integers(min_value=math.floor(v) + 1), "lt": lambda v: st.integers(min_value=math.ceil(v))}
        return st.one_of([parts[k](v) for k, v in b.items()])
    finite = {"allow_nan": False, "allow_infinity": False}
    parts = {"ge": lambda v: st.floats(max_value=v, exclude_max=True, **finite),
             "gt": lambda v: st.floats(max_value=v, **finite),
             "le": lambda v: st.floats(min_value=v, exclude_min=True, **finite),
             "lt": lambda v: st.floats(min_value=v, **finite)}
    return st.one_of([parts[k](v) for k, v in b.items()] + [st.sampled_from([math.nan, math.inf, -math.inf])])


def names_not(pattern: str, *taken: str) -> st.SearchStrategy[str]:
    return st.text(max_size=70).filter(lambda t: not re.fullmatch(pattern, t) or t in taken)


def unknown_tasks() -> st.SearchStrategy[list]:
    unknown = st.text(min_size=1, max_size=15).filter(lambda t: t not in task_names() and t not in CUSTOM)
    return st.lists(unknown, min_size=1, max_size=2) | st.sampled_from(["mcq_a", 3, {"a": 1}])


def special(root: Path) -> dict[str, st.SearchStrategy]:
    """Fields whose bad values the schema cannot tell: paths, devices, task names, columns, sweeps."""
    columns = st.text(max_size=15).filter(lambda t: t not in COLUMNS) | st.sampled_from([3, ["x"]])
    return {
        "model": missing_paths(root) | st.from_regex(r"[a-z]{1,8}/[a-z]{1,8}", fullmatch=True),
        "data_dir": missing_paths(root) | st.just(str(root / "file")),
        "output_dir": missing_paths(root / "file"),
        "device": st.text(max_size=12).filter(bad_device),
        "name": names_not(NAME_PATTERN), "chains.0.name": names_not(NAME_PATTERN),
        "chains.0.stages.1.name": names_not(NAME_PATTERN),
        "chains.0.stages.1.task": unknown_tasks().map(lambda v: v[0] if isinstance(v, list) else v).filter(
            lambda v: v != "mcq_a"),
        "chains.0.stages.1.replay.task": st.text(max_size=15).filter(lambda t: t not in task_names() and t not in CUSTOM),
        "chains.0.stages.1.replay": st.sampled_from([{"task": "mcq_a"}, {"fraction": 0.1}, 5]),
        "chains.0.eval_tasks": unknown_tasks(), "eval_tasks": unknown_tasks(),
        "chains.0.seeds": st.lists(st.integers(1, 10**12), min_size=1, max_size=2) | st.sampled_from([[-1], "x"]),
        "chains.0.stages": st.sampled_from([[], "x", [{"lr": 1e-3}]]), "chains": st.sampled_from([[], "x"]),
        "seeds": st.sampled_from([[], [0, 0], [-1], [2**32], "x", [True]]),
        "curvature.after": st.lists(st.text(min_size=1, max_size=10).filter(
            lambda t: t not in ("first", "all") and t not in CUSTOM), min_size=1, max_size=2),
        "custom_tasks": st.sampled_from([[{"name": "x"}], "x", [{"name": "bbq", "path": "p.jsonl"}]]),
        "custom_tasks.0.name": st.text(max_size=20).filter(lambda t: t != "mcq_a"),
        "custom_tasks.0.path": missing_paths(root).map(lambda p: p + ".jsonl") | st.just(str(root / "file")),
        "custom_tasks.0.question": columns, "custom_tasks.0.answer": columns, "custom_tasks.0.group": columns,
        "custom_tasks.0.id": columns, "custom_tasks.0.split": columns,
        "custom_tasks.0.choices": st.text(max_size=15).filter(lambda t: t not in COLUMNS) | st.sampled_from(
            [["a"], [1, 2], {"a": 1}]),
        "custom_tasks.0.prompt_template": st.text(max_size=30).filter(bad_template),
        "tasks": st.sampled_from([{"no_such_task": {}}, "x", {"mcq_a": 5}]),
        "training.lora.target_modules": st.sampled_from(["q_proj", [1], {"a": 1}]),
        "chains.0.stages.1.lora.target_modules": st.sampled_from(["q_proj", [1]]),
        "training.betas": st.sampled_from([[1.5, 0.9], [0.9], "x", [0.9, -0.1], [math.nan, 0.9]]),
        "chains.0.stages.1.betas": st.sampled_from([[1.5, 0.9], [0.9]]),
        "sweep.product": st.sampled_from([{"bad key!": [1]}, {"training.lr": []}, {"name": ["a"]},
                                          {"training.lr": [5.0]}, "x"]),
        "sweep.zip": st.sampled_from([[{"training.lr": [1e-3], "seeds": [[0], [1]]}], [{"x y": [1]}], "x"]),
        "sweep": st.sampled_from(["x", {"grid": {}}]),
        "logging.trackers": st.sampled_from(["tensorboard", ["nope"], [1], {"a": 1}]),
        "logging.mlflow_tracking_uri": st.text(max_size=20).filter(
            lambda t: not re.fullmatch(r"(file:|sqlite:|https?://|databricks)\S*", t)) | st.sampled_from([3, ["x"]]),
        "logging.wandb_project": names_not(NAME_PATTERN),
    }


def generic(info) -> st.SearchStrategy:
    """Bad values from a field's type and bounds: out of range, NaN, wrong type, outside a Literal."""
    members, optional = _plain(info.annotation)
    wrong = [st.sampled_from([{"a": 1}, [1, 2]])] + ([] if optional else [st.none()])
    kind = members[0] if len(members) == 1 else None
    if kind is bool:
        return st.one_of(st.sampled_from(["maybe", 2, "yes please"]), *wrong)
    if kind in (int, float):
        b = bounds(info)
        assert {"ge", "gt"} & set(b) and {"le", "lt"} & set(b), f"{info} lacks a lower or an upper bound"
        extra = [st.sampled_from(["ten", 1.5])] if kind is int else [st.sampled_from(["ten", True])]
        return st.one_of(out_of_range(kind, b), *extra, *wrong)
    if typing.get_origin(kind) is typing.Literal:
        allowed = typing.get_args(kind)
        return st.one_of(st.text(max_size=12).filter(lambda t: t not in allowed), *wrong)
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return st.sampled_from(["x", 5, [1], {"no_such_key": 1}])
    raise AssertionError(f"no bad-value strategy for a field of type {info.annotation}")


@pytest.fixture(scope="module")
def fields(world) -> list[tuple[str, st.SearchStrategy]]:
    specials = special(world["root"])
    return [(path, specials[path] if path in specials else generic(info))
            for path, info in leaves(ExperimentConfig, "") if path not in NOT_FUZZED_FIELDS]


def test_every_config_field_has_a_strategy(fields):
    assert len(fields) > 80 and {"training.lr", "custom_tasks.0.test_fraction", "curvature.graph_budget",
                                 "chains.0.stages.1.replay.fraction", "tasks.mcq_a.eval_limit"} <= {p for p, _ in fields}


@settings(SETTINGS, max_examples=250)
@given(data=st.data())
@pytest.mark.timeout(240)
def test_bad_config_values_are_one_line_before_any_work(capsys, world, fields, monkeypatch, data):
    """A bad value at any field of a valid config, given with --set: one line, exit 2, no stage started; a value
    that the schema refuses is blamed on the --set that gave it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, strategy = data.draw(st.sampled_from(fields), label="field")
    value = data.draw(strategy, label="value")
    escaped = data.draw(st.booleans(), label="ASCII-escaped")  # escapes of astral characters read as lone surrogates
    override = f"{path}={json.dumps(value, allow_nan=True, ensure_ascii=escaped)}"
    line = expect_one_line(capsys, ["run", str(world["config"]), "--set", override])
    assert not (world["root"] / "out" / "stages").exists(), line
    assert str(world["config"]) + ":" not in line or "--set" in line, line
