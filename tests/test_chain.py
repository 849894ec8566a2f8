"""Chain engine on a tiny random model: results, prefix reuse, LR 0, determinism, resume after SIGKILL, NaN loss."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

import chaintune
from chaintune.config import validate_config
from chaintune.plan import build_tree
from chaintune.train import DivergedError


def experiment(tmp_path: Path, model_dir: Path, data_dir: Path, **overrides) -> dict:
    cfg = {
        "name": "t", "model": str(model_dir), "data_dir": str(data_dir), "output_dir": str(tmp_path / "out"),
        "tasks": {"toxigenqa": {"train_limit": 16, "eval_limit": 40}, "arc_easy": {"train_limit": 16, "eval_limit": 20}},
        "training": {"lr": 1e-3, "batch_size": 4, "checkpoint_every": 2},
        "chains": [{"name": "tox_arc", "stages": [{"task": "toxigenqa"}, {"task": "arc_easy"}]}],
        "quality_gate": {"validation_size": 0},  # tiny random models learn nothing: see test_gate.py for the gate
    }
    cfg.update(overrides)
    return cfg


def run(cfg: dict) -> pd.DataFrame:
    """The one driver, quiet; a failed job fails the test with its error."""
    outcome = chaintune.run(cfg, echo=lambda *_: None, progress=False)
    assert not outcome.failed, outcome.failed
    return outcome.results


def test_results_table_and_run_folder(tmp_path, tiny_model_dir, real_data_dir):
    results = run(experiment(tmp_path, tiny_model_dir, real_data_dir))
    out = tmp_path / "out"
    overall = results[results.group == "ALL"]
    assert sorted(overall.stage.unique()) == [0, 1, 2]
    assert set(overall.eval_task) == {"toxigenqa", "arc_easy"}
    parquet, csv = pd.read_parquet(out / "results.parquet"), pd.read_csv(out / "results.csv")
    assert len(parquet) == len(csv) == len(results) and parquet.acc.tolist() == pytest.approx(csv.acc.tolist())
    folder = out / "runs" / "tox_arc-seed0"
    for name in ("accuracy_matrix.csv", "group_accuracy.csv", "predictions.parquet", "train_curves.csv",
                 "metrics.json", "run.json"):
        assert (folder / name).is_file(), name
    groups = results[(results.eval_task == "toxigenqa") & (results.group != "ALL")]
    assert len(groups.group.unique()) == 13 and groups.groupby("stage").n.sum().eq(40).all()
    for f in ("experiment.yaml", "environment.json"):
        assert (out / f).is_file()
    curve = pd.read_csv(folder / "train_curves.csv")
    assert list(curve.groupby("stage").step.max()) == [4, 4]  # 16 examples / batch 4, per stage


def test_shared_first_stage_is_trained_once(tmp_path, tiny_model_dir, real_data_dir, monkeypatch):
    import chaintune.stage as stage_mod

    calls = []
    real_train = stage_mod.train_stage
    monkeypatch.setattr(stage_mod, "train_stage", lambda *a, **k: calls.append(k["desc"]) or real_train(*a, **k))
    cfg = experiment(tmp_path, tiny_model_dir, real_data_dir, chains=[
        {"name": "a", "stages": [{"task": "toxigenqa"}, {"task": "arc_easy"}]},
        {"name": "b", "stages": [{"task": "toxigenqa"}, {"task": "arc_easy", "lr": 5e-4}]}])
    runs, nodes, _ = build_tree(validate_config(cfg))
    nodes = nodes[1:]  # trained stages, without the base model
    assert len(runs) == 2 and len(nodes) == 3
    results = run(cfg)
    assert len(calls) == 3 and sum(c.startswith("s1-toxigenqa") for c in calls) == 1
    stage1 = results[(results.stage == 1) & (results.group == "ALL")]
    assert stage1.groupby("eval_task").acc.nunique().eq(1).all()  # both chains see the same stage-1 model


def test_zero_learning_rate_gives_zero_forgetting(tmp_path, tiny_model_dir, real_data_dir):
    cfg = experiment(tmp_path, tiny_model_dir, real_data_dir,
                     chains=[{"name": "c", "stages": [{"task": "toxigenqa"}, {"task": "arc_easy", "lr": 0.0}]}])
    run(cfg)
    metrics = yaml.safe_load((tmp_path / "out" / "runs" / "c-seed0" / "metrics.json").read_text())
    (forg,) = metrics["forgetting"]
    assert forg["task"] == "toxigenqa" and forg["F"] == 0.0 and forg["RF"] == 0.0
    assert all(g["F_g"] == 0.0 for g in metrics["group_forgetting"])


def test_same_seed_same_results_different_seed_differs(tmp_path, tiny_model_dir, real_data_dir):
    a = run(experiment(tmp_path / "a", tiny_model_dir, real_data_dir))
    b = run(experiment(tmp_path / "b", tiny_model_dir, real_data_dir))
    run(experiment(tmp_path / "c", tiny_model_dir, real_data_dir, seeds=[1]))
    cols = ["stage", "eval_task", "group", "acc", "acc_norm"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    curve = lambda p, s: pd.read_csv(p / "out" / "runs" / f"tox_arc-seed{s}" / "train_curves.csv").loss  # noqa: E731
    assert curve(tmp_path / "a", 0).equals(curve(tmp_path / "b", 0))
    assert not curve(tmp_path / "a", 0).equals(curve(tmp_path / "c", 1))


def test_lora_chain_runs_and_checkpoints_adapter(tmp_path, tiny_model_dir, real_data_dir):
    cfg = experiment(tmp_path, tiny_model_dir, real_data_dir, training={
        "method": "lora", "lr": 1e-2, "batch_size": 4, "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}})
    results = run(cfg)
    ckpts = sorted((tmp_path / "out" / "stages").glob("s*/checkpoint"))
    assert len(ckpts) == 2 and all((c / "adapter_model.safetensors").is_file() for c in ckpts)
    assert results.stage.max() == 2


def test_nan_loss_stops_with_step_and_lr(tmp_path, tiny_model_dir, real_data_dir):
    # lr 1 (the largest allowed) with weight decay 10: each step scales the weights by 1 − 10, so they blow up
    cfg = experiment(tmp_path, tiny_model_dir, real_data_dir, training={"lr": 1, "weight_decay": 10, "epochs": 3,
                                                                      "batch_size": 4, "max_grad_norm": None})
    outcome = chaintune.run(cfg, echo=lambda *_: None, progress=False)
    failure = next(f for f in outcome.failed.values() if f["node"].startswith("s1-"))  # stage 2: not run
    assert failure["error"].startswith(DivergedError.__name__) and re.search(r"at step \d+/\d+ \(lr=1\)",
                                                                         failure["error"])
    assert failure["attempts"] == 1  # an input error: not retried


def _kill_mid_stage(cmd: list[str], out: Path, timeout: float = 120) -> bool:
    """Start `cmd`, SIGKILL it as soon as a stage has a mid-stage resume state; True if killed mid-stage."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while proc.poll() is None and time.time() < deadline:
            for state in (out / "stages").glob("s*/work/attempt*/resume.json"):
                if not (state.parents[2] / "node.json").exists():
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return True
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return False


def test_sigkill_mid_stage_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir, real_data_dir):
    overrides = {"tasks": {"toxigenqa": {"train_limit": 48, "eval_limit": 40}, "arc_easy": {"train_limit": 48,
                                                                                           "eval_limit": 20}},
                 "training": {"lr": 1e-3, "batch_size": 2, "checkpoint_every": 3}}
    reference = run(experiment(tmp_path / "ref", tiny_model_dir, real_data_dir, **overrides))
    cfg = experiment(tmp_path / "killed", tiny_model_dir, real_data_dir, **overrides)
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "chaintune.cli", "run", str(cfg_path), "--no-progress"]
    assert _kill_mid_stage(cmd, tmp_path / "killed" / "out"), "the run finished before it could be killed"
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    resumed = pd.read_parquet(tmp_path / "killed" / "out" / "results.parquet")
    cols = ["chain", "seed", "stage", "eval_task", "group", "n", "acc", "acc_norm"]
    pd.testing.assert_frame_equal(reference[cols], resumed[cols])
    assert not list((tmp_path / "killed" / "out").rglob("*.tmp"))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_curvature_after_first_stage_is_stored_and_summarized(tmp_path, tiny_model_dir, real_data_dir, method):
    from chaintune.analysis import summary_tables

    cfg = experiment(tmp_path, tiny_model_dir, real_data_dir, seeds=[0, 1, 2],
                     training={"lr": 1e-3, "batch_size": 4, "method": method, "lora": {"r": 2, "alpha": 4}},
                     curvature={"after": ["first"], "examples": 8, "max_iter": 20,
                                "method": "power" if method == "full" else "lanczos"})
    run(cfg)
    stored = sorted((tmp_path / "out" / "stages").glob("*/curvature.json"))
    assert [p.parent.name.split("-")[0] for p in stored] == ["s1"] * 3
    assert {json.loads(p.read_text())["method"] for p in stored} == {"power" if method == "full" else "lanczos"}
    tables = summary_tables(tmp_path / "out")
    assert tables["curvature"].lambda_max.notna().all()
    corr = tables["curvature_vs_forgetting"]
    assert set(corr[corr.group == "ALL"].target) == {"F", "RF"} and (corr.n >= 3).any()
    if method == "lora":
        n_params = yaml.safe_load(stored[0].read_text())["n_parameters"]
        assert n_params < 5000  # the adapter only, not the whole model


def test_sam_and_l2_prev_train_and_differ_from_adamw(tmp_path, tiny_model_dir, real_data_dir):
    def curve(name: str, **training) -> pd.Series:
        cfg = experiment(tmp_path / name, tiny_model_dir, real_data_dir,
                         training={"lr": 1e-3, "batch_size": 4, **training},
                         chains=[{"name": "c", "stages": [{"task": "toxigenqa"}]}], eval_tasks=["toxigenqa"])
        run(cfg)
        return pd.read_csv(tmp_path / name / "out" / "runs" / "c-seed0" / "train_curves.csv").loss

    adamw, sam, l2 = curve("adamw"), curve("sam", optimizer="sam", sam_rho=0.5), curve("l2", l2_prev=100.0)
    assert adamw.iloc[0] == sam.iloc[0] == l2.iloc[0]  # same weights and batch at step 1
    assert not adamw.equals(sam) and not adamw.equals(l2)


@pytest.mark.parametrize("fraction, balance", [(0.05, "none"), (0.25, "none"), (0.1, "groups")])
def test_replay_mixture_composition(tmp_path, tiny_model_dir, real_data_dir, fraction, balance):
    from collections import Counter

    from chaintune.plan import Settings
    from chaintune.stage import stage_examples
    from chaintune.tasks import load_splits

    cfg = validate_config(experiment(tmp_path, tiny_model_dir, real_data_dir, tasks={"arc_easy": {"train_limit": 200}},
                                     chains=[{"name": "r", "stages": [{"task": "arc_easy", "replay": {
                                         "task": "toxigenqa", "fraction": fraction, "balance": balance}}]}]))
    mixed = stage_examples(Settings.of(cfg), cfg.chains[0].stages[0], seed=0)
    replayed = [e for e in mixed if e.id.startswith("toxigen")]
    n = len(mixed)
    assert len(replayed) == round(fraction * n) and n - len(replayed) == 200
    test_ids = {e.id for e in load_splits("toxigenqa", real_data_dir)["test"]}
    assert not test_ids & {e.id for e in replayed} and len({e.id for e in replayed}) == len(replayed)
    if balance == "groups":
        counts = Counter(e.group for e in replayed).values()
        assert max(counts) - min(counts) <= 1
    assert stage_examples(Settings.of(cfg), cfg.chains[0].stages[0], seed=0) == mixed  # seeded


def test_allocate_by_hand():
    from chaintune.stage import allocate

    assert allocate(10, {"a": 3.0, "b": 1.0, "c": 0.0}) == {"a": 8, "b": 2, "c": 0}  # 7.5, 2.5: tie → a
    assert allocate(10, {"a": 3.0, "b": -2.0}) == {"a": 10, "b": 0}  # negative forgetting = none
    assert allocate(5, {"a": 0.0, "b": 0.0, "c": 0.0}) == {"a": 2, "b": 2, "c": 1}  # nothing forgotten: equal


def test_targeted_replay_follows_group_forgetting(tmp_path, tiny_model_dir, real_data_dir):
    from chaintune.rundir import RunDir
    from chaintune.stage import allocate, replay_group_forgetting

    cfg = validate_config(experiment(tmp_path, tiny_model_dir, real_data_dir, chains=[{"name": "t", "stages": [
        {"task": "toxigenqa"}, {"task": "arc_easy", "lr": 1e-2},
        {"task": "arc_easy", "name": "targeted", "replay": {"task": "toxigenqa", "fraction": 0.5, "balance": "targeted"}}]}]))
    run(cfg)
    out, nodes = RunDir(cfg.output_dir), build_tree(cfg)[1][1:]
    before = out.evaluation(nodes[0].dirname, "toxigenqa").per_group
    after = out.evaluation(nodes[1].dirname, "toxigenqa").per_group
    forgetting = {g: before[g]["acc"] - after[g]["acc"] for g in before}
    assert replay_group_forgetting(out, nodes[-1]) == forgetting
    expected = {g: k for g, k in allocate(16, forgetting).items() if k}  # f = 0.5 of 16 arc examples → 16 replayed
    assert out.node(nodes[-1].dirname).replayed_per_group == dict(sorted(expected.items()))
    bad = experiment(tmp_path / "b", tiny_model_dir, real_data_dir, chains=[{"name": "t", "stages": [
        {"task": "arc_easy", "replay": {"task": "toxigenqa", "fraction": 0.5, "balance": "targeted"}}]}])
    outcome = chaintune.run(bad, echo=lambda *_: None, progress=False)
    (failure,) = outcome.failed.values()
    assert "no earlier stage trained on it" in failure["error"] and outcome.incomplete_runs == ["t-seed0"]


def test_changed_curvature_settings_are_measured_again(tmp_path, mcq_experiment):
    """A stored λ_max is reused only for the curvature settings that measured it (memory-only settings aside)."""
    import chaintune

    def run_with(curvature: dict) -> dict:
        cfg = mcq_experiment(tmp_path / "out", chains=[{"name": "a", "stages": [{"task": "mcq_a"}]}],
                             eval_tasks=["mcq_a"], curvature={"subsets": 1, "max_iter": 5, **curvature})
        assert chaintune.run(cfg, progress=False, echo=lambda *_: None).completed_runs
        return json.loads(next((tmp_path / "out" / "stages").glob("s1-*/curvature.json")).read_text())

    first = run_with({"examples": 4, "micro_batch": 2})
    assert first["n_examples"] == 4 and first["settings"]["examples"] == 4
    assert run_with({"examples": 4, "micro_batch": 4, "graph_budget": 1e6}) == first  # memory only: kept
    assert run_with({"examples": 6, "micro_batch": 2})["n_examples"] == 6  # another subset size: measured again
    # records from before the settings were stored: one subset's λ_max is the pooled estimator's; a mean over
    # several subsets (the earlier estimator) is not, nor is a largest-magnitude value when `largest` is asked for
    path = next((tmp_path / "out" / "stages").glob("s1-*/curvature.json"))
    legacy = {k: v for k, v in json.loads(path.read_text()).items() if k != "settings"}
    path.write_text(json.dumps(legacy | {"lambda_max": 123.0}))
    assert run_with({"examples": 6, "micro_batch": 2})["lambda_max"] == 123.0
    assert run_with({"examples": 6, "micro_batch": 2, "eigenvalue": "largest"})["lambda_max"] != 123.0
    path.write_text(json.dumps(legacy | {"lambda_max": 123.0, "lambda_max_subsets": [100.0, 146.0]}))
    assert run_with({"examples": 6, "micro_batch": 2})["lambda_max"] != 123.0
