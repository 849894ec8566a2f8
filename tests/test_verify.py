"""`chaintune verify` and the reproducibility record: stored checkpoints re-evaluated exactly in the same environment
(within a tolerance elsewhere); tampered accuracies, corrupt and released checkpoints reported; every run stores its
resolved config, package versions, device, seeds, data file hashes and git sha, and refuses changed data files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

import chaintune
from chaintune.cli import main
from chaintune.errors import ChaintuneError
from chaintune.io import file_sha256
from chaintune.provenance import PACKAGES, data_file_hashes
from chaintune.tasks import get_task, task_names
from chaintune.verify import EXIT_MISMATCH, EXIT_OK, EXIT_UNVERIFIABLE, verdict, verify_run

VARIANTS = {"full": {}, "lora": {"training": {"lr": 1e-2, "batch_size": 2, "method": "lora", "lora": {"r": 2, "alpha": 4}}},
            "released": {"keep_checkpoints": False}}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, mcq_config, module_isolation) -> dict[str, Path]:
    """Finished two-stage runs, made once per module: full fine-tuning, LoRA, and checkpoints not kept."""
    root = tmp_path_factory.mktemp("verify")
    for name, overrides in VARIANTS.items():
        chaintune.run(mcq_config(root / name, **overrides), echo=lambda *_: None, progress=False)
    return {name: root / name for name in VARIANTS}


@pytest.fixture
def run_copy(finished, tmp_path, mcq_experiment):
    """A copy of one finished run, free to tamper with."""
    def copy(name: str) -> Path:
        return Path(shutil.copytree(finished[name], tmp_path / name))
    return copy


def verify_cli(capsys, run_dir: Path, *args: str) -> tuple[int, str]:
    code = main(["verify", str(run_dir), "--no-progress", *args])
    return code, capsys.readouterr().out


@pytest.mark.parametrize("name", ["full", "lora"])
def test_verify_reproduces_every_stored_accuracy_exactly(run_copy, capsys, name):
    run_dir = run_copy(name)
    table, notes = verify_run(run_dir)
    assert len(table) == 6 and not notes  # base + 2 stages × 2 tasks
    assert (table.status == "ok").all() and (table.check == "exact").all() and (table.changed == 0).all()
    assert (table.acc == table.stored_acc).all() and (table.acc_norm == table.stored_acc_norm).all()
    code, out = verify_cli(capsys, run_dir)
    assert code == EXIT_OK and "verified: all 6 stored evaluations reproduced" in out


def test_verify_reports_a_tampered_accuracy(run_copy, capsys):
    run_dir = run_copy("full")
    (path,) = run_dir.glob("stages/s2-*/eval/mcq_a.json")
    path.write_text(json.dumps(json.loads(path.read_text()) | {"acc": 99.0}))
    table, _ = verify_run(run_dir)
    assert list(table[table.status != "ok"].stage.str[:2]) == ["s2"]
    code, out = verify_cli(capsys, run_dir)
    assert code == EXIT_MISMATCH and "MISMATCH" in out and "FAILED: 1 of 6" in out


def test_verify_reports_a_corrupt_checkpoint(run_copy, capsys):
    run_dir = run_copy("full")
    (weights,) = run_dir.glob("stages/s1-*/checkpoint/model.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    table, _ = verify_run(run_dir)
    assert set(table[table.stage.str.startswith("s1")].status) == {"corrupt checkpoint"}
    assert (table[~table.stage.str.startswith("s1")].status == "ok").all()  # s2 is a full checkpoint of its own
    assert verify_cli(capsys, run_dir)[0] == EXIT_MISMATCH


def test_verify_says_when_checkpoints_were_released(run_copy, capsys):
    run_dir = run_copy("released")
    assert not list(run_dir.glob("stages/*/checkpoint"))
    table, _ = verify_run(run_dir)
    assert set(table[table.stage.str.startswith("s")].status) == {"released checkpoint"}
    assert (table[table.stage.str.startswith("base")].status == "ok").all()
    code, out = verify_cli(capsys, run_dir)
    assert code == EXIT_UNVERIFIABLE
    assert "4 cannot be checked because their stage checkpoints were released (keep_checkpoints: false)" in out


def test_verify_in_another_environment_allows_the_stated_tolerance(run_copy):
    """Stored evaluations from another torch version: accuracies must agree within --tolerance pp, not exactly."""
    run_dir = run_copy("full")
    for path in run_dir.glob("stages/*/eval/*.json"):
        stored = json.loads(path.read_text())
        stored["env"]["torch"] = "0.0.0"
        path.write_text(json.dumps(stored | ({"acc": stored["acc"] + 0.5} if "s1-" in str(path) else {})))
    table, _ = verify_run(run_dir)
    assert (table.check == "±1 pp").all() and (table.status == "ok").all()
    table, _ = verify_run(run_dir, tolerance=0.25)
    assert set(table[table.status != "ok"].stage.str[:2]) == {"s1"}


def test_verdict_without_rows_of_a_kind():
    import pandas as pd

    assert verdict(pd.DataFrame({"status": ["ok", "ok"]}))[0] == EXIT_OK
    assert verdict(pd.DataFrame({"status": ["ok", "released checkpoint", "MISMATCH"]}))[0] == EXIT_MISMATCH


def test_verify_of_a_folder_that_is_no_run(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert "not a chaintune run directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ reproducibility record
def test_every_run_records_config_versions_device_seeds_data_hashes_git_sha(finished, mcq_data_dir):
    run_dir = finished["full"]
    config = yaml.safe_load((run_dir / "experiment.yaml").read_text())
    assert config["seeds"] == [0] and config["split_seed"] == 0 and config["data_seed"] == 0
    assert config["training"]["lr"] == 1e-3 and config["training"]["betas"] == [0.9, 0.999]  # defaults resolved
    env = json.loads((run_dir / "environment.json").read_text())
    assert set(env["packages"]) == set(PACKAGES) and env["packages"]["torch"]
    assert env["device"] == "cpu" or env["device"].startswith("cuda")
    assert "git_sha" in env  # None outside a git checkout
    assert env["data_files"] == {f"{t}.jsonl": file_sha256(mcq_data_dir / f"{t}.jsonl")  # user files, under data_dir
                                 for t in ("mcq_a", "mcq_b")}
    for path in run_dir.glob("stages/*/eval/*.json"):
        assert set(json.loads(path.read_text())["env"]) == {"device", "device_name", "dtype", "torch"}
    assert all(json.loads(p.read_text())["seed"] == 0 for p in run_dir.glob("stages/s*/node.json"))


def test_builtin_tasks_declare_the_files_they_read(real_data_dir):
    """provenance hashes exactly what the loaders declare: every built-in task's files, nothing else."""
    builtin = [t for t in task_names() if get_task(t).needs_data_dir]
    assert all(get_task(t).data_files for t in builtin)
    hashes = data_file_hashes(real_data_dir, ["toxigenqa", "arc_easy"])
    assert sorted(hashes) == ["arc/ARC-Easy_hf_format/test.json", "arc/ARC-Easy_hf_format/train.json",
                              "arc/ARC-Easy_hf_format/validation.json", "toxigen/annotated/annotated_train.csv"]
    assert hashes["toxigen/annotated/annotated_train.csv"] == file_sha256(
        real_data_dir / "toxigen/annotated/annotated_train.csv")


def test_resuming_after_a_data_file_changed_is_refused(tmp_path, mcq_experiment, mcq_data_dir, monkeypatch):
    import chaintune.stage as stage_mod

    data = tmp_path / "data"
    shutil.copytree(mcq_data_dir, data)
    cfg = mcq_experiment(tmp_path / "out", chains=[{"name": "a", "stages": [{"task": "mcq_a"}]}],
                         custom_tasks=[{"name": t, "path": str(data / f"{t}.jsonl"), "group": "grp"}
                                       for t in ("mcq_a", "mcq_b")])
    chaintune.run(cfg, echo=lambda *_: None, progress=False)
    with open(data / "mcq_a.jsonl", "a") as fh:
        fh.write(json.dumps({"question": "one more?", "choices": ["yes", "no"], "answer": 0, "grp": "g0"}) + "\n")
    monkeypatch.setattr(stage_mod, "train_stage", lambda *a, **k: pytest.fail("trained on changed data"))
    with pytest.raises(ChaintuneError, match=r"data file\(s\) .*mcq_a\.jsonl changed since .* was started"):
        chaintune.run(cfg, echo=lambda *_: None, progress=False)
