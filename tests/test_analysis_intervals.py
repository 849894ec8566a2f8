"""The summary tables' intervals (chaintune.analysis.intervals): crossed seed × question intervals built from the
runs' stored predictions, their fallbacks, the per-group corrections and the order tests."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pandas as pd
import pytest
from golden.sweep import RUNDIR_V1
from scipy.stats import ttest_ind

from chaintune import stats as st
from chaintune.analysis import findings, load_runs, summary_tables
from chaintune.analysis import intervals as iv
from chaintune.analysis.records import OVERALL, RunData
from chaintune.analysis.run_metrics import run_metrics
from chaintune.analysis.tables import order_difference
from chaintune.io import read_json, write_json
from chaintune.rundir import RunDir, RunRecord

# ------------------------------------------------------------------------------------------------ synthetic runs
GROUPS = ["g1"] * 4 + ["g2"] * 4  # task S: 8 questions in two groups; task C: 4 questions, no groups


def make_run(chain: str, seed: int, stages: dict[tuple[str, int], list[int]], tasks: tuple[str, str] = ("S", "C"),
             ids: dict[str, list[str]] | None = None) -> RunData:
    """A finished two-stage run (stage 1 trains tasks[0], stage 2 tasks[1]) from per-question correctness:
    `stages[(task, stage)]` = 0/1 per question of that task."""
    ids = ids or {"S": [f"s{i}" for i in range(8)], "C": [f"c{i}" for i in range(4)]}
    preds, rows = [], []
    for (task, stage), correct in stages.items():
        groups = GROUPS if task == "S" else [None] * len(correct)
        preds.append(pd.DataFrame({"id": ids[task], "group": groups, "correct": np.asarray(correct, bool),
                                   "stage": stage, "eval_task": task}))
        common = {"chain": chain, "seed": seed, "stage": stage, "trained_task": [None, *tasks][stage],
                  "eval_task": task}
        c = np.asarray(correct, float)
        rows.append(common | {"group": OVERALL, "n": len(c), "acc": 100 * c.mean(), "acc_norm": 0.0})
        if task == "S":
            for g in ("g1", "g2"):
                part = c[np.asarray(GROUPS) == g]
                rows.append(common | {"group": g, "n": len(part), "acc": 100 * part.mean(), "acc_norm": 0.0})
    run_df, predictions = pd.DataFrame(rows), pd.concat(preds, ignore_index=True)
    metrics = run_metrics(run_df, predictions, 0, 2, {}) | {"curvature": [], "replay": []}
    record = RunRecord(run_id=f"{chain}-seed{seed}", id="x", chain=chain, base_chain=chain, seed=seed,
                       stages=["base", "s1", "s2"], eval_tasks=list(tasks))
    settings = [(tasks[0], {"lr": 1.0}, None), (tasks[1], {"lr": 1.0}, None)]
    return RunData(record, run_df, predictions, metrics, settings, {"S": "safety", "C": "capability"})


# per seed: S correctness after stage 1 and stage 2 (8 questions), C after stages 1 and 2 (4 questions)
S_AFTER_1 = [[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 1]]
S_AFTER_2 = [[0, 0, 1, 1, 1, 1, 1, 0], [0, 1, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0, 1]]


def chain_runs(chain: str = "S-C", seeds: int = 3) -> list[RunData]:
    return [make_run(chain, s, {("S", 0): [0] * 8, ("S", 1): S_AFTER_1[s], ("S", 2): S_AFTER_2[s],
                                ("C", 0): [0, 0, 1, 0], ("C", 1): [0, 1, 1, 0], ("C", 2): [1, 1, 1, s % 2]})
            for s in range(seeds)]


def test_forgetting_table_uses_the_crossed_interval():
    table = summary_tables(chain_runs())["forgetting"].set_index("task")
    d = 100.0 * (np.array(S_AFTER_1) - np.array(S_AFTER_2))  # seeds × questions forgetting of S
    ci = st.crossed_interval(d)
    row = table.loc["S"]
    assert row.F == pytest.approx(d.mean()) and row.ci_method == iv.CROSSED
    assert (row.F_ci_low, row.F_ci_high) == pytest.approx((ci.ci_low, ci.ci_high))
    rf = st.crossed_interval(st.ratio_pseudo_values(d, 100.0 * np.array(S_AFTER_1), 100.0)[1])
    assert (row.RF, row.RF_ci_low, row.RF_ci_high) == pytest.approx((rf.estimate, rf.ci_low, rf.ci_high))


def test_group_table_p_values_are_adjusted_within_chain_and_task():
    runs = chain_runs()
    table = summary_tables(runs)["group_forgetting"].set_index("group")
    d = 100.0 * (np.array(S_AFTER_1) - np.array(S_AFTER_2))
    codes = np.array([0] * 4 + [1] * 4)
    for k, g in enumerate(["g1", "g2"]):
        f_g = st.crossed_interval(d[:, codes == k])
        bf_g = st.crossed_interval(st.bf_g_pseudo_values(d, codes, k)[1])
        assert table.loc[g, "F_g_p_value"] == pytest.approx(f_g.p_value)
        assert (table.loc[g, "BF_g_ci_low"], table.loc[g, "BF_g_ci_high"]) == pytest.approx((bf_g.ci_low, bf_g.ci_high))
    assert table.F_g_adj_p.to_numpy() == pytest.approx(st.holm(table.F_g_p_value))
    assert (table.F_g_significant == (table.F_g_adj_p < 0.05)).all() and set(table.correction) == {"Holm"}
    bh = summary_tables(runs, correction="bh")["group_forgetting"]
    assert bh.BF_g_adj_p.to_numpy() == pytest.approx(st.benjamini_hochberg(bh.BF_g_p_value))
    assert set(bh.correction) == {"Benjamini–Hochberg"}


def test_one_seed_keeps_the_paired_bootstrap_and_its_p_values():
    (run,) = chain_runs(seeds=1)
    tables = summary_tables([run])
    f = tables["forgetting"].set_index("task").loc["S"]
    (stored,) = [x for x in run.metrics["forgetting"] if x["task"] == "S"]
    assert (f.F_ci_low, f.F_ci_high) == (stored["F_ci_low"], stored["F_ci_high"]) and "bootstrap" in f.ci_method
    g = tables["group_forgetting"].set_index("group").loc["g1"]
    (rec,) = [x for x in run.metrics["group_forgetting"] if x["group"] == "g1"]
    assert (g.F_g_ci_low, g.BF_g_ci_high, g.BF_g_p_value) == (rec["ci_low"], rec["bf_ci_high"], rec["bf_p_value"])
    assert g.ci_method == iv.BOOTSTRAP and 0 < rec["p_value"] <= 1
    assert tables["biased_forgetting"].ci_method.iloc[0] == iv.NO_INTERVAL


def test_seeds_that_answered_different_questions_fall_back_to_t_over_seeds():
    runs = chain_runs()
    other = {"S": [f"x{i}" for i in range(8)], "C": [f"c{i}" for i in range(4)]}
    runs[2] = make_run("S-C", 2, {k: v for k, v in [(("S", 0), [0] * 8), (("S", 1), S_AFTER_1[2]),
                                                    (("S", 2), S_AFTER_2[2]), (("C", 0), [0] * 4),
                                                    (("C", 1), [1] * 4), (("C", 2), [1] * 4)]}, ids=other)
    row = summary_tables(runs)["forgetting"].set_index("task").loc["S"]
    assert row.ci_method.startswith(iv.T_OVER_SEEDS) and "different questions" in row.ci_method
    values = 100.0 * (np.array(S_AFTER_1) - np.array(S_AFTER_2)).mean(axis=1)
    half = 4.302652729911275 * values.std(ddof=1) / math.sqrt(3)  # t_{0.975, 2} · std / √3 over the 3 runs' F
    assert (row.F_ci_low, row.F_ci_high) == pytest.approx((values.mean() - half, values.mean() + half))


def test_order_difference_crossed_welch_and_permutation():
    first = chain_runs("S-C")
    second = [make_run("C-S", s, {("C", 0): [0] * 4, ("C", 1): [1, 1, 1, 1], ("C", 2): [1, 0, 1, s % 2],
                                  ("S", 0): [0] * 8, ("S", 1): [1] * 8, ("S", 2): [1] * 8}, tasks=("C", "S"))
              for s in range(3)]
    res = order_difference([(first, "S", second, "C")])
    rf1 = st.ratio_pseudo_values(100.0 * (np.array(S_AFTER_1) - np.array(S_AFTER_2)), 100.0 * np.array(S_AFTER_1),
                                 100.0)[1]
    c1, c2 = np.ones((3, 4)), np.array([[1, 0, 1, s % 2] for s in range(3)], float)
    rf2 = st.ratio_pseudo_values(100.0 * (c1 - c2), 100.0 * c1, 100.0)[1]
    expected = st.crossed_difference(rf1, rf2)
    assert res["ci_method"] == iv.CROSSED and res["difference"] == pytest.approx(expected.estimate)
    assert (res["ci_low"], res["ci_high"], res["p_value"]) == pytest.approx(
        (expected.ci_low, expected.ci_high, expected.p_value))
    per_run = ([r.metrics["forgetting"][0]["RF"] for r in first], [r.metrics["forgetting"][0]["RF"] for r in second])
    assert res["permutation_p_value"] == pytest.approx(st.permutation_test([per_run]).p_value)
    assert res["welch_p_value"] == pytest.approx(ttest_ind(*per_run, equal_var=False).pvalue)
    answers = findings(first + second)
    pooled = answers["Order: is safety forgotten more when it comes first?"][0]
    assert f"p = {res['p_value']:.3g}" in pooled and "permutation p" in pooled
    (biased,) = answers["Is forgetting biased across groups?"]
    assert "Holm-corrected level (2 tests" in biased
    assert any("seed × question" in line for line in answers["How were the intervals computed?"])


# ------------------------------------------------------------------------------------------------ real run directory
def test_crossed_estimates_equal_the_tables_point_estimates():
    # the pseudo-values of every run average to that run's stored metric, so each crossed interval is centred on
    # the table's mean over seeds
    tables = summary_tables(load_runs(RunDir(RUNDIR_V1)))
    checked = 0
    for name, cols in {"learning_gain": ["gain"], "forgetting": ["F", "RF"], "group_forgetting": ["F_g", "BF_g"],
                       "biased_forgetting": ["BF_max", "BF_spread", "BF_std"],
                       "replay": ["recovery", "capability_cost"], "replay_groups": ["recovery"]}.items():
        df = tables[name][tables[name].ci_method == iv.CROSSED]
        for col in cols:
            mid = (df[f"{col}_ci_low"] + df[f"{col}_ci_high"]) / 2
            assert np.allclose(mid, df[col], atol=1e-9, equal_nan=True), (name, col)
            checked += len(df)
    assert checked >= 90  # of 94 rows × statistics


def test_config_chooses_the_correction(tmp_path):
    out = tmp_path / "bh"
    shutil.copytree(RUNDIR_V1, out)
    points = read_json(out / "sweep" / "points.json")
    for p in points:
        p["config"]["multiple_comparisons"] = "bh"
    write_json(out / "sweep" / "points.json", points)
    runs = load_runs(RunDir(out))
    assert {r.correction for r in runs} == {"bh"}
    groups = summary_tables(runs)["group_forgetting"]
    assert set(groups.correction) == {"Benjamini–Hochberg"}
    assert set(summary_tables(load_runs(RunDir(RUNDIR_V1)))["group_forgetting"].correction) == {"Holm"}
