"""chaintune.stats against values worked out by hand in the comments: crossed seed × question intervals, per-question
linearisation, Holm / Benjamini–Hochberg, the permutation test and the power formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sp

from chaintune import stats as st

# rows = seeds, columns = questions
Y = np.array([[2.0, 4.0, 9.0],
              [6.0, 8.0, 7.0],
              [1.0, 0.0, 8.0]])


# ---------------------------------------------------------------- variance components, crossed interval
def test_variance_components_hand():
    # row means 5, 7, 3 (var 4) -> MS_seed = Q·4 = 12; column means 3, 4, 8 (var 7) -> MS_question = S·7 = 21;
    # residuals y − row − col + 5: [-1 0 1; 1 2 -3; 0 -2 2], Σ² = 24 on (3−1)(3−1) = 4 df -> MS_residual = 6
    assert st.variance_components(Y) == pytest.approx((12.0, 21.0, 6.0))
    # 2×3: rows 3, 3 -> 0; columns 2, 3, 4 (var 1) -> 2; residuals [-1 -1 2; 1 1 -2], Σ² = 12 on 2 df -> 6
    assert st.variance_components([[1, 2, 6], [3, 4, 2]]) == pytest.approx((0.0, 2.0, 6.0))
    with pytest.raises(ValueError, match=">= 2 seeds"):
        st.variance_components([[1.0, 2.0]])


def test_crossed_interval_hand():
    # A = var(rows)/S = 4/3, B = var(cols)/Q = 7/3, r = MS_residual/(S·Q) = 6/9 = 2/3
    # V = max(A, r) + max(0, B − r) = 4/3 + 5/3 = 3 = (MS_seed + MS_question − MS_residual)/(S·Q) = 27/9
    # components: seed A − r = 2/3, question B − r = 5/3, residual 2/3
    # Satterthwaite: ν = 3² / ((4/3)²/2 + (7/3)²/2 + (2/3)²/4) = 9 / (67/18) = 162/67 ≈ 2.418 (>= the floor 2)
    ci = st.crossed_interval(Y)
    assert ci.estimate == pytest.approx(5.0) and ci.se == pytest.approx(math.sqrt(3))
    assert (ci.var_seed, ci.var_question, ci.var_residual) == pytest.approx((2 / 3, 5 / 3, 2 / 3))
    assert ci.df == pytest.approx(162 / 67)
    half = sp.t.ppf(0.975, 162 / 67) * math.sqrt(3)
    assert (ci.ci_low, ci.ci_high) == pytest.approx((5 - half, 5 + half))
    assert ci.t == pytest.approx(5 / math.sqrt(3))
    assert ci.p_value == pytest.approx(2 * sp.t.sf(5 / math.sqrt(3), 162 / 67))
    assert (ci.n_seeds, ci.n_questions) == (3, 3)
    assert sorted((t.kind, t.n_seeds, t.n_questions) for t in ci.terms) == [
        ("question", 0, 3), ("residual", 3, 3), ("seed", 3, 0)]


def test_crossed_interval_floor():
    # [[1 2 6], [3 4 2]]: A = 0 (both seeds average 3), B = 1/3, r = 6/6 = 1
    # floor: V = max(0, 1) + max(0, 1/3 − 1) = 1 on the residual's (2−1)(3−1) = 2 df
    ci = st.crossed_interval([[1, 2, 6], [3, 4, 2]])
    assert ci.se == pytest.approx(1.0) and ci.df == pytest.approx(2.0)
    assert ci.ci_high == pytest.approx(3 + sp.t.ppf(0.975, 2))
    # floor=False (statistics not smooth in their questions): V = A = 0 -> a point, no test
    flat = st.crossed_interval([[1, 2, 6], [3, 4, 2]], floor=False)
    assert flat.ci_low == flat.ci_high == 3.0 and math.isnan(flat.p_value) and "zero variance" in flat.note


def test_crossed_interval_needs_two_seeds_and_two_questions():
    one_seed = st.crossed_interval([[1.0, 2.0, 3.0]])
    assert one_seed.estimate == 2.0 and math.isnan(one_seed.ci_low) and "1 seed" in one_seed.note
    assert math.isnan(st.crossed_interval([[1.0], [2.0]]).se)


def test_crossed_difference_separate_and_shared_questions():
    y1 = np.array([[1.0, 3.0], [3.0, 5.0]])  # additive: rows 2, 4; columns 2, 4; residual 0; mean 3
    y2 = np.array([[0.0, 2.0], [2.0, 0.0]])  # rows 1, 1; columns 1, 1; residuals ±1 -> MS 4, r = 4/4 = 1; mean 1
    # separate question sets: V1 = A1 + B1 = var(2,4)/2 + var(2,4)/2 = 1 + 1 = 2; V2 = max(A2 = 0, r2 = 1) = 1
    sep = st.crossed_difference(y1, y2)
    assert sep.estimate == pytest.approx(2.0) and sep.se == pytest.approx(math.sqrt(3))
    # shared questions: v(q) = column means of y1 − of y2 = (1, 3): B = var(1, 3)/2 = 1 = r1 + r2, so the question
    # component is 0; V = A1 + max(A2, r2) = 1 + 1 = 2 (the questions' shared effect cancels)
    shared = st.crossed_difference(y1, y2, shared_questions=True)
    assert shared.estimate == pytest.approx(2.0) and shared.se == pytest.approx(math.sqrt(2))
    assert shared.df == pytest.approx(2.0)  # ν = 2² / (1²/1 + 1²/1)
    with pytest.raises(ValueError, match="equal question counts"):
        st.crossed_difference(y1, np.ones((2, 3)), shared_questions=True)


def test_blocks_from_runs_clusters_equal_seeds():
    # runs A, B (seed 0) and C, D (seed 1): the mean of run means (2 + 4 + 1 + 2)/4 = 2.25; rows are summed per
    # seed ([4, 8], [2, 4]) with weight S/N = 2/4: 0.5 · mean([4, 8, 2, 4]) = 2.25
    runs = [st.RunValues(0, "t", ("a", "b"), np.array([1.0, 3.0])),
            st.RunValues(0, "t", ("b", "a"), np.array([5.0, 3.0])),  # same questions, other order
            st.RunValues(1, "t", ("a", "b"), np.array([0.0, 2.0])),
            st.RunValues(1, "t", ("a", "b"), np.array([2.0, 2.0]))]
    (block,) = st.blocks_from_runs(runs)
    assert block.weight == 0.5 and block.values.tolist() == [[4.0, 8.0], [2.0, 4.0]]
    assert st.crossed_estimate([block]).estimate == pytest.approx(2.25)
    with pytest.raises(ValueError, match="different questions"):
        st.blocks_from_runs(runs + [st.RunValues(1, "t", ("a", "c"), np.zeros(2))])
    with pytest.raises(ValueError, match="not all of"):
        st.blocks_from_runs(runs + [st.RunValues(0, "u", ("x", "y"), np.zeros(2))])


def test_satterthwaite_df_hand():
    # (1 + 1)² / (1/1 + 1/1) = 2; with a part on infinite df only: inf
    assert st.satterthwaite_df([1.0, 1.0], [1, 1]) == pytest.approx(2.0)
    assert st.satterthwaite_df([2.0], [np.inf]) == math.inf


# ---------------------------------------------------------------- linearisation
def test_ratio_pseudo_values_hand():
    # θ = mean(num)/mean(den) = 0.5/0.75 = 2/3; y = θ + (num − θ·den)/0.75 = 2/3 + (1/3, −2/3, 1/3, 0)/0.75
    theta, y = st.ratio_pseudo_values([1, 0, 1, 0], [1, 1, 1, 0])
    assert theta == pytest.approx(2 / 3)
    assert y == pytest.approx([10 / 9, -2 / 9, 10 / 9, 6 / 9]) and y.mean() == pytest.approx(theta)
    # RF: scale 100, rows are seeds; a row with nothing known before is NaN
    theta, y = st.ratio_pseudo_values([[100, 0], [0, 0]], [[100, 100], [0, 0]], 100.0)
    assert theta[0] == pytest.approx(50.0) and math.isnan(theta[1]) and np.isnan(y[1]).all()


D = np.array([100.0, 0.0, 0.0, 100.0, 100.0, 0.0])  # per-question forgetting, pp
CODES = np.array([0, 0, 1, 1, 1, -1])  # group 0: q0, q1; group 1: q2..q4; q5 in no group
# F = 300/6 = 50, F_0 = 50, F_1 = 200/3


def test_bf_g_pseudo_values_hand():
    # BF_1 = 200/3 − 50 = 50/3; y = θ + (Q/Q_1 = 2)·[q in 1]·(d − F_1) − (d − F)
    theta, y = st.bf_g_pseudo_values(D, CODES, 1)
    assert theta == pytest.approx(50 / 3)
    assert y == pytest.approx([-100 / 3, 200 / 3, -200 / 3, 100 / 3, 100 / 3, 200 / 3])
    assert y.mean() == pytest.approx(theta)


def test_bf_summary_pseudo_values_hand():
    both = np.array([True, True])
    # BF_spread = F_1 − F_0 = 50/3: +2·[q in 1](d − F_1) − 3·[q in 0](d − F_0)
    theta, y = st.bf_summary_pseudo_values(D, CODES, both, "BF_spread")
    assert theta == pytest.approx(50 / 3)
    assert y == pytest.approx([-400 / 3, 500 / 3, -350 / 3, 250 / 3, 250 / 3, 50 / 3])
    # BF_max = max(|50 − 50|, |200/3 − 50|) at group 1, sign +: the same pseudo-values as BF_1
    theta, y = st.bf_summary_pseudo_values(D, CODES, both, "BF_max")
    assert theta == pytest.approx(50 / 3) and y == pytest.approx(st.bf_g_pseudo_values(D, CODES, 1)[1])
    # BF_std: F_g = (50, 200/3), mean 175/3, std 25/3; slopes (F_g − mean)/(2·std) = (−1/2, 1/2)
    theta, y = st.bf_summary_pseudo_values(D, CODES, both, "BF_std")
    assert theta == pytest.approx(25 / 3)
    assert y == pytest.approx([-200 / 3, 250 / 3, -175 / 3, 125 / 3, 125 / 3, 25 / 3]) and y.mean() == pytest.approx(theta)
    # only group 1 included: its spread is 0 and its std 0 (flat pseudo-values)
    theta, y = st.bf_summary_pseudo_values(D, CODES, np.array([False, True]), "BF_spread")
    assert theta == 0 and y == pytest.approx(np.zeros(6))
    with pytest.raises(ValueError, match="kind"):
        st.bf_summary_pseudo_values(D, CODES, both, "BF_mean")
    with pytest.raises(ValueError, match="no included group"):
        st.bf_summary_pseudo_values(D, CODES, np.array([False, False]), "BF_max")


def test_pseudo_values_broadcast_over_seeds():
    d = np.stack([D, D[::-1]])  # two seeds
    theta, y = st.bf_summary_pseudo_values(d, CODES, np.array([True, True]), "BF_std")
    assert theta.shape == (2,) and y.shape == (2, 6)
    assert y.mean(axis=1) == pytest.approx(theta)
    assert st.group_means(d, CODES).shape == (2, 2)


# ---------------------------------------------------------------- multiple comparisons
def test_holm_and_benjamini_hochberg_hand():
    p = [0.01, 0.04, 0.03, math.nan, 0.5]  # m = 4 tests (NaN is not a test)
    # Holm: sorted 0.01·4 = 0.04, 0.03·3 = 0.09, 0.04·2 = 0.08 -> running max 0.09, 0.5·1 = 0.5
    assert st.holm(p)[[0, 1, 2, 4]] == pytest.approx([0.04, 0.09, 0.09, 0.5]) and math.isnan(st.holm(p)[3])
    # BH: 0.01·4/1 = 0.04, 0.03·4/2 = 0.06, 0.04·4/3 = 0.0533, 0.5 -> running min from the top: 0.0533 for both
    bh = st.adjust_p_values(p, "bh")
    assert bh[[0, 1, 2, 4]] == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.5])
    assert st.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert st.holm([]).size == 0
    with pytest.raises(ValueError, match="correction"):
        st.adjust_p_values(p, "bonferroni")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        st.holm([1.5])


# ---------------------------------------------------------------- permutation test
def test_permutation_test_exact_hand():
    # first (3, 5) vs second (1, 0, 2): difference 4 − 1 = 3. Of the C(5, 2) = 10 ways to label two of the five
    # values 'first', only (3, 5) gives |mean(first) − mean(rest)| >= 3 (the next largest is (5, 2): 3.5 − 4/3)
    res = st.permutation_test([([3, 5], [1, 0, 2])])
    assert res.difference == pytest.approx(3.0) and res.exact and res.n_permutations == 10
    assert res.p_value == pytest.approx(0.1)
    # two strata permuted within themselves: 2 · 2 = 4 assignments; only the observed one is as extreme
    res = st.permutation_test([([10], [0]), ([1], [0])])
    assert res.n_permutations == 4 and res.p_value == pytest.approx(0.5)  # the observed labels and their mirror
    # random assignments when there are too many: p = (1 + #extreme)/(1 + B), close to the exact value
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 1, 8), rng.normal(0, 1, 8)
    exact = st.permutation_test([(a, b)])
    sampled = st.permutation_test([(a, b)], max_exact=100, n_resamples=20_000)
    assert exact.exact and not sampled.exact and sampled.p_value == pytest.approx(exact.p_value, abs=0.01)
    assert math.isnan(st.permutation_test([([1.0], [])]).p_value)


# ---------------------------------------------------------------- power
TERMS = (st.VarianceTerm("seed", 4.0, 2, 0), st.VarianceTerm("question", 2.0, 0, 10),
         st.VarianceTerm("residual", 1.0, 2, 10))


def test_design_variance_hand():
    # 4 seeds, 2× the questions: seed 4·2/4 = 2, question 2/2 = 1, residual 1·2/(4·2) = 0.25 -> 3.25
    # as crossed_estimate would see it: the seeds' mean square 2 + 0.25 on 3 df, the questions' 1 + 0.25 on 19 df,
    # minus the residual 0.25 on 3·19 = 57 df: ν = 3.25² / (2.25²/3 + 1.25²/19 + 0.25²/57) ≈ 5.96
    variance, df = st.design_variance(TERMS, 4, 2.0)
    assert variance == pytest.approx(3.25)
    assert df == pytest.approx(3.25 ** 2 / (2.25 ** 2 / 3 + 1.25 ** 2 / 19 + 0.0625 / 57))
    assert st.design_variance(TERMS, 2, 1.0)[0] == pytest.approx(7.0)  # the pilot's own design
    with pytest.raises(ValueError, match=">= 2 seeds"):
        st.design_variance(TERMS, 1)


def test_power_and_minimal_detectable_effect():
    # large df: the normal approximation, effect (z_.975 + z_.8)·se has power 0.80
    z = sp.norm.ppf(0.975) + sp.norm.ppf(0.8)
    assert st.power(z, 1.0, 1e7) == pytest.approx(0.8, abs=1e-3)
    assert st.power(0.0, 1.0, 10) == pytest.approx(0.05)
    mde = st.minimal_detectable_effect(2.0, 5)
    assert st.power(mde, 2.0, 5) == pytest.approx(0.8) and mde > z * math.sqrt(2)  # t on 5 df is wider
    assert math.isnan(st.minimal_detectable_effect(0.0, 5))


def test_questions_needed():
    # questions only: k·Q questions give variance 2/k on ~10k − 1 df; the solution has power 0.8
    only_q = (st.VarianceTerm("question", 2.0, 0, 10),)
    k = st.questions_needed(only_q, 5, 1.0)
    variance, df = st.design_variance(only_q, 5, k)
    assert st.power(1.0, variance, df) == pytest.approx(0.8, abs=1e-4)
    # the seed part alone (4·2/3 with 3 seeds, df 2) cannot reach 80 % power for an effect of 1
    assert st.questions_needed(TERMS, 3, 1.0) is None
    # a huge effect needs the fewest questions allowed (2 per set)
    assert st.questions_needed(TERMS, 10, 1e3) == pytest.approx(2 / 10)
