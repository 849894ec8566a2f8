"""Power planning (`chaintune power`, chaintune.analysis.power): designs the planner calls 80 %-powered detect a
simulated effect in 70–90 % of simulated experiments; the command on a real pilot directory; its errors."""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
from crossed_sim import QUESTION_NOISE, SEED_NOISE, pseudo, simulate, truth
from golden.sweep import RUNDIR_V1

from chaintune import stats as st
from chaintune.analysis.power import Targets, plan_power
from chaintune.cli import main
from chaintune.errors import ChaintuneError

BAR = (0.70, 0.90)
N_EXPERIMENTS = 400
SHIFT = -0.4  # the second order's forgetting logit shift: the simulated order effect


def _order(regime, n_seeds: int, n_questions: int, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """RF pseudo-values of n simulated experiments of both orders (independent seeds, separate test sets)."""
    first = replace(regime, n_questions=n_questions)
    _, y1 = pseudo(simulate(first, n_seeds, rng, n), "RF")
    _, y2 = pseudo(simulate(replace(first, forget0=regime.forget0 + SHIFT), n_seeds, rng, n), "RF")
    return y1, y2


def _detected(y1: np.ndarray, y2: np.ndarray) -> float:
    return float(np.mean([st.crossed_difference(a, b).p_value < 0.05 for a, b in zip(y1, y2)]))


def _pilot(regime, rng):
    """A large pilot (200 seeds, the regime's test set size): the planner's variance terms, estimated well. (A pilot
    is only as good as its estimates: from few seeds or few questions, the seed and the seed × question parts of a
    ratio are uncertain, and so are the designs; docs/metrics.md says by how much.)"""
    return st.crossed_difference(*(y[0] for y in _order(regime, 200, regime.n_questions, 1, rng)))


def test_planned_question_counts_reach_their_power():
    # question noise dominates: more test questions are what buys power; at 5 and 10 seeds the planner's question
    # count must detect the true order difference (E[RF] of one order minus the other's) in 70–90 % of experiments
    regime, rng = replace(QUESTION_NOISE, n_questions=300), np.random.default_rng(7)
    effect = truth(regime, "RF") - truth(replace(regime, forget0=regime.forget0 + SHIFT), "RF")
    terms = _pilot(regime, rng).terms
    for n_seeds in (5, 10):
        k = st.questions_needed(terms, n_seeds, effect)
        assert k is not None and k > 1
        rate = _detected(*_order(regime, n_seeds, math.ceil(k * regime.n_questions), N_EXPERIMENTS, rng))
        assert BAR[0] <= rate <= BAR[1], (n_seeds, k, rate)


def test_planned_seed_counts_reach_their_power():
    # seed noise dominates: seeds buy power; the fewest seeds the planner finds at the pilot's 300 questions
    regime, rng = replace(SEED_NOISE, sd_forget_seed=0.5), np.random.default_rng(8)
    shifted = replace(regime, forget0=regime.forget0 + 2.5 * SHIFT)
    effect = truth(regime, "RF") - truth(shifted, "RF")
    pilot = st.crossed_difference(pseudo(simulate(regime, 200, rng, 1), "RF")[1][0],
                                  pseudo(simulate(shifted, 200, rng, 1), "RF")[1][0])
    n_seeds = st.seeds_needed(pilot.terms, effect)
    assert n_seeds is not None and 3 <= n_seeds <= 20
    y1 = pseudo(simulate(regime, n_seeds, rng, N_EXPERIMENTS), "RF")[1]
    y2 = pseudo(simulate(shifted, n_seeds, rng, N_EXPERIMENTS), "RF")[1]
    rate = _detected(y1, y2)
    assert BAR[0] <= rate <= BAR[1], (n_seeds, rate)


def test_planned_recovery_design_reaches_its_power():
    # replay recovery of one chain (recovery = 0 vs its true value), question noise dominating
    regime, rng = replace(QUESTION_NOISE, recover0=-4.0, n_questions=200), np.random.default_rng(9)
    effect = truth(regime, "recovery")
    terms = st.crossed_interval(pseudo(simulate(regime, 200, rng, 1), "recovery")[1][0]).terms
    k = st.questions_needed(terms, 5, effect)
    assert k is not None and k > 1
    y = pseudo(simulate(replace(regime, n_questions=math.ceil(k * regime.n_questions)), 5, rng, N_EXPERIMENTS),
               "recovery")[1]
    rate = float(np.mean([st.crossed_interval(row).p_value < 0.05 for row in y]))
    assert BAR[0] <= rate <= BAR[1], (k, rate)


# ------------------------------------------------------------------------------------------------ the command
def test_plan_power_on_a_pilot_directory():
    plan = plan_power(RUNDIR_V1, Targets(seeds=(2, 4)))
    f = plan.findings.set_index("finding")
    assert {"forgetting F", "order difference (RF)", "replay recovery"} <= set(f.index)
    assert any(name.startswith("BF_spread") for name in f.index)
    crossed = plan.findings[~plan.findings.finding.str.startswith("curvature")]  # correlations have no shares
    shares = crossed[["seed_share", "question_share", "residual_share"]].sum(axis=1)
    assert np.allclose(shares, 1.0)
    # the MDE of the pilot's design is the effect its t test detects with 80 % power
    row = plan.findings[plan.findings.finding == "order difference (RF)"].iloc[0]
    assert row.target == 5.0 and row.power_at_target < 0.8 < st.power(row.mde, row.se ** 2, 1e9)
    bf = plan.findings[plan.findings.finding.str.startswith("BF_spread")].iloc[0]
    assert bf.level == pytest.approx(0.05 / 6) and bf.target == 10.0  # 6 groups; the group effect is 5
    designs = plan.designs
    assert set(designs.seeds) == {2, 4} and (designs.question_factor.dropna() >= 1).all()
    reached = designs.dropna(subset=["question_factor"])
    assert (reached.power >= 0.8 - 1e-6).all()
    # CPU time: trained stages scale with seeds, evaluations with seeds × questions (base model: questions only)
    order = designs[designs.finding == "order difference (RF)"].set_index("seeds")
    pilot_hours = row.cpu_hours
    assert order.loc[4, "cpu_hours"] > order.loc[2, "cpu_hours"] > pilot_hours > 0
    assert set(plan.speeds.task) == {"bbq", "arc_easy"} and (plan.speeds["eval ms per question"] > 0).all()


def test_power_command_prints_the_plan(capsys):
    assert main(["power", str(RUNDIR_V1), "--seeds", "3,5", "--order", "10"]) == 0
    printed = capsys.readouterr().out
    for fragment in ("Minimal detectable effects", "order difference", "BF_spread", "replay recovery",
                     "3 seeds", "5 seeds", "Measured speeds", "CPU time"):
        assert fragment in printed


def test_old_directories_without_evaluation_times(tmp_path):
    out = tmp_path / "old"
    shutil.copytree(RUNDIR_V1, out)
    for path in out.glob("stages/*/eval/*.json"):
        record = json.loads(path.read_text())
        record.pop("seconds")
        path.write_text(json.dumps(record))
    plan = plan_power(out)
    assert any("no evaluation times" in note for note in plan.notes)
    assert (plan.findings.cpu_hours > 0).all()  # training and curvature still count


@pytest.mark.parametrize("args, fragment", [
    (["does-not-exist"], "does not exist"),
    ([str(RUNDIR_V1), "--seeds", "1,3"], "1 is out of range"),
    ([str(RUNDIR_V1), "--seeds", "three"], "not an integer"),
    ([str(RUNDIR_V1), "--power", "1.5"], "1.5 is out of range"),
    ([str(RUNDIR_V1), "--spread", "0"], "0 is out of range"),
])
def test_power_command_errors_are_one_line(args, fragment, capsys):
    try:
        code = main(["power", *args])
    except SystemExit as exc:  # option errors leave through argparse, as one line too
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err and err.startswith("chaintune: error:")


def test_one_seed_pilot_is_refused(tmp_path):
    out = tmp_path / "one"
    shutil.copytree(RUNDIR_V1, out)
    for run in out.glob("runs/*seed1*"):
        shutil.rmtree(run)
    with pytest.raises(ChaintuneError, match="one seed.*>= 2 seeds per chain"):
        plan_power(out)
    with pytest.raises(ChaintuneError, match="no finished runs"):
        plan_power(tmp_path)


# ------------------------------------------------------------------------------------------------ correlations
def test_correlation_power_by_hand():
    # Fisher z: atanh(0.5) = 0.549306; with 28 points √25 = 5, so Φ(2.746531 − 1.959964) + Φ(−2.746531 − 1.959964)
    assert st.correlation_power(0.5, 28) == pytest.approx(0.784233 + 1.26e-6, abs=2e-6)
    assert st.correlation_power(-0.5, 28) == st.correlation_power(0.5, 28)
    # 29 points give 0.7979 (< 0.8), 30 give 0.8112: ((1.959964 + 0.841621) / 0.549306)² + 3 = 29.01
    assert st.correlation_points_needed(0.5) == 30
    mde = st.correlation_mde(30)
    assert mde < 0.5 and st.correlation_power(mde, 30) == pytest.approx(0.8, abs=1e-9)
    assert math.isnan(st.correlation_power(0.5, 3)) and math.isnan(st.correlation_mde(3))
    assert st.correlation_points_needed(0.0) is None


def test_planned_correlation_design_reaches_its_power():
    # the points the planner asks for, for ρ = 0.4, detect it (Pearson's exact test, α 0.05) in 70–90 % of experiments
    from scipy.stats import pearsonr
    rng, rho = np.random.default_rng(21), 0.4
    n = st.correlation_points_needed(rho)
    assert 40 <= n <= 55
    cov = [[1.0, rho], [rho, 1.0]]
    rate = np.mean([pearsonr(*rng.multivariate_normal([0, 0], cov, n).T).pvalue < 0.05 for _ in range(N_EXPERIMENTS)])
    assert BAR[0] <= rate <= BAR[1], (n, rate)


def test_plan_power_plans_curvature_over_distinct_first_stages():
    plan = plan_power(RUNDIR_V1, Targets(seeds=(2, 4), correlation=0.6))
    rows = plan.findings[plan.findings.finding.str.startswith("curvature")]
    overall = rows[rows.subject.str.contains("all first-stage tasks")].iloc[0]
    assert overall.target == 0.6 and overall.points >= 4 and math.isnan(overall.questions)
    assert overall.mde == pytest.approx(st.correlation_mde(int(overall.points)))
    designs = plan.designs[plan.designs.subject == overall.subject].set_index("seeds")
    # the fixture has 2 seeds: 4 seeds double the distinct first stages
    assert designs.loc[4, "points"] == 2 * designs.loc[2, "points"] == 2 * overall.points
    assert designs.loc[4, "power"] == pytest.approx(st.correlation_power(0.6, int(designs.loc[4, "points"])))
    with pytest.raises(ChaintuneError, match="correlation"):
        plan_power(RUNDIR_V1, Targets(correlation=1.0))
