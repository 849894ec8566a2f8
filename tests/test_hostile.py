"""Hostile use (issue 19): what a new user and an adversary broke, one scenario each — user tasks outside `run`, a
failed start locking the output dir, data overwritten, writes through symlinks, tracebacks instead of one-line
errors, retried input errors, unreadable results, and the friction of the first hour. Property tests over every CLI
option and config field: tests/test_fuzz_cli.py."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_cli import assert_one_line_error, run_cli
from test_security import tree_state

import chaintune
from chaintune.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"
QUIET_VARIABLES = ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY")
KINDS = {"mcq_a": "safety", "mcq_b": "capability"}
CHAINS = [{"name": "ab", "stages": [{"task": "mcq_a"}, {"task": "mcq_b"}]},
          {"name": "ba", "stages": [{"task": "mcq_b"}, {"task": "mcq_a"}]}]


# the finished run has no quality gate: the tiny model learns nothing, and the analysis read from it would leave both
# runs out (the gate's own tests: test_gate.py)
NO_GATE = {"quality_gate": {"validation_size": 0}}


def experiment(mcq_config, mcq_data_dir: Path, out: Path, **overrides) -> dict:
    """Both orders of a safety and a capability user task, one seed, 4 steps per stage."""
    tasks = [{"name": t, "path": str(mcq_data_dir / f"{t}.jsonl"), "group": "grp", "kind": k} for t, k in KINDS.items()]
    return mcq_config(out, custom_tasks=tasks, chains=CHAINS, training={"lr": 1e-3, "batch_size": 4, "max_steps": 4},
                      tasks={t: {"train_limit": 8, "eval_limit": 8} for t in KINDS}) | overrides


def quiet_run(cfg: dict) -> "chaintune.Outcome":
    return chaintune.run(cfg, echo=lambda *_: None, progress=False)


def cli(*argv: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`chaintune ARGV` in a fresh process (this checkout's source first), without the settings that an earlier
    in-process `main()` of this test session left in the environment (progress bars, warnings)."""
    inherited = {k: v for k, v in os.environ.items() if k not in QUIET_VARIABLES}
    environ = inherited | {"PYTHONPATH": str(SRC)} | (env or {})
    return subprocess.run([sys.executable, "-m", "chaintune.cli", *argv], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=timeout)


def one_line(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert_one_line_error(proc.returncode, proc.stderr, *fragments)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, mcq_config, mcq_data_dir, module_isolation) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "out"
    outcome = quiet_run(experiment(mcq_config, mcq_data_dir, out, **NO_GATE))
    assert not outcome.failed and sorted(outcome.completed_runs) == ["ab-seed0", "ba-seed0"]
    return out


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    """A copy of the finished run directory (symlinks kept as links)."""
    return Path(shutil.copytree(finished, tmp_path / "run", symlinks=True))


def broken_model(tiny_model_dir: Path, where: Path) -> Path:
    """The tiny model with its weights cut in half: config.json is fine, loading fails."""
    shutil.copytree(tiny_model_dir, where)
    weights = where / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return where


# ------------------------------------------------------------------------------------- 1. your own data everywhere
def test_user_tasks_with_relative_paths_work_in_fresh_processes_elsewhere(tmp_path, mcq_config, mcq_data_dir,
                                                                          monkeypatch, isolated):
    """Run from the project folder with `path: data/x.jsonl`; then, in a new process, summarize, report and verify
    from another folder, and plan from the project: the run directory alone tells them where the user data is."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    shutil.copytree(mcq_data_dir, project / "data")
    elsewhere.mkdir()
    cfg = experiment(mcq_config, mcq_data_dir, tmp_path / "out", chains=CHAINS[:1], executor={"retries": 0})
    cfg["custom_tasks"] = [t | {"path": f"data/{t['name']}.jsonl"} for t in cfg["custom_tasks"]]
    (project / "exp.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(project)
    assert main(["run", "exp.yaml", "--no-progress"]) == 0
    stored = yaml.safe_load((tmp_path / "out" / "experiment.yaml").read_text())["custom_tasks"]
    assert [t["path"] for t in stored] == [str(project / "data" / f"{t}.jsonl") for t in KINDS]
    out = str(tmp_path / "out")
    script = (f"import os, sys; from chaintune.cli import main; os.chdir({str(elsewhere)!r}); "
              f"codes = [main(['summarize', {out!r}]), main(['report', {out!r}]), main(['verify', {out!r}, "
              f"'--no-progress'])]; os.chdir({str(project)!r}); codes.append(main(['plan', 'exp.yaml'])); "
              "print('codes', codes)")
    proc = subprocess.run([sys.executable, "-c", script], env=os.environ | {"PYTHONPATH": str(SRC)},
                          capture_output=True, text=True, timeout=300)
    assert "codes [0, 0, 0, 0]" in proc.stdout, proc.stderr[-2000:]
    assert "all 6 stored evaluations reproduced" in proc.stdout and "jobs pending: 0/" in proc.stdout


def test_eval_scores_a_user_csv_with_the_column_mapping(tmp_path, tiny_model_dir, capsys):
    rows = [{"text": f"question {i}?", "a": "yes", "b": "no", "c": "maybe", "label": "ABC"[i % 3], "who": f"g{i % 2}"}
            for i in range(25)]
    pd.DataFrame(rows).to_csv(tmp_path / "mine.csv", index=False)
    out = tmp_path / "results" / "mine.json"
    code, stdout, err = run_cli(capsys, "eval", "--task", str(tmp_path / "mine.csv"), "--question", "text",
                                "--choices", "a", "--choices", "b", "--choices", "c", "--answer", "label",
                                "--group", "who", "--model", str(tiny_model_dir), "--output", str(out), "--no-progress")
    assert code == 0, err
    summary = json.loads(out.read_text())
    assert summary["task"] == "mine" and summary["n"] == 5 and set(summary["per_group"]) <= {"g0", "g1"}
    assert len(pd.read_parquet(out.with_suffix(".predictions.parquet"))) == 5


# ------------------------------------------------------------------------------------- 2. a failed start locks nothing
@pytest.mark.parametrize("case", ["malformed_record", "empty_test_split", "model_that_does_not_load"])
def test_a_failed_start_does_not_lock_the_output_dir(tmp_path, mcq_experiment, mcq_data_dir, tiny_model_dir, case):
    """The first run fails before any result is stored; after fixing the cause (and editing the data, as a user
    fixing a file does) the rerun must run, not refuse with 'data file(s) changed'."""
    data = Path(shutil.copytree(mcq_data_dir, tmp_path / "data"))
    good = (data / "mcq_a.jsonl").read_text()
    model = tiny_model_dir
    if case == "malformed_record":
        (data / "mcq_a.jsonl").write_text(good + "{broken\n")
    elif case == "empty_test_split":
        (data / "mcq_a.jsonl").write_text(good.splitlines(keepends=True)[0])
    else:
        model = broken_model(tiny_model_dir, tmp_path / "model")
    cfg = mcq_experiment(tmp_path / "out", model=str(model), data_dir=str(data), executor={"retries": 2},
                         custom_tasks=[{"name": t, "path": str(data / f"{t}.jsonl"), "group": "grp"}
                                       for t in ("mcq_a", "mcq_b")])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    first = main(["run", str(path), "--no-progress"])
    assert first == (1 if case == "model_that_does_not_load" else 2)
    assert not list((tmp_path / "out").glob("stages/*/eval/*.json"))  # nothing was computed
    (data / "mcq_a.jsonl").write_text(good.replace("mcq_a 0:", "mcq_a zero:"))  # the user edits the data too
    path.write_text(yaml.safe_dump(cfg | {"model": str(tiny_model_dir)}))
    assert main(["run", str(path), "--no-progress"]) == 0


# ------------------------------------------------------------------------------------- 3. data is never written
@pytest.mark.parametrize("where", ["equal", "inside", "around"])
def test_output_dir_may_not_overlap_the_data_dir(tmp_path, mcq_experiment, mcq_data_dir, capsys, where):
    data = Path(shutil.copytree(mcq_data_dir, tmp_path / "box" / "data"))
    (data / "results.csv").write_text("my,own,results\n1,2,3\n")
    before = tree_state(tmp_path / "box")
    out = {"equal": data, "inside": data / "out", "around": tmp_path / "box"}[where]
    cfg = mcq_experiment(out, data_dir=str(data))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli(capsys, "run", str(tmp_path / "c.yaml"), "--no-progress")
    assert_one_line_error(code, err, "overlaps the data directory", "outside the data directory")
    assert tree_state(tmp_path / "box") == before


def test_eval_output_may_not_overwrite_data(tmp_path, mcq_data_dir, tiny_model_dir, capsys):
    data = Path(shutil.copytree(mcq_data_dir, tmp_path / "data"))
    before = tree_state(data)
    for output, data_dir, fragment in ((data / "results.json", ["--data-dir", str(data)], "overlaps the data directory"),
                                       (data / "mcq_a.jsonl", [], "is the user data file")):
        code, _, err = run_cli(capsys, "eval", "--task", str(data / "mcq_a.jsonl"), "--model", str(tiny_model_dir),
                               *data_dir, "--output", str(output), "--no-progress")
        assert_one_line_error(code, err, fragment)
    assert tree_state(data) == before


# ------------------------------------------------------------------------------------- 4. no write leaves the run dir
@pytest.mark.parametrize("folder", ["summary", "report", "runs/ab-seed0", "eval"])
def test_a_symlinked_folder_in_a_run_dir_is_never_written_through(run_copy, tmp_path, mcq_config, mcq_data_dir,
                                                                 capsys, isolated, folder):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if folder == "eval":
        folder = f"{next(run_copy.glob('stages/s2-*')).relative_to(run_copy)}/eval"
    target = run_copy / folder
    shutil.rmtree(target, ignore_errors=True)
    target.symlink_to(elsewhere, target_is_directory=True)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(experiment(mcq_config, mcq_data_dir, run_copy, **NO_GATE)))
    argv = {"summary": ["summarize", str(run_copy)], "report": ["report", str(run_copy)]}.get(
        folder, ["run", str(config), "--no-progress"])
    code, out, err = run_cli(capsys, *argv)
    if folder.endswith("/eval"):  # the stage's job fails and says why; the others fail before any work
        assert code != 0 and "is a symlink" in " ".join(out.split()), err
    else:
        assert_one_line_error(code, err, "is a symlink", "chaintune writes only inside")
    assert not any(elsewhere.iterdir())


# ------------------------------------------------------------------------------------- 5. one-line errors, no retries
@pytest.mark.parametrize("case", ["empty_config", "truncated_weights", "weights_of_another_architecture",
                                  "not_a_model_folder"])
def test_a_model_folder_that_does_not_load_is_one_line(tmp_path, tiny_model_dir, mcq_data_dir, capsys, case):
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    if case == "empty_config":
        (model / "config.json").write_text("{}")
    elif case == "truncated_weights":
        broken_model(tiny_model_dir, model := tmp_path / "model2")
    elif case == "weights_of_another_architecture":
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps(config | {"model_type": "bert", "architectures": None}))
    else:
        (model / "config.json").unlink()
    code, _, err = run_cli(capsys, "eval", "--task", str(mcq_data_dir / "mcq_a.jsonl"), "--model", str(model),
                           "--output", str(tmp_path / "e.json"))
    assert_one_line_error(code, err, str(model.name), "model")


def test_an_adapter_that_is_not_one_is_one_line(tmp_path, tiny_model_dir, mcq_data_dir, capsys):
    not_adapter = tmp_path / "folder"
    not_adapter.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "r": "many"}')
    for adapter, fragment in ((not_adapter, "is not a LoRA adapter folder"), (broken, "cannot apply the adapter")):
        code, _, err = run_cli(capsys, "eval", "--task", str(mcq_data_dir / "mcq_a.jsonl"), "--model",
                               str(tiny_model_dir), "--adapter", str(adapter), "--output", str(tmp_path / "e.json"))
        assert_one_line_error(code, err, fragment)


def test_an_unavailable_device_fails_before_any_work(tmp_path, mcq_experiment, mcq_data_dir, capsys):
    for device in ("gpu", "cuda:7"):
        code, _, err = run_cli(capsys, "eval", "--task", str(mcq_data_dir / "mcq_a.jsonl"), "--device", device,
                               "--output", str(tmp_path / "e.json"))
        assert_one_line_error(code, err, f"'{device}'", "cuda:N")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(mcq_experiment(tmp_path / "out", device="cuda:7")))
    code, _, err = run_cli(capsys, "run", str(tmp_path / "c.yaml"))
    assert_one_line_error(code, err, "device 'cuda:7'")
    assert not (tmp_path / "out" / "stages").exists()


def test_an_unwritable_output_fails_before_the_work(tmp_path, mcq_data_dir, tiny_model_dir, capsys, monkeypatch):
    import chaintune.evaluate

    monkeypatch.setattr(chaintune.evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluated before the check"))
    (tmp_path / "file").write_text("")
    for output in (tmp_path / "file" / "e.json", tmp_path):
        code, _, err = run_cli(capsys, "eval", "--task", str(mcq_data_dir / "mcq_a.jsonl"), "--model",
                               str(tiny_model_dir), "--output", str(output))
        assert_one_line_error(code, err, "--output")


def test_a_late_write_failure_keeps_the_results(tmp_path, mcq_data_dir, tiny_model_dir, capsys, monkeypatch):
    """The output passed the check but the write still fails (disk full at the end): the results are saved in a
    temporary folder, and the one-line error says where."""
    import chaintune.io
    from chaintune.errors import ChaintuneError

    real, calls = chaintune.io.write_json, []

    def full_once(path, obj):
        calls.append(path)
        if len(calls) == 1:
            raise ChaintuneError(f"cannot write '{path}' (No space left on device)")
        real(path, obj)

    monkeypatch.setattr(chaintune.io, "write_json", full_once)
    code, _, err = run_cli(capsys, "eval", "--task", str(mcq_data_dir / "mcq_a.jsonl"), "--model", str(tiny_model_dir),
                           "--output", str(tmp_path / "e.json"), "--no-progress")
    assert_one_line_error(code, err, "No space left on device", "the results were saved to")
    spare = Path(err.split("saved to '")[1].split("'")[0])
    assert json.loads((spare / "e.json").read_text())["n"] == 12 and (spare / "e.predictions.parquet").is_file()
    shutil.rmtree(spare)


@pytest.mark.parametrize("override, fragment", [
    ("training.lr=1e30", "less than or equal to 1"), ("training.epochs=1e308", "less than or equal to 1000"),
    ("seeds=[-1]", "greater than or equal to 0"), ("curvature.max_iter=1000000000", "less than or equal to 10000"),
    ("chains.0.stages.0.max_steps=100000000000", "less than or equal to 10000000"),
    ("executor.workers=100000", "less than or equal to 1024")])
def test_out_of_range_numbers_fail_before_any_work(tmp_path, mcq_experiment, capsys, override, fragment):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(mcq_experiment(tmp_path / "out")))
    code, _, err = run_cli(capsys, "run", str(tmp_path / "c.yaml"), "--set", override)
    assert_one_line_error(code, err, f"--set {override}:", fragment)
    assert not (tmp_path / "out").exists()


def test_input_errors_are_not_retried(tmp_path, mcq_experiment, tiny_model_dir, monkeypatch):
    """A model that does not load and a diverging loss fail the same way every time: one attempt, then recorded."""
    import chaintune.train as train

    cfg = mcq_experiment(tmp_path / "a", model=str(broken_model(tiny_model_dir, tmp_path / "m")),
                         executor={"retries": 3})
    failed = quiet_run(cfg).failed
    assert all(f["attempts"] <= 1 for f in failed.values())
    assert any("cannot load model" in f["error"] for f in failed.values())
    real = train.answer_loss_sum

    def nan_loss(*args, **kwargs):
        loss, n = real(*args, **kwargs)
        return loss * float("nan"), n

    monkeypatch.setattr(train, "answer_loss_sum", nan_loss)
    failed = quiet_run(mcq_experiment(tmp_path / "b", executor={"retries": 3})).failed
    stage1 = next(f for f in failed.values() if f["node"].startswith("s1-"))
    assert stage1["attempts"] == 1 and "loss is nan" in stage1["error"]


@pytest.mark.parametrize("file, content, command", [
    ("stages/s1-*/eval/mcq_a.json", '{"task": "mcq_a", "n": ', "summarize"),
    ("stages/s1-*/eval/mcq_a.predictions.parquet", "PAR1", "summarize"),
    ("runs/ab-seed0/run.json", '{"run_id": 3}', "summarize"), ("sweep/points.json", '{"not": "a list"}', "summarize"),
    ("stages/s1-*/node.json", "[]", "summarize"), ("experiment.yaml", "a: [unclosed", "report"),
    ("runs/ab-seed0/train_curves.csv", b"\xff\xfe\x00garbage", "report"), ("environment.json", "[1]", "report"),
    ("results.parquet", "not parquet", "report")])
def test_a_corrupt_result_file_is_one_line_naming_it(run_copy, capsys, file, content, command):
    path = next(run_copy.glob(file))
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, _, err = run_cli(capsys, command, str(run_copy))
    assert_one_line_error(code, err, str(path), "restore it from a copy")


def test_an_unexpected_exception_is_one_line_not_a_traceback(capsys, monkeypatch):
    import chaintune.cli

    def bug(args):
        raise KeyError("internal")

    monkeypatch.setattr(chaintune.cli, "cmd_tasks", bug)
    code, _, err = run_cli(capsys, "tasks")
    assert code == chaintune.cli.EXIT_BUG and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "internal error: KeyError" in err and "--debug" in err


# ------------------------------------------------------------------------------------- 6. friction
def test_help_and_tasks_start_without_torch():
    code = ("import sys; from chaintune.cli import build_parser; build_parser().parse_args(['tasks']); "
            "print(sorted(m for m in ('torch', 'transformers', 'scipy', 'pandas', 'pydantic') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], env=os.environ | {"PYTHONPATH": str(SRC)},
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stderr
    started = time.perf_counter()
    assert cli("--help").returncode == 0 and time.perf_counter() - started < 5  # ~0.1 s idle; was 2.5–3.4 s


def test_no_progress_hides_every_progress_bar(tmp_path, mcq_data_dir, tiny_model_dir):
    argv = ["eval", "--task", str(mcq_data_dir / "mcq_a.jsonl"), "--model", str(tiny_model_dir), "--output",
            str(tmp_path / "e.json")]
    shown = cli(*argv)
    assert shown.returncode == 0 and "it/s" in shown.stderr  # transformers' "Loading weights" bar, ours
    hidden = cli(*argv, "--no-progress")
    assert hidden.returncode == 0 and "it/s" not in hidden.stderr and "%|" not in hidden.stderr, hidden.stderr


def test_worker_processes_inherit_the_quiet_warnings(monkeypatch):
    """Spawned workers start a new interpreter: the CLI's warning filter reaches them through PYTHONWARNINGS (a
    LoRA stage printed a deprecation warning once per stage and worker)."""
    from chaintune.cli import quiet

    monkeypatch.setenv("PYTHONWARNINGS", "default")  # recorded, so that the test leaves the variable as it was
    monkeypatch.delenv("PYTHONWARNINGS")
    quiet(debug=False, progress=True)
    child = subprocess.run([sys.executable, "-c", "import warnings; warnings.warn('old API', FutureWarning)"],
                           capture_output=True, text=True, timeout=60)
    assert child.stderr == ""


def test_an_offline_hub_id_fails_fast(tmp_path, mcq_data_dir, capsys, monkeypatch):
    import chaintune.hub

    task = str(mcq_data_dir / "mcq_a.jsonl")
    for env, fragment in (({"HF_HUB_OFFLINE": "1"}, "environment says offline"),
                          ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot be reached (127.0.0.1:9)")):
        for name in chaintune.hub.OFFLINE_VARIABLES + ("HF_ENDPOINT", "HTTPS_PROXY", "https_proxy"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        chaintune.hub.reachable.cache_clear()
        started = time.perf_counter()
        code, _, err = run_cli(capsys, "eval", "--task", task, "--model", "some-org/some-model", "--output",
                               str(tmp_path / "e.json"))
        assert_one_line_error(code, err, "model 'some-org/some-model' needs the Hugging Face hub", fragment)
        assert time.perf_counter() - started < 10  # was 53 s of retries
    chaintune.hub.reachable.cache_clear()


def test_yaml_and_json_errors_say_where(tmp_path, tiny_model_dir, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("name: x\nchains:\n  - name: a\n   stages: [{task: mcq_a}]\n")
    code, _, err = run_cli(capsys, "run", str(config))
    assert_one_line_error(code, err, f"{config}:4:", "not valid YAML")
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "q?", "choices": ["a", "b"], "answer": 0}\n{"question": "r?" "choices": []}\n')
    code, _, err = run_cli(capsys, "eval", "--task", str(data), "--model", str(tiny_model_dir), "--output",
                           str(tmp_path / "e.json"))
    assert_one_line_error(code, err, f"{data}:2: malformed JSON (Expecting ',' delimiter at column 19)")


def test_user_task_spec_errors_are_readable(tmp_path, mcq_experiment, capsys):
    cfg = mcq_experiment(tmp_path / "out")
    cfg["custom_tasks"][0] |= {"choices": 5, "colour": "red"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli(capsys, "run", str(tmp_path / "c.yaml"))
    assert_one_line_error(code, err, "custom_tasks: custom_tasks.0: user task 'mcq_a': choices", "colour: unknown key")
    assert "validation error" not in err and "pydantic" not in err and "input_value" not in err


def test_errors_from_set_are_blamed_on_set(tmp_path, mcq_experiment, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(mcq_experiment(tmp_path / "out")))
    for override in ("training.lr=abc", "chains.0.stages.0.batch_size=0", "tasks.mcq_a.eval_limit=-3"):
        code, _, err = run_cli(capsys, "run", str(config), "--set", override)
        assert_one_line_error(code, err, f"--set {override}:", "fix that --set value")
        assert f"{config}:" not in err
    code, _, err = run_cli(capsys, "run", str(config), "--set", "training.lr=1e-4", "--set", "training.batch_size=0")
    assert_one_line_error(code, err, "--set training.batch_size=0: training.batch_size")


def test_user_splits_of_small_files_are_80_20(tmp_path):
    """25 records in 15 strata (group × answer) of 1–3: the test split holds round(25 × 0.2) = 5, not one per
    stratum (that gave ~35 %)."""
    from chaintune.tasks.user import UserTaskSpec, load_user_examples, split_user_examples

    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}?", "choices": ["a", "b", "c"], "answer": (i * 7) % 3,
                                        "grp": f"g{i % 5}"}) + "\n" for i in range(25)))
    for fraction, expected in ((0.2, 5), (0.3, 8)):
        spec = UserTaskSpec(name="small", path=path, group="grp", test_fraction=fraction)
        splits = split_user_examples(load_user_examples(spec), spec, seed=0)
        assert len(splits["test"]) == expected and len(splits["train"]) == 25 - expected
        assert not {e.id for e in splits["test"]} & {e.id for e in splits["train"]}


def test_report_out_is_one_folder_holding_everything(finished, tmp_path, capsys):
    code, _, err = run_cli(capsys, "report", str(finished), "--out", str(tmp_path / "mine"), "--format", "md")
    assert code == 0, err
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
    assert {p.name for p in (tmp_path / "mine").iterdir()} == {"report.md", "figures", "tables"}
    code, _, err = run_cli(capsys, "report", str(finished), "--out", str(tmp_path / "r.html"))
    assert_one_line_error(code, err, "--out takes a folder")


def test_a_negative_lambda_max_is_explained():
    from chaintune.curvature import sign_note

    assert "largest magnitude" in sign_note(-0.3) and "downward" in sign_note(-0.3)
    assert sign_note(0.3) == "" and sign_note(float("nan")) == ""


def test_one_seed_gives_no_order_verdict(finished):
    from chaintune.analysis import findings, load_runs
    from chaintune.rundir import RunDir

    (line, *_) = findings(load_runs(RunDir(finished)))["Order: is safety forgotten more when it comes first?"]
    assert "no significant difference" not in line and "no test (need >= 2 seeds per order" in line


def test_truncated_prompts_are_counted_in_a_warning(tiny_model_dir, caplog):
    from chaintune.evaluate import score_examples
    from chaintune.models import load_model
    from chaintune.tasks import Example
    from chaintune.train import tokenize_sft

    model, tokenizer = load_model(str(tiny_model_dir))
    examples = [Example(f"e{i}", "the quick brown fox " * (1 + 20 * (i % 2)), (" yes", " no"), 0) for i in range(6)]
    with caplog.at_level(logging.WARNING):
        score_examples(model, tokenizer, examples, max_length=32, desc="demo")
        tokenize_sft(tokenizer, examples, 32, "stage s1")
    assert "demo: prompts scored: 3 of 6 were longer than 32 tokens" in caplog.text
    assert "stage s1: training examples: 3 of 6 were longer than 32 tokens" in caplog.text


@pytest.mark.slow
def test_lora_stages_on_workers_print_no_warnings(tmp_path, mcq_experiment):
    """End to end: two worker processes, LoRA stages, no --debug: no warning reaches the terminal."""
    cfg = mcq_experiment(tmp_path / "out", training={"method": "lora", "lr": 1e-3, "batch_size": 4, "max_steps": 2})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = cli("run", str(tmp_path / "c.yaml"), "--workers", "2", "--no-progress")
    assert proc.returncode == 0 and "Warning" not in proc.stderr, proc.stderr


def test_a_worker_killed_by_the_os_is_named_as_such():
    from concurrent.futures.process import BrokenProcessPool

    from chaintune.engine import _error_line

    line = _error_line(BrokenProcessPool("A process in the process pool was terminated abruptly while the future was "
                                         "running or pending."))
    assert "out of memory" in line and "--workers" in line and "\n" not in line
    assert _error_line(RuntimeError("boom\ndetails")) == "RuntimeError: boom"
