"""Experiment trackers (issue 23): what TensorBoard, MLflow and W&B (offline) received is read back from their
files and compared with the run directory's records; resumes send nothing twice; a tracker added to a finished
run receives all of it; a missing package is one line before any training."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pandas as pd
import pytest
from test_cli import assert_one_line_error
from test_hostile import NO_GATE, experiment, quiet_run

import chaintune
from chaintune import trackers
from chaintune.cli import main
from chaintune.config import validate_config
from chaintune.plan import build_tree, run_identity
from chaintune.rundir import RunDir

ALL = ["tensorboard", "mlflow", "wandb"]
CURVATURE = {"curvature": {"after": ["first"], "examples": 2, "subsets": 1, "micro_batch": 2, "max_iter": 2,
                           "method": "power"}}


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensorboard_texts(folder: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    acc.Reload()
    return set(acc.Tags()["tensors"])


def mlflow_runs(out: Path, experiment: str) -> dict[str, object]:
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # as chaintune.trackers does for its file store
    client = MlflowClient(tracking_uri=(out / "trackers" / "mlflow").as_uri())
    found = client.get_experiment_by_name(experiment)
    return {r.info.run_name: r for r in client.search_runs([found.experiment_id])}


def mlflow_history(out: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "trackers" / "mlflow").as_uri())
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def wandb_history(out: Path) -> dict[str, list[dict[str, float]]]:
    """Every offline W&B run's logged rows, by run name, read from its .wandb file (a log of 32 KiB blocks of
    protobuf records, each with a 7-byte header: CRC, length, fragment type; after a 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows: dict[str, list[dict[str, float]]] = {}
    for path in sorted((out / "trackers" / "wandb").glob("wandb/offline-run-*/*.wandb")):
        data, pos, buffer, name = path.read_bytes(), 7, b"", None
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            buffer, pos = buffer + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # a whole record, or the last fragment of one
                record = pb.Record()
                record.ParseFromString(buffer)
                buffer = b""
                if record.WhichOneof("record_type") == "run":
                    name = record.run.display_name
                elif record.WhichOneof("record_type") == "history":
                    items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                    rows.setdefault(name, []).append({k: v for k, v in items.items() if not k.startswith("_")})
    return rows


def stored(out: Path, run_id: str) -> dict[str, object]:
    """What the run directory holds of a run: its stages' curves and evaluations, its forgetting."""
    rd = RunDir(out)
    record = rd.run(run_id)
    curves = [rd.train_curve(n) for n in record.stages[1:]]
    return {"loss": [v for c in curves for v in c.loss], "lr": [v for c in curves for v in c.lr],
            "acc": {t: [rd.evaluation(n, t).acc for n in record.stages] for t in record.eval_tasks},
            "metrics": rd.run_metrics(run_id), "stages": record.stages}


@pytest.fixture(scope="module")
def logged(tmp_path_factory, mcq_config, mcq_data_dir, module_isolation) -> Path:
    """A finished two-chain run without trackers, then the same command with all three: everything is back-filled
    from the records, and nothing is trained again."""
    out = tmp_path_factory.mktemp("trackers") / "out"
    cfg = experiment(mcq_config, mcq_data_dir, out, **NO_GATE, **CURVATURE)
    assert not quiet_run(cfg).failed
    assert not (out / "trackers").exists()
    outcome = quiet_run(cfg | {"logging": {"trackers": ALL}})
    assert outcome.jobs_run == 0 and sorted(outcome.completed_runs) == ["ab-seed0", "ba-seed0"]
    return out


def test_tensorboard_event_files_hold_curves_evaluations_and_forgetting(logged):
    truth = stored(logged, "ab-seed0")
    scalars = tensorboard_scalars(logged / "trackers" / "tensorboard" / "ab-seed0")
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 9))  # 4 steps per stage, counted across stages
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(truth["loss"], rel=1e-6)
    assert [v for _, v in scalars["train/lr"]] == pytest.approx(truth["lr"], rel=1e-6)
    assert all(v > 0 for _, v in scalars["train/tokens_per_second"]) and len(scalars["train/grad_norm"]) == 8
    for task, accs in truth["acc"].items():
        assert scalars[f"eval/{task}/acc"] == [(i, pytest.approx(a, rel=1e-6)) for i, a in enumerate(accs)]
        assert {f"eval/{task}/group/g0/acc", f"eval/{task}/group/g1/acc"} <= set(scalars)
    (lam,) = scalars["curvature/lambda_max"]
    assert lam == (1, pytest.approx(truth["metrics"]["curvature"][0]["lambda_max"], rel=1e-6))
    (row,) = truth["metrics"]["forgetting"]
    assert scalars[f"final/forgetting/{row['task']}/F"] == [(2, pytest.approx(row["F"], rel=1e-6, abs=1e-9))]
    assert {"tables/forgetting/text_summary", "tables/accuracy_matrix/text_summary",
            "params/stage1.lr/text_summary"} <= tensorboard_texts(logged / "trackers" / "tensorboard" / "ab-seed0")


def test_mlflow_file_store_holds_named_runs_params_metrics_and_tables(logged):
    from mlflow.tracking import MlflowClient

    runs = mlflow_runs(logged, "mcq")
    assert sorted(runs) == ["ab-seed0", "ba-seed0"]
    run = runs["ba-seed0"]
    truth = stored(logged, "ba-seed0")
    assert run.info.status == "FINISHED"
    assert run.data.tags["chain"] == "ba" and run.data.tags["seed"] == "0"
    assert run.data.params["stage1.task"] == "mcq_b" and float(run.data.params["stage2.lr"]) == 1e-3
    assert [v for _, v in mlflow_history(logged, run.info.run_id, "train/loss")] == pytest.approx(truth["loss"])
    assert [v for _, v in mlflow_history(logged, run.info.run_id, "eval/mcq_a/acc")] == pytest.approx(
        truth["acc"]["mcq_a"])
    client = MlflowClient(tracking_uri=(logged / "trackers" / "mlflow").as_uri())
    table = pd.read_csv(client.download_artifacts(run.info.run_id, "tables/forgetting.csv"))
    assert table.F.tolist() == pytest.approx([r["F"] for r in truth["metrics"]["forgetting"]])


def test_wandb_offline_runs_hold_the_curves(logged):
    rows = wandb_history(logged)
    assert sorted(rows) == ["ab-seed0", "ba-seed0"]
    truth = stored(logged, "ab-seed0")
    train = [r for r in rows["ab-seed0"] if "train/loss" in r]
    assert [r["train/step"] for r in train] == list(range(1, 9))
    assert [r["train/loss"] for r in train] == pytest.approx(truth["loss"])
    evals = [r for r in rows["ab-seed0"] if "eval/mcq_b/acc" in r]
    assert [(r["stage"], r["eval/mcq_b/acc"]) for r in evals] == [
        (i, pytest.approx(a)) for i, a in enumerate(truth["acc"]["mcq_b"])]


def test_a_rerun_sends_nothing_twice(logged, mcq_config, mcq_data_dir, isolated):
    cfg = experiment(mcq_config, mcq_data_dir, logged, **NO_GATE, **CURVATURE) | {"logging": {"trackers": ALL}}
    before = tensorboard_scalars(logged / "trackers" / "tensorboard" / "ab-seed0")
    run_id = mlflow_runs(logged, "mcq")["ab-seed0"].info.run_id
    assert quiet_run(cfg).jobs_run == 0
    assert tensorboard_scalars(logged / "trackers" / "tensorboard" / "ab-seed0") == before
    assert len(mlflow_history(logged, run_id, "train/loss")) == 8 and len(mlflow_runs(logged, "mcq")) == 2
    state = json.loads((logged / "trackers" / "state.json").read_text())
    assert state["mlflow"]["ab-seed0"] == {"stages": 3, "final": True, "id": run_id}


def test_sweep_runs_are_logged_stage_by_stage_and_named_by_chain_seed_and_point(tmp_path, mcq_config,
                                                                                mcq_data_dir, isolated, monkeypatch):
    out = tmp_path / "out"
    sent: list[tuple[str, str, int]] = []
    send = trackers.Trackers._send

    def spy(self, tracker, point, run, state, done, metrics):
        sent.append((tracker, run.run_id, done))
        return send(self, tracker, point, run, state, done, metrics)

    monkeypatch.setattr(trackers.Trackers, "_send", spy)
    cfg = experiment(mcq_config, mcq_data_dir, out, **NO_GATE, sweep={"product": {"training.lr": [1e-3, 3e-3]}},
                     chains=[{"name": "ab", "stages": [{"task": "mcq_a"}, {"task": "mcq_b"}]}],
                     logging={"trackers": ["tensorboard", "mlflow"]})
    assert not quiet_run(cfg).failed
    names = ["ab-seed0-lr0.001", "ab-seed0-lr0.003"]
    assert sorted(p.name for p in (out / "trackers" / "tensorboard").iterdir()) == names
    runs = mlflow_runs(out, "mcq")
    assert sorted(runs) == names and runs[names[1]].data.tags["sweep_point"] == "lr=0.003"
    # sent as the stages finished (base, stage 1, stage 2), then the forgetting tables at the end
    assert [d for t, r, d in sent if (t, r) == ("mlflow", names[0])] == [1, 2, 3, 3]
    for name in names:
        steps = [s for s, _ in tensorboard_scalars(out / "trackers" / "tensorboard" / name)["train/loss"]]
        assert steps == list(range(1, 9))


def test_a_failing_tracker_is_a_warning_and_the_next_run_sends_the_rest(tmp_path, mcq_config, mcq_data_dir,
                                                                        isolated, monkeypatch):
    out = tmp_path / "out"
    cfg = experiment(mcq_config, mcq_data_dir, out, **NO_GATE, chains=[{"name": "ab", "stages": [{"task": "mcq_a"}]}],
                     logging={"trackers": ["tensorboard"]})

    def broken(self, name, df):
        raise OSError("disk full")

    lines: list[str] = []
    with monkeypatch.context() as patched:
        patched.setattr(trackers.TensorBoardRun, "table", broken)
        assert not chaintune.run(cfg, echo=lines.append, progress=False).failed
    assert any("tensorboard tracker failed on ab-seed0 (OSError: disk full)" in line for line in lines)
    assert json.loads((out / "trackers" / "state.json").read_text())["tensorboard"]["ab-seed0"] == {
        "stages": 2, "final": False}
    assert quiet_run(cfg).jobs_run == 0
    scalars = tensorboard_scalars(out / "trackers" / "tensorboard" / "ab-seed0")
    assert len(scalars["train/loss"]) == 4 and "tables/forgetting/text_summary" not in scalars
    assert json.loads((out / "trackers" / "state.json").read_text())["tensorboard"]["ab-seed0"]["final"]


def test_a_missing_tracker_package_is_one_line_before_any_training(tmp_path, mcq_config, mcq_data_dir, capsys,
                                                                   monkeypatch, isolated):
    import yaml

    monkeypatch.setitem(trackers.PACKAGES, "mlflow", "chaintune_no_such_package")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(experiment(mcq_config, mcq_data_dir, tmp_path / "out", **NO_GATE)))
    code = main(["run", str(config), "--tracker", "tensorboard", "--tracker", "mlflow", "--no-progress"])
    assert_one_line_error(code, capsys.readouterr().err, "mlflow tracker", "chaintune[trackers]")
    assert not (tmp_path / "out" / "stages").exists()


def test_logging_changes_no_stage_or_run_identity(tmp_path, mcq_config, mcq_data_dir):
    plain = experiment(mcq_config, mcq_data_dir, tmp_path)
    logged = plain | {"logging": {"trackers": ALL, "wandb_project": "p", "wandb_mode": "online"}}
    (runs_a, nodes_a, _), (runs_b, nodes_b, _) = (build_tree(validate_config(c)) for c in (plain, logged))
    assert [n.key for n in nodes_a] == [n.key for n in nodes_b]
    assert [run_identity(validate_config(plain), r) for r in runs_a] == [
        run_identity(validate_config(logged), r) for r in runs_b]


def test_metric_names_are_safe_for_every_tracker():
    assert trackers.metric_key("eval", "toxigenqa", "group", "lgbtq+ people", "acc") == \
        "eval/toxigenqa/group/lgbtq__people/acc"


def test_jobs_in_worker_processes_are_logged_by_the_driver(tmp_path, mcq_config, mcq_data_dir, isolated):
    """With 2 spawned workers, the driver logs every stage from the records (the workers import no tracker)."""
    out = tmp_path / "out"
    cfg = experiment(mcq_config, mcq_data_dir, out, **NO_GATE, executor={"workers": 2, "retries": 0},
                     logging={"trackers": ["tensorboard"]})
    assert not quiet_run(cfg).failed
    for run_id in ("ab-seed0", "ba-seed0"):
        truth = stored(out, run_id)
        scalars = tensorboard_scalars(out / "trackers" / "tensorboard" / run_id)
        assert [v for _, v in scalars["train/loss"]] == pytest.approx(truth["loss"], rel=1e-6)
        assert len(scalars["eval/mcq_a/acc"]) == 3 and any(k.startswith("final/forgetting/") for k in scalars)
