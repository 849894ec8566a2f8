"""Fault tolerance on the tiny model: SIGKILL at named and random points, then resume — the results equal an
uninterrupted run and no visible file is ever half written; corrupt or missing checkpoints are retrained; an
unwritable or full output dir fails before training with one line; an infinite loss stops the stage with its step
and learning rate. (A SIGKILL right after a mid-stage resume state and a NaN loss: tests/test_chain.py.)"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

import chaintune
from chaintune.cli import main
from chaintune.errors import ChaintuneError, TrainingError
from chaintune.rundir import RunDir
from chaintune.train import DivergedError

DRIVER = Path(__file__).with_name("fault_driver.py")


def quiet(cfg: dict) -> "chaintune.Outcome":
    """The one driver, quiet; every job must succeed."""
    outcome = chaintune.run(cfg, echo=lambda *_: None, progress=False)
    assert not outcome.failed, outcome.failed
    return outcome

# In order: each child resumes what the previous one left and is killed at the next point (see fault_driver.py).
NAMED_POINTS = [
    "write:environment.json",           # the first file of a run, torn
    "eval_batch@3",                     # inside the base model's first evaluation
    "write:mcq_a.predictions.parquet",  # an evaluation's predictions, torn
    "write:mcq_a.json",                 # predictions stored, the summary torn
    "train_step@2",                     # stage 1 before its first resume state: restarts the stage
    "write:resume.safetensors@2",       # the step-6 resume state torn: resumes from step 3
    "train_step@5",                     # stage 1's last step, after the step-6 state
    "write:train_curve.csv",            # stage trained, its curve torn
    "write:node.json",                  # checkpoint in place, the stage not yet marked done
    "eval_batch@12",                    # inside stage 1's evaluations
    "train_step@4",                     # stage 2 after its step-3 resume state
    "write:metrics.json",               # a run folder
    "write:results.parquet",            # the results table
    "write:results.csv",                # results.parquet replaced, results.csv torn
]
RESULT_FILES = ["results.parquet", "runs/ab-seed0/predictions.parquet"]


def assert_complete(folder: Path) -> None:
    """Every visible file (no dot in its path) parses completely: a reader never sees a half-written file."""
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        try:
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".parquet":
                pd.read_parquet(path)
            elif path.suffix == ".csv":
                assert path.read_text(encoding="utf-8").endswith("\n"), "no final newline"
                pd.read_csv(path)
            elif path.suffix == ".yaml":
                yaml.safe_load(path.read_text(encoding="utf-8"))
            elif path.suffix == ".safetensors":
                from safetensors.torch import load_file

                load_file(path)
        except Exception as exc:  # noqa: BLE001 — any parse failure is a torn file
            raise AssertionError(f"{path.relative_to(folder)} is incomplete: {exc}") from exc


def assert_same_results(out: Path, reference: Path) -> None:
    for name in RESULT_FILES:
        pd.testing.assert_frame_equal(pd.read_parquet(out / name), pd.read_parquet(reference / name))
    curves = [pd.read_csv(f / "runs" / "ab-seed0" / "train_curves.csv").drop(columns="seconds") for f in (out, reference)]
    pd.testing.assert_frame_equal(*curves)
    assert json.loads((out / "runs/ab-seed0/metrics.json").read_text()) == json.loads(
        (reference / "runs/ab-seed0/metrics.json").read_text())


def drive(tmp_path: Path, make, points: list[str]) -> list[dict]:
    """Run tests/fault_driver.py: an uninterrupted reference run, then one killed child per point."""
    paths = {}
    for name in ("reference", "killed"):
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(make(tmp_path / name)))
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(DRIVER), str(paths["reference"]), str(paths["killed"]),
                           str(tmp_path / "snapshots"), str(report), *points], capture_output=True, text=True,
                          timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(report.read_text())


def check_snapshots(tmp_path: Path) -> None:
    """Each copy of the output folder taken right after a kill is complete; a write kill left its torn temp file."""
    for snapshot in sorted(p for p in (tmp_path / "snapshots").iterdir() if p.is_dir() and not p.name.endswith("-final")):
        assert_complete(snapshot)
        point = snapshot.name.split("-", 1)[1]
        if point.startswith("write_"):
            name = point.removeprefix("write_").split("@")[0]
            assert list(snapshot.rglob(f".{name}.*.tmp")), f"no torn temporary file of {name}"


def check_resumed(out: Path, reference: Path) -> None:
    assert_same_results(out, reference)
    assert not list(out.rglob("*.tmp")) and not list(out.glob("stages/*/work")), "leftovers after the resume"


def test_sigkill_at_named_points_then_resume_equals_uninterrupted(tmp_path, mcq_experiment):
    records = drive(tmp_path, mcq_experiment, NAMED_POINTS + ["end"])
    assert records[0] == {"point": "reference", "killed": False, "exit_code": 0}
    assert [r["point"] for r in records if r["killed"]] == NAMED_POINTS, records
    assert records[-1]["exit_code"] == 0, (tmp_path / "snapshots" / f"{len(NAMED_POINTS):02d}-end.log").read_text()
    check_snapshots(tmp_path)
    check_resumed(tmp_path / "killed", tmp_path / "reference")


@pytest.mark.slow
def test_sigkill_at_random_times_then_resume_equals_uninterrupted(tmp_path, mcq_experiment):
    """10 independent trials: a fresh run SIGKILLed at a random moment (seeded), resumed, compared."""
    records = drive(tmp_path, mcq_experiment, ["random"] * 10)
    killed = [r for r in records if r["killed"]]
    assert len(killed) >= 5 and all(r["resume_exit_code"] == 0 for r in killed), records
    check_snapshots(tmp_path)
    for final in sorted((tmp_path / "snapshots").glob("*-final")):
        check_resumed(final, tmp_path / "reference")


# ---------------------------------------------------------------------------------------------- checkpoints
def corrupt(checkpoint: Path, how: str) -> None:
    weights = checkpoint / "model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "bit_flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x01
        weights.write_bytes(bytes(data))
    elif how == "config_edited":  # not a weight file, still checksummed: it decides how the weights are read
        config = json.loads((checkpoint / "config.json").read_text())
        (checkpoint / "config.json").write_text(json.dumps(config | {"rms_norm_eps": 0.5}))
    else:
        weights.unlink()


TWO_CHAINS = [{"name": "a", "stages": [{"task": "mcq_a"}]}, {"name": "ab", "stages": [{"task": "mcq_a"}, {"task": "mcq_b"}]}]


@pytest.fixture(scope="module")
def one_stage_then_reference(tmp_path_factory, mcq_config, module_isolation) -> tuple[Path, Path]:
    """A finished run of chain a (stage 1 only), and an uninterrupted run of chains a and ab: made once."""
    root = tmp_path_factory.mktemp("corrupt")
    for name, chains in (("one_stage", TWO_CHAINS[:1]), ("reference", TWO_CHAINS)):
        quiet(mcq_config(root / name, chains=chains))
    return root / "one_stage", root / "reference"


@pytest.mark.parametrize("how", ["truncated", "bit_flip", "config_edited", "deleted"])
def test_corrupt_checkpoint_is_detected_and_retrained(tmp_path, one_stage_then_reference, mcq_experiment, monkeypatch,
                                                      capsys, how):
    """Chain ab needs stage 1's checkpoint: if it fails its SHA-256, stage 1 is retrained, never loaded."""
    import chaintune.stage as stage_mod

    one_stage, reference = one_stage_then_reference
    out = Path(shutil.copytree(one_stage, tmp_path / "out"))
    (checkpoint,) = (out / "stages").glob("s1-*/checkpoint")
    corrupt(checkpoint, how)
    trained = []
    real_train = stage_mod.train_stage
    monkeypatch.setattr(stage_mod, "train_stage", lambda *a, **k: trained.append(k["desc"]) or real_train(*a, **k))
    capsys.readouterr()
    quiet(mcq_experiment(out, chains=TWO_CHAINS))
    assert [d.split("-")[0] for d in trained] == ["s1", "s2"]
    assert "missing or corrupt: retraining" in capsys.readouterr().out  # the stage executor's messages
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), pd.read_parquet(reference / "results.parquet"))


@pytest.mark.parametrize("entry", ["api", "cli"])
def test_released_checkpoints_never_break_a_run_or_its_rerun(tmp_path, mcq_experiment, monkeypatch, capsys, entry):
    """keep_checkpoints: false, two chains sharing a two-stage prefix: the stages below a LoRA prefix read all its
    adapters, so a checkpoint goes only when every node below it is finished; a rerun trains nothing again."""
    import chaintune.stage as stage_mod

    a, b = {"task": "mcq_a"}, {"task": "mcq_b"}
    cfg = mcq_experiment(tmp_path / "out", keep_checkpoints=False, chains=[{"name": "x", "stages": [a, b, a]},
                                                                           {"name": "y", "stages": [a, b, b]}],
                         training={"lr": 1e-3, "batch_size": 4, "method": "lora", "lora": {"r": 2, "alpha": 4}})

    def run() -> None:
        if entry == "cli":
            assert run_cli(capsys, cfg, tmp_path)[0] == 0
        else:
            quiet(cfg)

    run()
    assert not list((tmp_path / "out" / "stages").glob("*/checkpoint"))
    monkeypatch.setattr(stage_mod, "train_stage", lambda *a, **k: pytest.fail("a finished stage was retrained"))
    run()


def test_a_new_chain_below_released_checkpoints_retrains_the_whole_prefix(tmp_path, mcq_experiment, monkeypatch):
    """keep_checkpoints: false, then a chain added below the finished two-stage prefix: both prefix stages are
    retrained (deterministically: the first chain's results do not change, its records are kept throughout), then
    the new stage."""
    import chaintune.stage as stage_mod

    a, b = {"task": "mcq_a"}, {"task": "mcq_b"}
    lora = {"lr": 1e-3, "batch_size": 4, "method": "lora", "lora": {"r": 2, "alpha": 4}}
    cfg = mcq_experiment(tmp_path / "out", keep_checkpoints=False, chains=[{"name": "x", "stages": [a, b]}],
                         training=lora)
    before = quiet(cfg).results
    assert not list((tmp_path / "out" / "stages").glob("*/checkpoint"))
    trained = []
    real_train = stage_mod.train_stage

    def s2_dies(*args, **kwargs):
        trained.append(kwargs["desc"])
        if kwargs["desc"].startswith("s2"):
            raise ChaintuneError("killed (simulated)", "rerun")
        return real_train(*args, **kwargs)

    cfg["chains"].append({"name": "y", "stages": [a, b, a]})
    monkeypatch.setattr(stage_mod, "train_stage", s2_dies)
    outcome = chaintune.run(cfg, echo=lambda *_: None, progress=False)
    assert outcome.incomplete_runs == ["y-seed0"]  # a failed retraining keeps the records of x's stage 2
    assert RunDir(cfg["output_dir"]).run_ids() == ["x-seed0"]
    monkeypatch.setattr(stage_mod, "train_stage", lambda *a, **k: trained.append(k["desc"]) or real_train(*a, **k))
    outcome = quiet(cfg)
    assert not outcome.failed and sorted(outcome.completed_runs) == ["x-seed0", "y-seed0"]
    assert [d.split("-")[0] for d in trained] == ["s1", "s2", "s2", "s3"]  # s1's retrained checkpoint was kept
    after = outcome.results[outcome.results.run_id == "x-seed0"].reset_index(drop=True)
    pd.testing.assert_frame_equal(after[before.columns], before)


def test_a_retrained_stage_whose_weights_differ_is_evaluated_again(tmp_path, one_stage_then_reference,
                                                                     mcq_experiment, capsys):
    """The lost checkpoint's recorded digest differs from what retraining gives (as nondeterministic kernels
    would): its evaluations are measured again on the new weights, and a run through it is complete only after."""
    one_stage, reference = one_stage_then_reference
    out = Path(shutil.copytree(one_stage, tmp_path / "out"))
    (node,) = (out / "stages").glob("s1-*/node.json")
    record = json.loads(node.read_text())
    record["checkpoint_sha256"] = {k: "0" * 64 for k in record["checkpoint_sha256"]}
    node.write_text(json.dumps(record))
    capsys.readouterr()
    quiet(mcq_experiment(out, chains=TWO_CHAINS))
    shown = capsys.readouterr().out
    assert "the retrained weights differ from the lost ones: evaluating it again" in shown
    assert re.search(r"eval s1-\S+ +mcq_a", shown)  # evaluated again
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), pd.read_parquet(reference / "results.parquet"))


# ---------------------------------------------------------------------------------------------- output dir
def run_cli(capsys, cfg: dict, tmp_path: Path) -> tuple[int, str]:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["run", str(path), "--no-progress"])
    return code, capsys.readouterr().err


def fail_if_called(monkeypatch) -> None:
    """Loading a model or training is too late for an output-dir error."""
    import chaintune.stage as stage_mod
    import chaintune.weights as weights_mod

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded or trained before the output dir was checked")

    monkeypatch.setattr(weights_mod, "load_model", forbidden)
    monkeypatch.setattr(stage_mod, "train_stage", forbidden)


def _raise_for(name: str, err: int, real):
    def fake(self, *args, **kwargs):
        if self.name == name:
            raise OSError(err, os.strerror(err))
        return real(self, *args, **kwargs)
    return fake


@pytest.mark.parametrize("case, fragment", [
    ("is_a_file", "File exists"), ("under_a_file", "Not a directory"), ("disk_full", "No space left on device"),
    ("permission", "Permission denied"), ("read_only_fs", "Read-only file system")])
def test_unwritable_output_dir_fails_before_training(tmp_path, mcq_experiment, monkeypatch, capsys, case, fragment):
    out = tmp_path / "out"
    if case == "is_a_file":
        out.write_text("")
    elif case == "under_a_file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out"
    elif case == "disk_full":
        monkeypatch.setattr(Path, "write_text", _raise_for(".write-test", errno.ENOSPC, Path.write_text))
    elif case == "permission":
        monkeypatch.setattr(Path, "mkdir", _raise_for("out", errno.EACCES, Path.mkdir))
    else:
        monkeypatch.setattr(Path, "write_text", _raise_for(".write-test", errno.EROFS, Path.write_text))
    fail_if_called(monkeypatch)
    code, err = run_cli(capsys, mcq_experiment(out), tmp_path)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and str(out) in lines[0] and fragment in lines[0], err
    assert "choose a writable output_dir" in lines[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir_fails_before_training(tmp_path, mcq_experiment, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    fail_if_called(monkeypatch)
    code, err = run_cli(capsys, mcq_experiment(out), tmp_path)
    assert code == 2 and "Permission denied" in err and len(err.strip().splitlines()) == 1


def test_disk_full_mid_run_is_one_line_and_resumes(tmp_path, mcq_experiment, monkeypatch, capsys):
    """The disk fills when stage 1 is marked done: that job fails with the path and the fix, the run stops, and the
    same command resumes once there is space."""
    import chaintune.io as io

    real_replace = os.replace

    def full_disk(src, dst):
        if Path(dst).name == "node.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", full_disk)
    cfg = mcq_experiment(tmp_path / "out")
    code, _ = run_cli(capsys, cfg, tmp_path)
    failures = json.loads((tmp_path / "out" / "sweep" / "failures.json").read_text())
    errors = [f["error"] for f in failures.values()]  # stage 1's job, and stage 2's that depends on it
    assert code == 1 and any("node.json" in e and "No space left on device" in e and "rerun" in e for e in errors)
    monkeypatch.setattr(io.os, "replace", real_replace)
    assert run_cli(capsys, cfg, tmp_path)[0] == 0
    quiet(mcq_experiment(tmp_path / "ref"))
    assert_same_results(tmp_path / "out", tmp_path / "ref")


# ---------------------------------------------------------------------------------------------- loss
def test_infinite_loss_stops_the_stage_with_step_and_lr(tmp_path, mcq_experiment, monkeypatch):
    import chaintune.train as train

    calls = []
    real_loss = train.answer_loss_sum

    def loss_inf_at_step_3(*args, **kwargs):
        calls.append(1)
        loss, n = real_loss(*args, **kwargs)
        return (loss * float("inf") if len(calls) == 3 else loss), n

    monkeypatch.setattr(train, "answer_loss_sum", loss_inf_at_step_3)
    outcome = chaintune.run(mcq_experiment(tmp_path / "out"), echo=lambda *_: None, progress=False)
    error = next(f["error"] for f in outcome.failed.values() if f["node"].startswith("s1-"))
    assert error.startswith(f"{DivergedError.__name__}: ") and issubclass(DivergedError, TrainingError)
    assert issubclass(TrainingError, ChaintuneError)
    assert re.search(r"loss is inf at step 3/8 \(lr=0\.001\)", error) and "\n" not in error
    (stage,) = (tmp_path / "out" / "stages").glob("s1-*")
    assert not (stage / "node.json").exists() and not (stage / "checkpoint").exists()
