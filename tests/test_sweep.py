"""Sweeps on a tiny random model: grid expansion, prefix reuse across points, 2 local workers, Ray, killing the
driver midway, failures with retries, plan output."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

import chaintune
import chaintune.stage as stage_mod
from chaintune.analysis import findings, load_runs, summary_tables
from chaintune.cli import main
from chaintune.errors import ConfigError
from chaintune.executors import InlineExecutor, ProcessExecutor
from chaintune.plan import build_tree, expand_sweep, make_plan
from chaintune.rundir import RunDir
from chaintune.status import plan_status

KEYS = ["run_id", "stage", "eval_task", "group"]


def sweep_config(out: Path, model_dir: Path, data_dir: Path, **overrides) -> dict:
    """12 runs: 2 orders × 2 seeds × 3 second-stage learning rates; the 4 first stages are shared by 3 points each."""
    cfg = {
        "name": "sw", "model": str(model_dir), "data_dir": str(data_dir), "output_dir": str(out), "seeds": [0, 1],
        "tasks": {"toxigenqa": {"train_limit": 8, "eval_limit": 26}, "arc_easy": {"train_limit": 8, "eval_limit": 10}},
        "training": {"lr": 1e-3, "batch_size": 4},
        "chains": [{"name": "tox_arc", "stages": [{"task": "toxigenqa"}, {"task": "arc_easy"}]},
                   {"name": "arc_tox", "stages": [{"task": "arc_easy"}, {"task": "toxigenqa"}]}],
        "sweep": {"zip": [{"chains.0.stages.1.lr": [1e-3, 5e-4, 2e-4], "chains.1.stages.1.lr": [1e-3, 5e-4, 2e-4]}]},
        # a tiny random model learns nothing in 2 steps: the quality gate would rightly exclude its runs from the
        # summaries these tests read (the gate has its own tests: test_gate.py)
        "quality_gate": {"validation_size": 0},
    }
    cfg.update(overrides)
    return cfg


def quiet(cfg: dict, executor=None) -> chaintune.Outcome:
    return chaintune.run(cfg, executor, echo=lambda *_: None, progress=False)


def run_inline(cfg: dict) -> pd.DataFrame:
    outcome = quiet(cfg, InlineExecutor(retries=0))
    assert not outcome.failed and not outcome.incomplete_runs
    return outcome.results


def ordered(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(KEYS).reset_index(drop=True)[KEYS + ["n", "acc", "acc_norm"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, real_data_dir):
    """The 12-run sweep, uninterrupted, in this process; and how many stages it trained."""
    out = tmp_path_factory.mktemp("reference") / "out"
    calls = []
    real = stage_mod.train_stage
    stage_mod.train_stage = lambda *a, **k: calls.append(k["desc"]) or real(*a, **k)
    try:
        results = run_inline(sweep_config(out, tiny_model_dir, real_data_dir))
    finally:
        stage_mod.train_stage = real
    return out, results, calls


def test_grid_expansion_product_zip_and_labels():
    base = {"chains": [{"name": "c", "stages": [{"task": "toxigenqa"}, {"task": "arc_easy"}]}]}
    points = expand_sweep(base | {"sweep": {"product": {"training.lr": [1e-5, 1e-4], "seeds": [[0], [1]]},
                                            "zip": [{"chains.0.stages.1.epochs": [1, 2],
                                                     "tasks.arc_easy.train_limit": [10, 20]}]}})
    assert len(points) == 2 * 2 * 2
    assert points[0].label == "lr=1e-05,seeds=[0],epochs=1,train_limit=10"
    last = points[-1].cfg
    assert (last.training.lr, last.seeds, last.chains[0].stages[1].model_extra["epochs"],
            last.tasks["arc_easy"].train_limit) == (1e-4, [1], 2, 20)
    assert all(p.cfg.sweep is None for p in points) and len({p.label for p in points}) == 8
    assert [p.label for p in expand_sweep(base)] == [""]
    same = expand_sweep(base | {"sweep": {"zip": [{"chains.0.stages.0.lr": [1e-3, 1e-4], "training.lr": [1e-3, 1e-4]}]}})
    assert [p.label for p in same] == ["lr=0.001", "lr=0.0001"]  # equal lists: one key names the point


@pytest.mark.parametrize("sweep, message", [
    ({"zip": [{"training.lr": [1, 2], "seeds": [[0]]}]}, "different lengths"),
    ({"product": {"training.lr": []}}, "no values"),
    ({"product": {"output_dir": ["a", "b"]}}, "cannot be swept"),
    ({"product": {"training.lrr": [1e-5]}}, "sweep point lrr=1e-05"),
    ({"product": {"chains.3.stages.0.lr": [1e-5]}}, "does not exist"),
    ({"product": {"training.lr": [-1.0]}}, "training.lr"),
])
def test_bad_sweeps_are_one_line_errors(sweep, message):
    base = {"chains": [{"name": "c", "stages": [{"task": "toxigenqa"}]}], "sweep": sweep}
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as info:
        expand_sweep(base)
    assert "\n" not in str(info.value)


def test_prefix_reuse_saves_the_fraction_the_plan_reports(reference, tiny_model_dir, real_data_dir):
    out, results, calls = reference
    plan = make_plan(expand_sweep(sweep_config(out, tiny_model_dir, real_data_dir)))
    assert len(plan.runs) == 12 and plan.stages_without_reuse == 24 and len(plan.trained_nodes) == 16
    assert len(calls) == 16  # stages actually trained
    done = [p for p in (out / "stages").glob("s*/node.json") if yaml.safe_load(p.read_text())["status"] == "done"]
    assert len(done) == 16
    assert results.run_id.nunique() == 12 and len(list((out / "runs").glob("*/metrics.json"))) == 12
    first = results[results.stage == 1]  # 12 runs branch from 4 first-stage nodes (2 orders × 2 seeds)
    assert first.node.nunique() == 4 and first.groupby(["node", "eval_task", "group"]).acc.nunique().eq(1).all()


def test_paper_grid_plan_counts():
    repo = Path(__file__).resolve().parents[1]
    status = plan_status(expand_sweep(yaml.safe_load((repo / "configs" / "paper.yaml").read_text())
                                      | {"output_dir": "/nonexistent/paper"}))
    assert (status["n_runs"], status["stages_without_reuse"], status["stages_planned"]) == (36, 72, 51)


def test_two_local_workers_give_the_same_results(reference, tmp_path, tiny_model_dir, real_data_dir):
    """Accuracies are identical; curvature and losses may differ in the last float bits (1 thread per worker)."""
    _, expected, _ = reference
    cfg = sweep_config(tmp_path / "out", tiny_model_dir, real_data_dir)
    executor = ProcessExecutor(workers=2, retries=0)
    try:
        outcome = quiet(cfg, executor)
    finally:
        executor.shutdown()
    assert not outcome.failed and len(outcome.completed_runs) == 12
    pd.testing.assert_frame_equal(ordered(outcome.results), ordered(expected))


def test_ray_executor_runs_the_sweep(reference, tmp_path, tiny_model_dir, real_data_dir):
    ray = pytest.importorskip("ray")
    from chaintune.config import ExecutorConfig
    from chaintune.executors import RayExecutor

    _, expected, _ = reference
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        executor = RayExecutor(ExecutorConfig(kind="ray", retries=0))
        outcome = quiet(sweep_config(tmp_path / "out", tiny_model_dir, real_data_dir), executor)
    finally:
        ray.shutdown()
    assert not outcome.failed and len(outcome.completed_runs) == 12
    pd.testing.assert_frame_equal(ordered(outcome.results), ordered(expected))


def test_killed_driver_resumes_only_the_rest(reference, tmp_path, tiny_model_dir, real_data_dir):
    out_ref, expected, _ = reference
    out = tmp_path / "out"
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(sweep_config(out, tiny_model_dir, real_data_dir)))
    cmd = [sys.executable, "-m", "chaintune.cli", "run", str(config), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("stages/s*/node.json"))) < 5:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    trained_before = len(list(out.glob("stages/s*/node.json")))
    assert 5 <= trained_before < 16, "the driver should have been killed midway"
    status = plan_status(expand_sweep(sweep_config(out, tiny_model_dir, real_data_dir)))
    assert status["stages_done"] == trained_before and status["estimate_seconds"] is not None
    assert 0 < status["jobs_pending"] < status["jobs"]
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"({status['jobs_pending']} to do)" in rerun.stdout  # only the unfinished jobs ran
    results = pd.read_parquet(out / "results.parquet")
    pd.testing.assert_frame_equal(ordered(results), ordered(expected))
    for name in ("forgetting", "group_forgetting", "order_asymmetry"):
        pd.testing.assert_frame_equal(summary_tables(out)[name], summary_tables(out_ref)[name])


def test_failed_job_is_retried_recorded_and_shown_by_plan(tmp_path, tiny_model_dir, real_data_dir, monkeypatch, capsys):
    cfg = sweep_config(tmp_path / "out", tiny_model_dir, real_data_dir, seeds=[0], sweep=None,
                       chains=[{"name": "tox_arc", "stages": [{"task": "toxigenqa"}, {"task": "arc_easy"}]}])
    real = stage_mod.train_stage
    attempts = []

    def exploding(*args, **kwargs):
        if "arc_easy" in kwargs["desc"]:
            attempts.append(1)
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(stage_mod, "train_stage", exploding)
    outcome = quiet(cfg, InlineExecutor(retries=2))
    assert len(attempts) == 3 and outcome.incomplete_runs == ["tox_arc-seed0"]
    (info,) = outcome.failed.values()
    assert info["attempts"] == 3 and "out of memory" in info["error"]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["plan", str(config)]) == 0
    shown = capsys.readouterr().out
    assert "failed" in shown and "out of memory" in shown
    monkeypatch.setattr(stage_mod, "train_stage", real)  # the fault is gone: a rerun finishes and clears the record
    outcome = quiet(cfg, InlineExecutor(retries=0))
    assert not outcome.failed and outcome.completed_runs == ["tox_arc-seed0"]


def test_changed_eval_limit_is_refused_not_mixed(tmp_path, tiny_model_dir, real_data_dir):
    cfg = sweep_config(tmp_path / "out", tiny_model_dir, real_data_dir, seeds=[0], sweep=None,
                       chains=[{"name": "tox", "stages": [{"task": "toxigenqa"}]}])
    run_inline(cfg)
    cfg["tasks"]["toxigenqa"]["eval_limit"] = 39
    with pytest.raises(Exception, match="eval_limit"):
        run_inline(cfg)


def test_chain_seeds_and_eval_tasks_restrict_runs_and_evaluations(tmp_path):
    cfg = expand_sweep({"output_dir": str(tmp_path), "seeds": [0, 1, 2], "chains": [
        {"name": "a", "eval_tasks": ["toxigenqa", "arc_easy"], "stages": [{"task": "toxigenqa"}, {"task": "arc_easy"}]},
        {"name": "b", "seeds": [0], "eval_tasks": ["toxigenqa"], "stages": [{"task": "toxigenqa", "lr": 1e-4}]}]})[0].cfg
    runs, nodes, eval_tasks = build_tree(cfg)
    assert [r.run_id for r in runs] == ["a-seed0", "b-seed0", "a-seed1", "a-seed2"]
    assert eval_tasks[nodes[0].key] == ["toxigenqa", "arc_easy"]  # the base model
    (b_node,) = [n for n in nodes if n.training and n.training.lr == 1e-4]
    assert eval_tasks[b_node.key] == ["toxigenqa"] and runs[1].eval_tasks == ("toxigenqa",)
    with pytest.raises(ConfigError, match="not all in the experiment's seeds"):
        expand_sweep({"seeds": [0], "chains": [{"name": "a", "seeds": [1], "stages": [{"task": "toxigenqa"}]}]})


def test_replay_sweep_reaches_summary_and_report(tmp_path, tiny_model_dir, real_data_dir):
    from chaintune.analysis.tables import replay_points

    cfg = sweep_config(tmp_path / "out", tiny_model_dir, real_data_dir, seeds=[0], chains=[{"name": "r", "stages": [
        {"task": "toxigenqa"}, {"task": "arc_easy"},
        {"task": "arc_easy", "name": "replay", "replay": {"task": "toxigenqa", "fraction": 0.0}}]}],
        sweep={"product": {"chains.0.stages.2.replay.fraction": [0.0, 0.25, 0.5]}})
    run_inline(cfg)
    tables = summary_tables(tmp_path / "out")
    replay = tables["replay"]
    assert sorted(replay.fraction) == [0.0, 0.25, 0.5]
    gains = tables["learning_gain"]  # stage 3 trains arc_easy again: flagged, not part of the precondition
    assert gains.set_index("stage").retrained.groupby(level=0).all().to_dict() == {1: False, 2: False, 3: True}
    lines = findings(load_runs(RunDir(tmp_path / "out")))["Learning gains"]
    assert lines[0].endswith(" pp.") and " of 6 (chain, stage) gains" in lines[0]
    assert "3 (chain, stage) pairs train a task the chain trained before" in lines[-1]
    points = replay_points(load_runs(RunDir(tmp_path / "out")))
    assert sorted(points.fraction) == [0.0, 0.25, 0.5] and points.chain.str.startswith("r [fraction=").all()


def test_findings_pool_only_matching_reverse_chains(reference):
    import json

    from scipy import stats

    out, _, _ = reference
    rf = {}
    for path in (out / "runs").glob("*/metrics.json"):
        run = json.loads((path.parent / "run.json").read_text())
        (first,) = [f for f in json.loads(path.read_text())["forgetting"] if f["trained_stage"] == 1]
        rf.setdefault(run["chain"], []).append(first["RF"])
    s_first, c_first = rf["tox_arc [lr=0.001]"], rf["arc_tox [lr=0.001]"]  # the only pair with equal settings
    answer = findings(load_runs(RunDir(out)))["Order: is safety forgotten more when it comes first?"]
    diff = sum(s_first) / 2 - sum(c_first) / 2
    p = stats.ttest_ind(s_first, c_first, equal_var=False).pvalue
    assert answer[0].startswith("Pooled over 1 task pairs") and f"difference {diff:.2f}" in answer[0]
    assert len(answer) == 2 and (f"Welch p = {p:.3g}" in answer[0] or "Welch" not in answer[0])


def test_long_sweep_labels_and_custom_task_paths(tmp_path):
    from chaintune.plan import Run

    long = Run("c", 0, (), variant=",".join(f"key{i}=value{i}" for i in range(40)))
    assert len(long.run_id) < 120 and long.run_id != Run("c", 0, (), variant=long.variant + "x").run_id
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text('{"question": "q", "choices": ["x", "y"], "answer": 0}\n')
    keys = []
    for name in ("a", "b"):  # the same task name over two different files: different stages
        cfg = expand_sweep({"custom_tasks": [{"name": "mine", "path": str(tmp_path / f"{name}.jsonl")}],
                            "chains": [{"name": "c", "stages": [{"task": "mine"}]}]})[0].cfg
        keys.append(build_tree(cfg)[1][1].key)  # the trained stage (index 0 is the base model)
    assert keys[0] != keys[1]


def test_summary_mixes_one_seed_and_several_seed_chains(tmp_path, tiny_model_dir, real_data_dir):
    cfg = sweep_config(tmp_path / "out", tiny_model_dir, real_data_dir, sweep=None, chains=[
        {"name": "both", "stages": [{"task": "toxigenqa"}, {"task": "arc_easy"}]},
        {"name": "one", "seeds": [1], "stages": [{"task": "toxigenqa"}, {"task": "arc_easy", "lr": 5e-4}]}])
    run_inline(cfg)
    forgetting = summary_tables(tmp_path / "out")["forgetting"].set_index("chain")
    assert forgetting.seeds.to_dict() == {"both": 2, "one": 1}
    metrics = yaml.safe_load((tmp_path / "out" / "runs" / "one-seed1" / "metrics.json").read_text())
    assert forgetting.loc["one", "F_ci_low"] == metrics["forgetting"][0]["F_ci_low"]  # the bootstrap CI of its run
