"""The paper's claims with verdicts (chaintune.analysis.claims): verdict rules by hand, the Fisher-z interval by
hand and by simulated coverage, and the table on a real pilot directory agreeing with the summary tables."""
from __future__ import annotations

import math

import numpy as np
import pytest
from golden.sweep import RUNDIR_V1

from chaintune.analysis.claims import _fisher, claims_table, verdict
from chaintune.analysis.records import load_runs
from chaintune.analysis.tables import summary_tables
from chaintune.rundir import RunDir


def test_verdict_rules():
    assert verdict(0.01, 3.0, 10.0, 5.0) == "reproduces"  # significant, paper's sign (even if MDE > target)
    assert verdict(0.01, -3.0, 1.0, 5.0) == "does not (opposite direction)"
    assert verdict(0.01, -3.0, 1.0, 5.0, direction=0) == "reproduces"  # any sign (biased forgetting)
    assert verdict(0.30, 1.0, 4.0, 5.0) == "does not (powered null)"  # a 5-point effect would have been seen
    assert verdict(0.30, 1.0, 5.0, 5.0) == "does not (powered null)"
    assert verdict(0.30, 1.0, 6.0, 5.0) == "cannot tell at this power"
    assert verdict(0.30, 1.0, math.nan, 5.0) == "cannot tell at this power"
    assert verdict(math.nan, 1.0, 1.0, 5.0) == "no test"
    assert verdict(0.04, 1.0, 9.0, 5.0, alpha=0.01) == "cannot tell at this power"


def test_fisher_interval_by_hand():
    # r 0.5 over 28 points: z = atanh 0.5 = 0.549306, se = 1/5; 1.959964 × 0.2 = 0.391993
    low, high, p = _fisher(0.5, 28)
    assert low == pytest.approx(math.tanh(0.549306 - 0.391993), abs=1e-6)  # 0.15602
    assert high == pytest.approx(math.tanh(0.549306 + 0.391993), abs=1e-6)  # 0.73572
    assert p == pytest.approx(0.006022, abs=2e-6)  # 2 × P(Z > 2.746531)
    assert all(math.isnan(v) for v in _fisher(0.5, 3)) and all(math.isnan(v) for v in _fisher(math.nan, 10))


@pytest.mark.parametrize("n", [10, 30])
def test_fisher_interval_covers(n):
    rng, rho = np.random.default_rng(n), 0.5
    cov = [[1.0, rho], [rho, 1.0]]
    hits = []
    for _ in range(400):
        x, y = rng.multivariate_normal([0, 0], cov, n).T
        low, high, _ = _fisher(float(np.corrcoef(x, y)[0, 1]), n)
        hits.append(low <= rho <= high)
    assert 0.90 <= np.mean(hits) <= 0.98


def test_claims_table_on_a_pilot_directory():
    runs = [r for r in load_runs(RunDir(RUNDIR_V1)) if not r.failed_stages]
    tables = summary_tables(runs)
    claims = tables["claims"]
    assert claims.equals(claims_table(runs, tables))
    assert {"order: safety forgotten more when it comes first", "biased forgetting across groups",
            "curvature: sharper first stage, more forgetting", "replay recovers what was forgotten"} \
        == set(claims.claim)
    # the order row is the order table's crossed test (one pair: no correction)
    order, table = claims[claims.claim.str.startswith("order")].iloc[0], tables["order_asymmetry"].iloc[0]
    assert order.effect == pytest.approx(-table.difference)  # the safety-first chain first: bbq→arc minus arc→bbq
    assert order.p_value == pytest.approx(table.p_value) == order.adj_p and order.correction == "none (one test)"
    assert (order.ci_low, order.ci_high) == pytest.approx((-table.ci_high, -table.ci_low))
    # each biased-forgetting row: the spread's interval and the smallest Holm-adjusted BF_g p of its chain
    groups = tables["group_forgetting"]
    for row in claims[claims.claim.str.startswith("biased")].itertuples():
        chain = row.subject.rsplit(": ", 1)[0]
        part = groups[(groups.chain == chain) & groups.included]
        assert row.adj_p == pytest.approx(part.BF_g_adj_p.min()) and row.correction == f"Holm over {len(part)} groups"
        assert row.verdict == verdict(row.adj_p, row.effect, row.mde, 10.0, 0)
    # replay: the replay table's recovery and interval
    rep, table = claims[claims.claim.str.startswith("replay")].iloc[0], tables["replay"].iloc[0]
    assert rep.effect == pytest.approx(table.recovery)
    assert (rep.ci_low, rep.ci_high) == pytest.approx((table.recovery_ci_low, table.recovery_ci_high))
    # curvature: pooled row over the distinct first stages, by Fisher z
    curv = claims[claims.subject == "all first-stage tasks"].iloc[0]
    corr = tables["curvature_vs_forgetting"]
    pooled = corr[(corr.target == "F") & (corr.task == "ALL")].iloc[0]
    assert curv.effect == pytest.approx(pooled.pearson_r) and curv.n == f"{pooled.first_stages} first stages"
    assert curv.p_value == pytest.approx(_fisher(pooled.pearson_r, int(pooled.first_stages))[2])
    assert set(claims.verdict) <= {"reproduces", "does not (opposite direction)", "does not (powered null)",
                                   "cannot tell at this power", "no test"}


def test_one_seed_gives_no_verdict_on_biased_forgetting():
    # seed 0 alone: the group p-values are the run's bootstrap over questions; no claim about the recipe
    runs = [r for r in load_runs(RunDir(RUNDIR_V1)) if r.seed == 0 and not r.failed_stages]
    claims = summary_tables(runs)["claims"]
    bias = claims[claims.claim.str.startswith("biased")]
    assert len(bias) and (bias.verdict == "no test (one seed: questions only)").all()
