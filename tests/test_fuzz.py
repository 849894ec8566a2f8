"""Property-based fuzzing (hypothesis) of the config loader and of the user JSONL/CSV task loaders.

Every input ends in a ChaintuneError (one line, naming the problem and a fix) or in data that matches the input
exactly — never another exception, a hang (each test has a timeout), or silently wrong data. The default run is
bounded and deterministic (FAST examples per property); `pytest -m slow tests/test_fuzz.py` runs SLOW random examples.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chaintune.config import load_config
from chaintune.errors import ChaintuneError
from chaintune.tasks import load_splits, register_user_task

FAST, SLOW = 60, 3000
SIZES = [pytest.param(FAST, id="fast"), pytest.param(SLOW, id="slow", marks=pytest.mark.slow)]
pytestmark = pytest.mark.timeout(600)

VALID = {"name": "fz", "tasks": {"toxigenqa": {"train_limit": 8, "eval_limit": 4}},
         "training": {"lr": 1e-4, "batch_size": 2, "betas": [0.9, 0.99], "lora": {"r": 4, "target_modules": ["q_proj"]}},
         "chains": [{"name": "a", "stages": [{"task": "toxigenqa"}, {"task": "arc_easy", "lr": 1e-5, "epochs": 2}]}],
         "curvature": {"after": ["first"], "examples": 8}, "seeds": [0, 1], "keep_checkpoints": True}

TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)  # any Unicode but lone surrogates
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                           max_leaves=6)


def run_property(n: int, strategy, body) -> None:
    """Run `body(example)` on `n` examples of `strategy` (derandomized when n == FAST, so CI runs are stable)."""
    settings(max_examples=n, deadline=None, database=None, derandomize=n == FAST,
             suppress_health_check=list(HealthCheck))(given(strategy)(body))()


def outcome(fn, *args, **kwargs) -> Any:
    """fn's result, or None when it raised a one-line ChaintuneError that names a fix; anything else propagates."""
    try:
        return fn(*args, **kwargs)
    except ChaintuneError as exc:
        message = str(exc)
        assert len(message.splitlines()) == 1 and exc.problem and exc.fix, repr(message)
        return None


# ================================================================================================ config loader
def _leaves(obj: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _leaves(v, path + (k,))] + [path]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in _leaves(v, path + (i,))] + [path]
    return [path]


def _set(obj: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    copy = dict(obj) if isinstance(obj, dict) else list(obj)
    copy[head] = _set(copy[head], rest, value)
    return copy


def _same_value(given_: Any, resolved: Any) -> bool:
    """True if the validated value is the given one (YAML 1.1 reads `1e-5` as a string: numeric strings may parse)."""
    if isinstance(resolved, bool):  # pydantic reads 0/1 and yes/no-style words as booleans: harmless
        words = {"1", "true", "yes", "on", "t", "y"} if resolved else {"0", "false", "no", "off", "f", "n"}
        return given_ is resolved or str(given_).strip().lower() in words or given_ == resolved
    if isinstance(given_, bool):  # a boolean must never become a number (`lr: yes` is not lr = 1.0)
        return False
    if isinstance(resolved, float) and not math.isfinite(resolved):
        return False
    if isinstance(given_, (int, float)):
        return isinstance(resolved, (int, float)) and float(given_) == float(resolved)
    if isinstance(given_, str) and isinstance(resolved, (int, float)):
        return float(given_.strip()) == resolved
    return True  # containers are compared leaf by leaf


def assert_no_silent_coercion(given_: Any, resolved: Any, path: str = "") -> None:
    """Every leaf of the input that reached the validated config arrived unchanged."""
    assert _same_value(given_, resolved), f"{path}: {given_!r} became {resolved!r}"
    if isinstance(given_, dict) and isinstance(resolved, dict):
        for key in given_.keys() & resolved.keys():
            assert_no_silent_coercion(given_[key], resolved[key], f"{path}.{key}")
    if isinstance(given_, (list, tuple)) and isinstance(resolved, (list, tuple)) and len(given_) == len(resolved):
        for i, (a, b) in enumerate(zip(given_, resolved)):
            assert_no_silent_coercion(a, b, f"{path}.{i}")


def load_yaml_text(path: Path, text: str | bytes, overrides: list[str] | None = None):
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return outcome(load_config, path, overrides)


@pytest.mark.parametrize("n", SIZES)
def test_config_random_bytes(tmp_path, n):
    def body(data: bytes) -> None:
        load_yaml_text(tmp_path / "c.yaml", data)

    run_property(n, st.binary(max_size=300) | TEXT.map(str.encode), body)


@pytest.mark.parametrize("n", SIZES)
def test_config_random_top_level_documents(tmp_path, n):
    keys = st.sampled_from(sorted(VALID) + ["data_dir", "eval_tasks", "min_group_size", "custom_tasks"]) | TEXT

    def body(extra: dict) -> None:
        document = VALID | extra
        cfg = load_yaml_text(tmp_path / "c.yaml", yaml.safe_dump(document, allow_unicode=True))
        if cfg is not None:
            assert_no_silent_coercion(document, cfg.model_dump(mode="python"))

    run_property(n, st.dictionaries(keys, JSON_VALUES, max_size=3), body)


@pytest.mark.parametrize("n", SIZES)
def test_config_one_leaf_replaced(tmp_path, n):
    """Wrong types, out-of-range numbers, NaN/inf, huge values, odd text at every position of a valid config."""
    paths = [p for p in _leaves(VALID) if p]
    values = JSON_VALUES | st.sampled_from([True, False, None, "", "1e-3", ".inf", 10**30, -1, 0, float("nan"),
                                            float("inf"), "x" * 100_000, "../escape", "a\nb", [], {}])

    def body(case: tuple) -> None:
        path, value = case
        document = _set(VALID, path, value)
        cfg = load_yaml_text(tmp_path / "c.yaml", yaml.safe_dump(document, allow_unicode=True))
        if cfg is not None:
            assert_no_silent_coercion(document, cfg.model_dump(mode="python"))

    run_property(n, st.tuples(st.sampled_from(paths), values), body)


@pytest.mark.parametrize("n", SIZES)
def test_config_random_overrides(tmp_path, n):
    keys = st.sampled_from([".".join(map(str, p)) for p in _leaves(VALID) if p]) | TEXT
    overrides = st.lists(st.tuples(keys, TEXT | JSON_VALUES.map(json.dumps)).map("=".join) | TEXT, max_size=3)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(VALID))

    def body(sets: list[str]) -> None:
        outcome(load_config, path, sets)

    run_property(n, overrides, body)


NASTY_YAML = {
    "deep_nesting": "chains: " + "[" * 5_000 + "]" * 5_000,
    "deep_mapping": "chains: " + "{a: " * 5_000 + "1" + "}" * 5_000,
    "billion_laughs": "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")) + "chains: *i\n",
    "alias_into_fields": "x: &x {name: a, stages: [{task: toxigenqa}]}\nchains: [*x, *x]\n",
    "python_tag": "chains: !!python/object/apply:os.system ['echo pwned']\n",
    "binary_tag": "name: !!binary /w==\nchains: [{name: a, stages: [{task: toxigenqa}]}]\n",
    "duplicate_key": "training: {lr: 1e-5}\nchains: [{name: a, stages: [{task: toxigenqa}]}]\ntraining: {lr: 1}\n",
    "nested_duplicate_key": "training:\n  lr: 1e-5\n  lr: 3e-4\nchains: [{name: a, stages: [{task: toxigenqa}]}]\n",
    "bool_as_number": "training: {lr: yes}\nchains: [{name: a, stages: [{task: toxigenqa}]}]\n",
    "inf_epochs": "training: {epochs: .inf}\nchains: [{name: a, stages: [{task: toxigenqa}]}]\n",
    "beta_above_one": "training: {betas: [0.9, 2]}\nchains: [{name: a, stages: [{task: toxigenqa}]}]\n",
    "newline_in_key": "chains: [{name: a, stages: [{task: toxigenqa, \"x\\ny\": 1}]}]\n\"a\\nb\": 1\n",
    "newline_in_task": "chains: [{name: a, stages: [{task: \"nope\\nnope\"}]}]\n",
    "complex_key": "? [a, b]\n: 1\nchains: []\n",
    "nul_byte": "name: a\x00b\n",
    "non_utf8": b"name: caf\xe9\n",
    "empty": "",
    "only_comment": "# nothing\n",
    "huge_value": "name: " + "x" * 1_000_000 + "\n",
}


@pytest.mark.parametrize("case", sorted(NASTY_YAML))
@pytest.mark.timeout(30)
def test_config_nasty_yaml_is_a_clean_error(tmp_path, case):
    assert load_yaml_text(tmp_path / "c.yaml", NASTY_YAML[case]) is None


# ========================================================================================== user task loaders
CHOICE = TEXT.map(str.strip).filter(bool)
QUESTION = (st.sampled_from(["q1", "q2", "Which one?"]) | TEXT.filter(str.strip)
            | st.integers(20_000, 60_000).map(lambda k: "huge " * k))  # 100-300 kB fields load like any other


@st.composite
def good_record(draw, fmt: str) -> dict:
    """A valid record and what it must load as: the answer as index, letter or choice text."""
    choices = draw(st.lists(CHOICE, min_size=2, max_size=5, unique=True))
    gold = draw(st.integers(0, len(choices) - 1))
    forms = {"text": choices[gold]}
    if str(gold) not in choices:
        forms["index"] = gold if fmt == "jsonl" else str(gold)
    letter = draw(st.sampled_from([chr(65 + gold), chr(97 + gold)]))
    if letter not in choices:
        forms["letter"] = letter
    answer = forms[draw(st.sampled_from(sorted(forms)))]
    encoded: Any = choices
    if fmt == "csv":
        plain = all(c.isalnum() for c in choices)
        encoded = "|".join(choices) if plain and draw(st.booleans()) else json.dumps(choices, ensure_ascii=False)
    return {"question": draw(QUESTION), "choices": encoded, "answer": answer, "grp": draw(st.sampled_from(["g1", "g2"])),
            "split": draw(st.sampled_from(["train", "test", " TEST ", "validation"])), "_choices": choices, "_gold": gold}


BAD_VALUES = {  # field → malformed values (wrong type, empty, out of range, not an answer)
    "question": [None, "", "   ", [], {}, ["q"], True],
    "choices": [None, [], ["only"], ["a", ""], ["a", " "], 5, {"a": 1}, [["x"], "y"]],
    "answer": [None, [], {}, True, 99, -1, "Z", "not-a-choice-zz", "--1", "\u00b2", "\u00df", 1.5],
    "grp": [[], {}, None, ""],
    "split": ["dev", ""],
}


def cell_text(value: Any) -> str:
    """How write_dataset stores a value in a CSV cell."""
    return "" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def must_fail(field: str, value: Any, choices: list[str], fmt: str) -> bool:
    """Whether a record whose `field` holds the BAD_VALUES entry `value` must stop loading."""
    text = cell_text(value).strip() if fmt == "csv" else value
    if field in ("choices", "split"):
        return True
    if field == "answer":
        if fmt == "jsonl" and (value is None or isinstance(value, (bool, int, list, dict))):
            return True  # the ints in BAD_VALUES are out of range
        return str(text).strip() not in choices
    if fmt == "csv":  # any non-empty cell is valid question or group text
        return not text
    return not (isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value).strip())
RAW_BAD_LINES = ["{broken", "[1, 2]", "[" * 50_000 + "]" * 50_000, '{"question": ' + "1" * 5_000 + "}",
                 b"\xff\xfe\x00", '{"question": "q", "question": "r", "choices": ["a", "b"], "answer": 0}']


@st.composite
def dataset(draw, fmt: str) -> dict:
    """Records (good, with at most a few mutations), the column mapping, and whether loading must fail."""
    records = draw(st.lists(good_record(fmt), min_size=1, max_size=6))
    if draw(st.booleans()):  # exact duplicates (dropped, counted) and same question + choices (kept or conflicting)
        i = draw(st.integers(0, len(records) - 1))
        records.append(dict(records[i], answer=draw(st.sampled_from([records[i]["answer"], records[i]["_choices"][0]]))))
        records[-1]["_gold"] = records[i]["_gold"] if records[-1]["answer"] == records[i]["answer"] else 0
    mapping = {"group": draw(st.sampled_from([None, "grp"])), "id": draw(st.sampled_from([None, "uid"])),
               "split": draw(st.sampled_from([None, "split"])),
               "prompt_template": draw(st.sampled_from(["Question: {question}\nAnswer:", "{question} {{x}}?"]))}
    for i, r in enumerate(records):
        r["uid"], r["_fails"] = f"r{i}", {}  # field → must the load fail (None: unknown) after its last mutation
    for _ in range(draw(st.integers(0, 2))):
        r = records[draw(st.integers(0, len(records) - 1))]
        kind = draw(st.sampled_from(["bad", "drop", "random", "dup_id"] + (["raw"] if fmt == "jsonl" else [])))
        field = draw(st.sampled_from(["question", "choices", "answer"] + [mapping[k] for k in ("group", "split")
                                                                          if mapping[k]]))
        if kind == "bad":
            r[field] = draw(st.sampled_from(BAD_VALUES[field]))
            r["_fails"][field] = must_fail(field, r[field], r["_choices"], fmt)
        elif kind == "drop":  # a missing key, or an empty CSV cell
            r.pop(field, None)
            r["_fails"][field] = True
        elif kind == "random":
            r[field] = draw(JSON_VALUES)
            r["_fails"][field] = None
        elif kind == "dup_id":  # must fail when ids are mapped: expected_examples says so
            r["uid"] = "r0"
        elif kind == "raw":
            r["_raw"] = draw(st.sampled_from(RAW_BAD_LINES))
            r["_fails"]["_raw"] = True
    fails = [f for r in records for f in r["_fails"].values()]
    return {"records": records, "mapping": mapping, "must_fail": True in fails, "random": None in fails}


def write_dataset(path: Path, records: list[dict]) -> None:
    visible = [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]
    if path.suffix == ".jsonl":
        with open(path, "wb") as fh:
            for r, v in zip(records, visible):
                raw = r.get("_raw", json.dumps(v, ensure_ascii=False))
                fh.write((raw if isinstance(raw, bytes) else raw.encode("utf-8")) + b"\n")
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["question", "choices", "answer", "grp", "split", "uid"])
    writer.writeheader()
    for v in visible:
        writer.writerow({k: v.get(k, "") for k in writer.fieldnames} | {k: json.dumps(x) for k, x in v.items()
                                                                         if isinstance(x, (list, dict))})
    path.write_text(buffer.getvalue(), encoding="utf-8")


def expected_examples(records: list[dict], mapping: dict) -> list[tuple] | None:
    """What the documented rules make of valid records: (question, choices, gold, group, split) each; None = error."""
    if mapping["id"] and len({r["uid"] for r in records}) < len(records):
        return None
    rows = [(cell_text(r["question"]), tuple(r["_choices"]), r["_gold"],
             cell_text(r["grp"]) if mapping["group"] else None,
             r["split"].strip().lower() if mapping["split"] else None) for r in records]
    if mapping["split"]:
        return rows
    kept: dict[tuple, tuple] = {}
    for row in rows:
        first = kept.setdefault(row[:2], row)
        if first[2:4] != row[2:4]:
            return None  # same question and choices, different answer or group
    return list(kept.values())


def check_dataset(tmp_path: Path, fmt: str, case: dict) -> None:
    path = tmp_path / f"fuzz.{fmt}"
    write_dataset(path, case["records"])
    spec = {"name": "fuzz", "path": str(path), **{k: v for k, v in case["mapping"].items() if v}}
    register_user_task(spec)
    splits = outcome(load_splits, "fuzz")
    if splits is None:
        assert case["must_fail"] or case["random"] or expected_examples(case["records"], case["mapping"]) is None
        return
    assert not case["must_fail"], "a malformed record was accepted"
    examples = [e for s in splits.values() for e in s]
    assert len({e.id for e in examples}) == len(examples)
    assert all(0 <= e.gold < len(e.choices) and all(c.startswith(" ") and c.strip() for c in e.choices)
               for e in examples)
    if case["random"]:
        return
    expected = expected_examples(case["records"], case["mapping"])
    assert expected is not None, "conflicting or duplicate records were accepted"
    template = case["mapping"]["prompt_template"]
    got = sorted((e.prompt, e.choices, e.gold, e.group, e.meta.get("split")) for e in examples)
    want = sorted((template.format(question=q), tuple(f" {c}" for c in ch), g, grp, sp) for q, ch, g, grp, sp in expected)
    assert got == want
    if case["mapping"]["split"]:
        assert all(e.meta["split"] == name for name, split in splits.items() for e in split)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
@pytest.mark.parametrize("n", SIZES)
def test_user_records(tmp_path, isolated, fmt, n):
    run_property(n, dataset(fmt), lambda case: check_dataset(tmp_path, fmt, case))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".jsonl.gz", ".csv.gz"])
@pytest.mark.parametrize("n", SIZES)
def test_user_file_random_bytes(tmp_path, isolated, suffix, n):
    path = tmp_path / f"bytes{suffix}"

    def body(case: tuple) -> None:
        data, mode, cut = case
        if suffix.endswith(".gz") and mode != "raw":
            data = gzip.compress(data)
            if mode == "corrupt":
                data = data[:10] + bytes(b ^ 0x5A for b in data[10:cut + 11]) + data[cut + 11:]
        path.write_bytes(data)
        register_user_task({"name": "fuzz_bytes", "path": str(path)})
        outcome(load_splits, "fuzz_bytes")

    run_property(n, st.tuples(st.binary(max_size=300) | TEXT.map(str.encode),
                              st.sampled_from(["raw", "gzip", "corrupt"]), st.integers(0, 20)), body)


@pytest.mark.parametrize("n", SIZES)
def test_user_task_spec(tmp_path, isolated, n):
    """Random task specs: a clean ConfigError, or a task whose prompts contain each question verbatim."""
    path = tmp_path / "ok.jsonl"
    path.write_text("".join(json.dumps({"question": f"question {i}", "choices": ["a", "b"], "answer": i % 2}) + "\n"
                            for i in range(6)))
    specs = st.fixed_dictionaries({"name": st.just("fuzz_spec") | TEXT, "path": st.just(str(path))}, optional={
        "prompt_template": TEXT | TEXT.map(lambda t: t + "{question}") | st.sampled_from(
            ["{question.upper}", "{question:.2}", "{question!r}", "{question} {other}", "{0}{question}", "{question}{"]),
        "test_fraction": st.floats() | JSON_VALUES, "kind": TEXT | st.sampled_from(["safety", "capability"]),
        "choices": JSON_VALUES, "extra": JSON_VALUES})

    def body(spec: dict) -> None:
        name = outcome(register_user_task, spec)
        if name is None:
            return
        splits = outcome(load_splits, name)
        if splits is not None:
            for e in (e for s in splits.values() for e in s):
                assert f"question {int(e.id.rsplit('-', 1)[1]) - 1}" in e.prompt, e.prompt

    run_property(n, specs, body)


def test_exact_duplicates_are_dropped_and_counted(tmp_path, isolated, caplog):
    path = tmp_path / "d.csv"
    path.write_text("question,choices,answer\nq1,a|b,0\nq1,a|b,A\nq2,a|b,1\nq1,a|b,a\nq1,x|y,0\n")
    register_user_task({"name": "dups", "path": str(path)})
    with caplog.at_level(logging.WARNING, logger="chaintune"):
        splits = load_splits("dups")
    assert sum(map(len, splits.values())) == 3  # q1 (a|b), q2, q1 (x|y): same question, other choices is kept
    assert "dropped 2 records" in caplog.text and str(path) in caplog.text
