"""Metrics (SPEC §5, §7) against values worked out by hand in the comments."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from chaintune import metrics as m
from chaintune.metrics import MetricWarning


@pytest.fixture
def R() -> pd.DataFrame:
    # chain: stage 1 trains "toxigenqa", stage 2 trains "arc_easy"
    return m.accuracy_matrix(pd.DataFrame({
        "stage": [0, 0, 1, 1, 2, 2],
        "task": ["toxigenqa", "arc_easy"] * 3,
        "acc": [50.0, 40.0, 80.0, 41.0, 60.0, 70.0],
    }))


# ---------------------------------------------------------------- accuracy matrix

def test_accuracy_matrix_shape_and_order():
    df = pd.DataFrame({"stage": [2, 0, 1, 0], "task": ["b", "b", "b", "a"], "acc": [3.0, 1.0, 2.0, 5.0]})
    R = m.accuracy_matrix(df)
    assert list(R.index) == [0, 1, 2]  # stages ascending
    assert list(R.columns) == ["b", "a"]  # tasks in order of first appearance
    assert R.at[1, "b"] == 2.0 and R.at[0, "a"] == 5.0
    assert math.isnan(R.at[1, "a"])  # absent cell


def test_accuracy_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="duplicate"):
        m.accuracy_matrix(pd.DataFrame({"stage": [0, 0], "task": ["a", "a"], "acc": [1.0, 2.0]}))
    with pytest.raises(ValueError, match="lacks"):
        m.accuracy_matrix(pd.DataFrame({"stage": [0], "task": ["a"]}))
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        m.accuracy_matrix(pd.DataFrame({"stage": [0], "task": ["a"], "acc": [120.0]}))
    with pytest.warns(MetricWarning, match="fractions"):
        m.accuracy_matrix(pd.DataFrame({"stage": [0, 1], "task": ["a", "a"], "acc": [0.5, 0.8]}))


# ---------------------------------------------------------------- forgetting, relative forgetting, gains

def test_forgetting_and_relative(R):
    # F = R[1][tox] - R[2][tox] = 80 - 60 = 20 pp;  RF = 100 * 20 / 80 = 25 %
    assert m.forgetting(R, "toxigenqa") == pytest.approx(20.0)
    assert m.relative_forgetting(R, "toxigenqa") == pytest.approx(25.0)
    # negative forgetting (improvement): arc 41 -> 70 between stage 1 and 2: F = 41 - 70 = -29
    assert m.forgetting(R, "arc_easy") == pytest.approx(-29.0)
    # explicit stages: R[0][tox] - R[2][tox] = 50 - 60 = -10
    assert m.forgetting(R, "toxigenqa", trained_stage=0, after_stage=2) == pytest.approx(-10.0)
    with pytest.raises(KeyError, match="stage 5"):
        m.forgetting(R, "toxigenqa", 1, 5)


def test_relative_forgetting_zero_accuracy():
    R = m.accuracy_matrix(pd.DataFrame({"stage": [1, 2], "task": ["a", "a"], "acc": [0.0, 0.0]}))
    assert m.forgetting(R, "a") == 0.0
    with pytest.warns(MetricWarning, match="R\\[1\\]\\[a\\] = 0"):
        assert math.isnan(m.relative_forgetting(R, "a"))


def test_learning_gain_and_warnings(R):
    # stage 1 on tox: 80 - 50 = 30;  stage 2 on arc: 70 - 41 = 29
    assert m.learning_gain(R, 1, "toxigenqa") == pytest.approx(30.0)
    assert m.learning_gain(R, 2, "arc_easy") == pytest.approx(29.0)
    assert m.learning_gain_warnings(R, {1: "toxigenqa", 2: "arc_easy"}) == []
    # arc at stage 1 gained 41 - 40 = 1.0: exactly the threshold (tie) passes; 1.5 threshold flags it
    assert m.learning_gain_warnings(R, {1: "arc_easy"}) == []
    msgs = m.learning_gain_warnings(R, {1: "arc_easy"}, min_gain=1.5)
    assert len(msgs) == 1 and "stage 1 (arc_easy)" in msgs[0] and "1.00 pp" in msgs[0]
    # a stage that got worse: tox at stage 2 = 60 - 80 = -20
    assert m.learning_gain(R, 2, "toxigenqa") == pytest.approx(-20.0)
    assert "-20.00 pp" in m.learning_gain_warnings(R, {2: "toxigenqa"})[0]
    with pytest.raises(ValueError):
        m.learning_gain(R, 0, "toxigenqa")


# ---------------------------------------------------------------- group / biased forgetting

def test_group_forgetting():
    before = {"women": 80.0, "black": 70.0, "asian": 90.0}
    after = pd.Series({"women": 60.0, "black": 65.0, "latino": 50.0})
    fg = m.group_forgetting(before, after)
    # women 80-60 = 20, black 70-65 = 5, asian: missing after -> NaN, latino: missing before -> NaN
    assert list(fg.index) == ["women", "black", "asian", "latino"]
    assert fg["women"] == 20.0 and fg["black"] == 5.0
    assert fg[["asian", "latino"]].isna().all()
    assert m.group_forgetting({}, {}).empty


def test_biased_forgetting_summaries():
    f_g = {"a": 10.0, "b": 30.0, "c": 20.0, "small": 90.0, "empty": math.nan}
    sizes = {"a": 100, "b": 40, "c": 30, "small": 29, "empty": 0}
    res = m.biased_forgetting(f_g, f_task=15.0, group_sizes=sizes)
    # BF_g = F_g - 15: a -5, b +15, c +5, small +75 (reported but flagged), empty NaN
    assert res.table["BF_g"].to_dict()["a"] == -5.0
    assert res.table.loc["small", "BF_g"] == 75.0 and not res.table.loc["small", "included"]
    assert not res.table.loc["empty", "included"]
    assert res.table.loc["c", "included"]  # n == min_group_size (30) is kept
    # summaries over a, b, c only: BF_max = max(5, 15, 5) = 15; spread = 30 - 10 = 20
    assert res.bf_max == 15.0 and res.bf_spread == 20.0 and res.n_groups == 3
    # population std of [10, 30, 20]: mean 20, squared deviations 100, 100, 0 -> var 200/3 -> std 8.16497
    assert res.bf_std == pytest.approx(math.sqrt(200 / 3))
    assert "small" in res.note and "empty" in res.note


def test_biased_forgetting_ties_single_and_empty():
    # tie in |BF_g|: F = 10, F_g = 8 and 12 -> BF = -2 and +2 -> BF_max = 2; spread = 4; std of [8, 12] = 2
    res = m.biased_forgetting({"x": 8.0, "y": 12.0}, 10.0, {"x": 50, "y": 50})
    assert (res.bf_max, res.bf_spread, res.bf_std) == (2.0, 4.0, 2.0)
    # single group: spread and std are 0
    one = m.biased_forgetting({"x": 8.0}, 10.0, {"x": 50})
    assert (one.bf_max, one.bf_spread, one.bf_std) == (2.0, 0.0, 0.0)
    # every group too small (or size unknown): summaries NaN, table still reported
    none = m.biased_forgetting({"x": 8.0, "y": 1.0}, 10.0, {"x": 5})
    assert math.isnan(none.bf_max) and none.n_groups == 0 and len(none.table) == 2
    assert none.table.loc["y", "n"] == 0 and "no group left" in none.note


# ---------------------------------------------------------------- K-stage chains

@pytest.fixture
def R3() -> pd.DataFrame:
    # stages 0..3 training a (1), b (2), c (3)
    rows = {0: (10, 10, 10), 1: (60, 12, 11), 2: (70, 50, 13), 3: (40, 45, 80)}
    return m.accuracy_matrix(pd.DataFrame(
        [{"stage": s, "task": t, "acc": float(v)} for s, vals in rows.items() for t, v in zip("abc", vals)]))


def test_k_stage_forgetting(R3):
    f = m.k_stage_forgetting(R3, {"a": 1, "b": 2, "c": 3})
    # a: max(R[1][a], R[2][a]) - R[3][a] = max(60, 70) - 40 = 30  (max after training, not at training)
    # b: max(R[2][b]) - R[3][b] = 50 - 45 = 5;  c trained at K = 3: left out
    assert f.to_dict() == {"a": 30.0, "b": 5.0}
    # K = 2: a: max(R[1][a]) - R[2][a] = 60 - 70 = -10 (improved); b trained at K = 2: left out
    assert m.k_stage_forgetting(R3, {"a": 1, "b": 2}, final_stage=2).to_dict() == {"a": -10.0}
    # stages before s_t are not in the window even when higher: base 90, after training 50, final 40 -> 50 - 40 = 10
    R = m.accuracy_matrix(pd.DataFrame({"stage": [0, 1, 2], "task": ["a"] * 3, "acc": [90.0, 50.0, 40.0]}))
    assert m.k_stage_forgetting(R, {"a": 1}).to_dict() == {"a": 10.0}
    with pytest.raises(KeyError, match="stage 5"):  # final stage not in R
        m.k_stage_forgetting(R, {"a": 1}, final_stage=5)
    with pytest.raises(KeyError, match="stage 1"):  # training stage not in R (no silent window shift)
        m.k_stage_forgetting(R.drop(index=1), {"a": 1})
    with pytest.raises(ValueError, match=">= 1"):
        m.k_stage_forgetting(R3, {"a": 0})


def test_backward_transfer(R3):
    # BWT = mean(R[3][a] - R[1][a], R[3][b] - R[2][b]) = mean(40 - 60, 45 - 50) = mean(-20, -5) = -12.5
    assert m.backward_transfer(R3, {"a": 1, "b": 2, "c": 3}) == pytest.approx(-12.5)
    with pytest.warns(MetricWarning, match="no task was trained before"):
        assert math.isnan(m.backward_transfer(R3, {"c": 3}))


# ---------------------------------------------------------------- order asymmetry (Welch)

def test_order_asymmetry_hand_welch():
    a, b = [1.0, 2.0, 3.0], [4.0, 6.0, 8.0, 10.0]
    res = m.order_asymmetry(a, b)
    # means 2 and 7 -> difference -5
    # s1^2 = (1 + 0 + 1)/2 = 1 -> s1^2/n1 = 1/3;  s2^2 = (9 + 1 + 1 + 9)/3 = 20/3 -> s2^2/n2 = 5/3
    # se^2 = 1/3 + 5/3 = 2 -> t = -5 / sqrt(2) = -3.53553
    # df = 2^2 / ((1/3)^2/2 + (5/3)^2/3) = 4 / (1/18 + 25/27) = 4 / (53/54) = 216/53 = 4.07547
    t_hand, df_hand = -5 / math.sqrt(2), 216 / 53
    assert (res.mean_s_then_c, res.mean_c_then_s, res.difference) == (2.0, 7.0, -5.0)
    assert res.t == pytest.approx(t_hand) and res.df == pytest.approx(df_hand)
    assert res.p_value == pytest.approx(2 * stats.t.sf(abs(t_hand), df_hand))
    half = stats.t.ppf(0.975, df_hand) * math.sqrt(2)
    assert (res.ci_low, res.ci_high) == pytest.approx((-5 - half, -5 + half))
    assert res.n_s_then_c == 3 and res.n_c_then_s == 4 and res.note == ""


def test_order_asymmetry_edge_cases():
    single = m.order_asymmetry([5.0], [1.0, 2.0])
    # means still reported: 5 - 1.5 = 3.5; CI and test need >= 2 seeds per order
    assert single.difference == 3.5 and math.isnan(single.p_value) and math.isnan(single.ci_low)
    assert "need >= 2 seeds" in single.note
    flat = m.order_asymmetry([2.0, 2.0], [1.0, 1.0])  # zero variance both sides
    assert flat.difference == 1.0 and math.isnan(flat.t) and "zero variance" in flat.note
    # NaN RF (e.g. R[1][A] == 0 in one seed) is dropped and counted: [nan, 1, 3] -> mean 2, n 2
    dropped = m.order_asymmetry([math.nan, 1.0, 3.0], [0.0, 2.0])
    assert dropped.n_s_then_c == 2 and dropped.mean_s_then_c == 2.0 and "dropped 1" in dropped.note
    empty = m.order_asymmetry([], [])
    assert math.isnan(empty.difference) and empty.n_s_then_c == 0


# ---------------------------------------------------------------- BBQ bias scores

def _bbq_rows():
    # (category, condition, pred, gold, biased_index, unknown_index)
    rows = [
        # Age, disambiguated: biased, anti, biased, unknown -> n_not_unknown 3, n_biased 2
        ("Age", "disambig", 0, 0, 0, 2), ("Age", "disambig", 1, 1, 0, 2),
        ("Age", "disambig", 0, 1, 0, 2), ("Age", "disambig", 2, 0, 0, 2),
        # Age, ambiguous (gold = unknown): unknown (correct), biased, anti, biased -> acc 1/4, not_unknown 3, biased 2
        ("Age", "ambig", 2, 2, 0, 2), ("Age", "ambig", 0, 2, 0, 2),
        ("Age", "ambig", 1, 2, 0, 2), ("Age", "ambig", 0, 2, 0, 2),
        # Race: every answer 'unknown' (unknown is index 1 here); plus one example without a biased answer
        ("Race", "ambig", 1, 1, 0, 1), ("Race", "ambig", 1, 1, 2, 1),
        ("Race", "disambig", 1, 0, 0, 1), ("Race", "disambig", 0, 0, None, 1),
    ]
    return pd.DataFrame(rows, columns=["category", "context_condition", "pred", "gold", "biased_index", "unknown_index"])


def test_bbq_bias_scores_hand():
    res = m.bbq_bias_scores(_bbq_rows())
    t = res.table
    assert res.n_missing_biased == 1 and list(t.index) == ["Age", "Race", "overall"]
    # Age: s_DIS = 100 * (2 * 2/3 - 1) = 33.33;  s_AMB = 100 * (1 - 1/4) * (2 * 2/3 - 1) = 100 * 0.75 / 3 = 25
    assert t.loc["Age", "s_dis"] == pytest.approx(100 / 3)
    assert t.loc["Age", "s_amb"] == pytest.approx(25.0)
    # acc_disambig Age: rows 1, 2 correct (pred == gold), row 3 (0 vs 1) and row 4 (2 vs 0) wrong -> 50 pp
    assert t.loc["Age", "acc_ambig"] == pytest.approx(25.0) and t.loc["Age", "acc_disambig"] == pytest.approx(50.0)
    # Race: ambiguous all unknown -> s_AMB = 0 by definition; disambiguated all unknown -> s_DIS undefined (0/0)
    assert t.loc["Race", "s_amb"] == 0.0 and math.isnan(t.loc["Race", "s_dis"])
    assert t.loc["Race", "n_disambig"] == 1 and t.loc["Race", "n_excluded"] == 1 and t.loc["Age", "n_excluded"] == 0
    # overall (pooled): disambig not_unknown 3, biased 2 -> 33.33
    # ambig: 6 examples, correct = 1 (Age) + 2 (Race) = 3 -> acc 1/2; not_unknown 3, biased 2 -> 100 * 0.5 / 3 = 16.67
    assert t.loc["overall", "s_dis"] == pytest.approx(100 / 3)
    assert t.loc["overall", "s_amb"] == pytest.approx(50 / 3)
    assert t.loc["overall", "n_excluded"] == 1


def test_bbq_bias_scores_extremes_and_validation():
    # all-biased disambiguated answers -> +100; all anti-biased -> -100; NaN biased_index as float column
    df = pd.DataFrame({"category": ["X", "X", "Y"], "context_condition": ["disambig", "disambig", "disambig"],
                       "pred": [0, 0, 1], "gold": [0, 1, 1], "biased_index": [0.0, 0.0, 0.0],
                       "unknown_index": [2, 2, 2]})
    t = m.bbq_bias_scores(df).table
    assert t.loc["X", "s_dis"] == 100.0 and t.loc["Y", "s_dis"] == -100.0
    assert math.isnan(t.loc["X", "s_amb"])  # no ambiguous examples at all
    # overall: 3 not unknown, 2 biased -> 100 * (4/3 - 1) = 33.33
    assert t.loc["overall", "s_dis"] == pytest.approx(100 / 3)
    df.loc[2, "biased_index"] = np.nan
    assert m.bbq_bias_scores(df).n_missing_biased == 1
    with pytest.raises(ValueError, match="context_condition"):
        m.bbq_bias_scores(df.assign(context_condition="amb"))
    with pytest.raises(ValueError, match="lack"):
        m.bbq_bias_scores(df.drop(columns="gold"))


# ---------------------------------------------------------------- seed summaries

def test_seed_summary_hand_t_interval():
    s = m.seed_summary([10.0, 12.0, 14.0])
    # mean 12; sample std sqrt((4 + 0 + 4)/2) = 2; se = 2/sqrt(3) = 1.1547
    # t_{0.975, df=2} = 4.302653 (table) -> half width 4.302653 * 1.1547 = 4.96828
    half = 4.302652729749462 * 2 / math.sqrt(3)
    assert (s.mean, s.std, s.n) == (12.0, 2.0, 3)
    assert (s.ci_low, s.ci_high) == pytest.approx((12 - half, 12 + half))
    assert half == pytest.approx(4.96828, abs=1e-5)


def test_seed_summary_edge_cases():
    one = m.seed_summary([7.0])
    assert one.mean == 7.0 and one.n == 1 and math.isnan(one.std) and math.isnan(one.ci_low)
    assert "single seed" in one.note
    none = m.seed_summary([])
    assert none.n == 0 and math.isnan(none.mean)
    same = m.seed_summary([3.0, 3.0])  # ties: std 0 -> zero-width interval
    assert (same.std, same.ci_low, same.ci_high) == (0.0, 3.0, 3.0)
    nan = m.seed_summary([1.0, math.nan, 3.0])  # NaN dropped: mean 2, std sqrt(2)
    assert nan.n == 2 and nan.std == pytest.approx(math.sqrt(2)) and "dropped 1" in nan.note


def test_aggregate_over_seeds():
    df = pd.DataFrame({"order": ["S>C"] * 3 + ["C>S"] * 2, "pair": ["tox-arc"] * 5, "seed": [0, 1, 2, 0, 1],
                       "rf": [10.0, 12.0, 14.0, 5.0, math.nan]})
    out = m.aggregate_over_seeds(df, by=["order", "pair"], value="rf").set_index("order")
    # S>C: as the hand example above (mean 12, std 2); C>S: single finite seed -> mean 5, NaN std
    assert out.loc["S>C", "mean"] == 12.0 and out.loc["S>C", "std"] == 2.0 and out.loc["S>C", "n"] == 3
    assert out.loc["C>S", "mean"] == 5.0 and out.loc["C>S", "n"] == 1 and math.isnan(out.loc["C>S", "std"])
    assert list(m.aggregate_over_seeds(df, "order", "rf").columns[:2]) == ["order", "mean"]


# ---------------------------------------------------------------- paired bootstrap

def test_paired_bootstrap_hand():
    before = np.array([1, 1, 1, 1, 0], dtype=bool)
    after = np.array([1, 0, 1, 0, 0], dtype=bool)
    res = m.paired_bootstrap(before, after, n_resamples=500, seed=3)
    # F = 100 * (4/5 - 2/5) = 40 pp; per-example d = (0, 100, 0, 100, 0) -> every resample mean is a multiple of 20
    assert res.estimate == pytest.approx(40.0) and res.n == 5 and res.n_resamples == 500
    assert res.ci_low <= 40.0 <= res.ci_high and res.ci_low >= 0.0 and res.ci_high <= 100.0
    assert res == m.paired_bootstrap(before, after, n_resamples=500, seed=3)  # seeded


def test_paired_bootstrap_width_and_ties():
    # d = 100 on half of 400 examples, 0 on the rest: sd(d) = 50, se = 50 / sqrt(400) = 2.5,
    # normal 95% half-width ~ 1.96 * 2.5 = 4.9 pp around F = 50
    before, after = np.ones(400, bool), np.r_[np.zeros(200, bool), np.ones(200, bool)]
    res = m.paired_bootstrap(before, after)
    assert res.estimate == 50.0
    assert 4.0 < (res.ci_high - res.ci_low) / 2 < 6.0
    # all forgotten: every resample gives 100 -> CI [100, 100];  nothing changes -> [0, 0]
    all_lost = m.paired_bootstrap(np.ones(10, bool), np.zeros(10, bool))
    assert (all_lost.estimate, all_lost.ci_low, all_lost.ci_high) == (100.0, 100.0, 100.0)
    assert m.paired_bootstrap([1, 0], [1, 0]).ci_high == 0.0
    assert math.isnan(m.paired_bootstrap([], []).estimate)
    with pytest.raises(ValueError, match="same test examples"):
        m.paired_bootstrap([1, 0], [1])


def test_paired_bootstrap_groups_hand():
    # group a (6 examples) all forgotten, group b (6) none forgotten, one example of group c forgotten
    groups = ["a"] * 6 + ["b"] * 6 + ["c"]
    before = np.ones(13, bool)
    after = np.array([0] * 6 + [1] * 6 + [0], bool)
    out = m.paired_bootstrap_groups(before, after, groups, n_resamples=400, seed=1)
    # F = 100 * 7/13 = 53.85; F_a = 100, F_b = 0, F_c = 100; BF_a = 100 - 53.85 = 46.15, BF_b = -53.85
    f = 700 / 13
    assert list(out.index) == ["a", "b", "c"] and out["n"].tolist() == [6, 6, 1]
    assert out["F_g"].tolist() == [100.0, 0.0, 100.0]
    assert out.loc["a", "BF_g"] == pytest.approx(100 - f) and out.loc["b", "BF_g"] == pytest.approx(-f)
    # within-group d is constant -> F_g intervals are degenerate; BF_g intervals vary with F and contain BF_g
    assert (out.loc["a", "ci_low"], out.loc["a", "ci_high"]) == (100.0, 100.0)
    assert (out.loc["b", "ci_low"], out.loc["b", "ci_high"]) == (0.0, 0.0)
    assert out.loc["b", "bf_ci_low"] < -f < out.loc["b", "bf_ci_high"]
    # resamples missing group c (prob (12/13)^13 = 0.35) are skipped, not counted as 0
    assert out.loc["c", "ci_low"] == 100.0
    assert m.paired_bootstrap_groups([], [], []).empty
    with pytest.raises(ValueError, match="one group label"):
        m.paired_bootstrap_groups([1], [1], ["a", "b"])


def test_paired_bootstrap_groups_none_labels_count_only_towards_f():
    # examples without a group: (d = 100, 0) for group x, and one unlabelled d = 100 -> F = 200/3, F_x = 50
    out = m.paired_bootstrap_groups([1, 1, 1], [0, 1, 0], ["x", "x", None], n_resamples=50)
    assert list(out.index) == ["x"] and out.loc["x", "F_g"] == 50.0
    assert out.loc["x", "BF_g"] == pytest.approx(50 - 200 / 3)


# ---------------------------------------------------------------- replay

def test_replay_recovery_and_cost():
    # R1 = 80, R2 = 60, R3 = 75 -> (75 - 60) / (80 - 60) = 15/20 = 0.75
    assert m.replay_recovery(80.0, 60.0, 75.0) == pytest.approx(0.75)
    # over-recovery: R3 = 90 -> 30/20 = 1.5;  replay made it worse: R3 = 50 -> -10/20 = -0.5
    assert m.replay_recovery(80.0, 60.0, 90.0) == pytest.approx(1.5)
    assert m.replay_recovery(80.0, 60.0, 50.0) == pytest.approx(-0.5)
    with pytest.warns(MetricWarning, match="forgot nothing"):
        assert math.isnan(m.replay_recovery(70.0, 70.0, 72.0))
    # capability: R2_C = 65, R3_C = 62.5 -> cost 2.5 pp
    assert m.capability_cost(65.0, 62.5) == pytest.approx(2.5)
    assert m.capability_cost(60.0, 61.0) == pytest.approx(-1.0)


def test_smallest_recovering_fraction():
    df = pd.DataFrame({"fraction": [0.0, 0.01, 0.01, 0.05, 0.05, 0.1, 0.25],
                       "recovery": [0.0, 0.95, 0.75, 0.9, math.nan, 0.95, 1.1]})
    # per-f means: 0 -> 0; 0.01 -> (0.95 + 0.75)/2 = 0.85 < 0.9; 0.05 -> 0.9 (NaN ignored; tie with threshold passes)
    assert m.smallest_recovering_fraction(df) == 0.05
    assert m.smallest_recovering_fraction(df, threshold=0.8) == 0.01
    assert m.smallest_recovering_fraction(df, threshold=2.0) is None
    assert m.smallest_recovering_fraction(df.iloc[[6, 0]]) == 0.25  # unsorted input


def test_all_exported():
    for name in m.__all__:
        assert hasattr(m, name)


def test_correlation_hand_computed():
    from chaintune.metrics import correlation

    # x = 1,2,3,4 ; y = 2,4,5,9: means 2.5, 5; dx = -1.5,-.5,.5,1.5; dy = -3,-1,0,4
    # Sxy = 4.5+0.5+0+6 = 11; Sxx = 5; Syy = 9+1+0+16 = 26 → r = 11/sqrt(130) = 0.964764; slope = 11/5 = 2.2,
    # intercept = 5 − 2.2·2.5 = −0.5; ranks identical → ρ = 1
    c = correlation([1, 2, 3, 4], [2, 4, 5, 9])
    assert c.n == 4 and c.pearson_r == pytest.approx(11 / 130 ** 0.5) and c.r2 == pytest.approx(121 / 130)
    assert (c.slope, c.intercept) == (pytest.approx(2.2), pytest.approx(-0.5)) and c.spearman_rho == pytest.approx(1)
    # t = r·sqrt(n−2)/sqrt(1−r²) with df 2 → two-sided p
    from scipy import stats
    t = (11 / 130 ** 0.5) * 2 ** 0.5 / (1 - 121 / 130) ** 0.5
    assert c.pearson_p == pytest.approx(2 * stats.t.sf(t, 2))
    assert correlation([1, 2], [3, 4]).note.startswith("undefined") and correlation([1, 1, 1], [1, 2, 3]).note


def run_data(chain: str, seed: int, stages: list[str], metrics: dict):
    """A loaded run (analysis.RunData) with hand-written metrics: what the analysis tables read."""
    from chaintune.analysis import RunData
    from chaintune.rundir import RunRecord

    record = RunRecord(run_id=f"{chain}-seed{seed}", id="-", chain=chain, base_chain=chain, seed=seed, stages=stages)
    return RunData(record, pd.DataFrame(), pd.DataFrame(), metrics, [], {})


def test_curvature_vs_forgetting_uses_next_stage_forgetting_and_counts_shared_first_stages():
    from scipy import stats

    from chaintune.analysis import curvature_vs_forgetting

    def run(chain, seed, task, lam, F, after=2):
        return run_data(chain, seed, ["base", f"{chain}-{seed}-1", f"{chain}-{seed}-2"], {
            "curvature": [{"stage": 1, "lambda_max": lam}],
            "forgetting": [{"task": task, "trained_stage": 1, "after_stage": after, "F": F, "RF": 2 * F}],
            "group_forgetting": []})

    runs = [run("s-a", 0, "s", 10.0, 1.0), run("s-b", 0, "s", 10.0, 3.0),  # one first stage, two second stages
            run("s-a", 1, "s", 20.0, 4.0), run("c-a", 0, "c", 5.0, 0.5), run("c-a", 1, "c", 7.0, 2.5),
            run("c-a", 2, "c", 9.0, 1.5), run("replay", 0, "s", 99.0, -50.0, after=3)]  # 3rd stage: left out
    points, corr = curvature_vs_forgetting(runs)
    assert len(points) == 6 and 99.0 not in set(points.lambda_max)
    pooled = corr[(corr.target == "F") & (corr.task == "ALL")].iloc[0]
    x, y = [10, 10, 20, 5, 7, 9], [1, 3, 4, 0.5, 2.5, 1.5]
    assert pooled.n == 6 and pooled.first_stages == 5
    assert pooled.pearson_r == pytest.approx(stats.pearsonr(x, y).statistic)
    per_task = corr[(corr.target == "F") & (corr.task == "c")].iloc[0]
    # c: λ = 5, 7, 9 and F = 0.5, 2.5, 1.5 -> deviations (-2, 0, 2), (-1, 1, 0): r = 2 / (sqrt(8) sqrt(2)) = 0.5
    assert per_task.n == 3 and per_task.pearson_r == pytest.approx(0.5) and per_task.first_stages == 3
    assert corr[(corr.target == "RF") & (corr.task == "ALL")].iloc[0].pearson_r == pytest.approx(pooled.pearson_r)


def test_curvature_vs_forgetting_counts_runs_sharing_both_stages_once():
    from chaintune.analysis import curvature_vs_forgetting

    def run(chain, stages, lam, F, F_g):
        return run_data(chain, 0, stages, {
            "curvature": [{"stage": 1, "lambda_max": lam}],
            "forgetting": [{"task": "s", "trained_stage": 1, "after_stage": 2, "F": F, "RF": F}],
            "group_forgetting": [{"task": "s", "group": "g", "trained_stage": 1, "after_stage": 2, "F_g": F_g}]})

    # s-c-again trains the same nodes as s-c (one chain listed twice): one point
    runs = [run("s-c", ["base", "s1", "c2"], 3.0, 1.0, 2.0), run("s-c-again", ["base", "s1", "c2"], 3.0, 1.0, 2.0),
            run("s-d", ["base", "s1", "d2"], 3.0, 4.0, 5.0), run("t-c", ["base", "t1", "c2b"], 6.0, 2.0, 1.0)]
    points, corr = curvature_vs_forgetting(runs)
    assert sorted(points.chain) == ["s-c", "s-d", "t-c"]
    pooled = corr[(corr.target == "F") & (corr.task == "ALL")].iloc[0]
    assert pooled.n == 3 and pooled.first_stages == 2
    assert corr[corr.target == "F_g (s)"].iloc[0].n == 3
