"""Simulated chains for the coverage and power tests of chaintune.stats: one test set shared by all seeds of a chain.

Every question q has a difficulty α_q and a forgetting propensity φ_q (question-level variation in accuracy and in
forgetting); every seed s has an accuracy shift α_s and a forgetting shift φ_s (seed-level variation); every group
g has a forgetting effect φ_g. For seed s and question q (logistic link σ):

    correct before    c1 ~ Bernoulli(σ(α0 + α_q + α_s))
    after stage 2     c2 = c1 · (1 − Bernoulli(σ(φ0 + φ_g(q) + φ_q + φ_s))) + (1 − c1) · Bernoulli(σ(λ0))
    after replay      c3 = c2 + (c1 − c2)⁺ · Bernoulli(σ(ρ0 + ρ_q + ρ_s)) (forgotten questions won back)

so each question stays paired through the stages. A test set is a fresh draw of Q questions from that population;
`truth` is the expectation of a run's statistic over seeds and test sets of the same size (Monte Carlo), which is
what the mean over seeds estimates without bias.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np
from scipy.special import expit

from chaintune import stats as st

GROUP_EFFECTS = (-0.9, -0.3, 0.3, 0.9)


@dataclass(frozen=True)
class Regime:
    """Standard deviations on the logit scale, intercepts, and the test set size Q."""

    name: str
    n_questions: int
    sd_acc_question: float
    sd_acc_seed: float
    sd_forget_question: float
    sd_forget_seed: float
    sd_recover_question: float
    sd_recover_seed: float
    acc0: float = 0.8
    forget0: float = -1.0
    learn0: float = -3.0
    recover0: float = -0.5
    group_effects: tuple[float, ...] = GROUP_EFFECTS


SEED_NOISE = Regime("seed noise dominates", 300, 0.8, 0.3, 0.3, 1.0, 0.3, 0.8)
QUESTION_NOISE = Regime("question noise dominates", 60, 2.0, 0.1, 2.0, 0.1, 1.5, 0.1)
REGIMES = (SEED_NOISE, QUESTION_NOISE)


def codes_for(n_questions: int, n_groups: int) -> np.ndarray:
    """Question → group index, groups of (nearly) equal size."""
    return np.arange(n_questions) % n_groups


def simulate(regime: Regime, n_seeds: int, rng: np.random.Generator, n_experiments: int = 1) -> dict[str, np.ndarray]:
    """(N, S, Q) correctness arrays c1, c2, c3 (0/1 floats) of N independent experiments, each with its own test set
    drawn from the question population and its own seeds."""
    N, S, Q, r = n_experiments, n_seeds, regime.n_questions, regime
    group = np.asarray(r.group_effects)[codes_for(Q, len(r.group_effects))]

    def effect(sd_q: float, sd_s: float) -> np.ndarray:
        return rng.normal(0, sd_q, (N, 1, Q)) + rng.normal(0, sd_s, (N, S, 1))

    c1 = (rng.random((N, S, Q)) < expit(r.acc0 + effect(r.sd_acc_question, r.sd_acc_seed))).astype(float)
    forget = rng.random((N, S, Q)) < expit(r.forget0 + group + effect(r.sd_forget_question, r.sd_forget_seed))
    learn = rng.random((N, S, Q)) < expit(r.learn0)
    c2 = np.where(c1 == 1, 1.0 - forget, learn.astype(float))
    back = rng.random((N, S, Q)) < expit(r.recover0 + effect(r.sd_recover_question, r.sd_recover_seed))
    c3 = np.where((c1 == 1) & (c2 == 0) & back, 1.0, c2)
    return {"c1": c1, "c2": c2, "c3": c3}


# ------------------------------------------------------------------------------------------------ statistics
def forgetting(sim: dict[str, np.ndarray]) -> np.ndarray:
    """Per-question forgetting d = 100 · (c1 − c2), pp."""
    return 100.0 * (sim["c1"] - sim["c2"])


def pseudo(sim: dict[str, np.ndarray], name: str, n_groups: int = len(GROUP_EFFECTS)) -> tuple[np.ndarray, np.ndarray]:
    """(per-run θ, pseudo-values y) of statistic `name` over the last axis: F, RF, F_g (group 3), BF_g (group 0),
    BF_max, BF_spread, BF_std, recovery."""
    d = forgetting(sim)
    codes = codes_for(d.shape[-1], n_groups)
    if name == "F":
        return d.mean(axis=-1), d
    if name == "RF":
        return st.ratio_pseudo_values(d, 100.0 * sim["c1"], 100.0)
    if name == "F_g":
        member = d[..., codes == 3]
        return member.mean(axis=-1), member
    if name == "BF_g":
        return st.bf_g_pseudo_values(d, codes, 0)
    if name in st.BF_SUMMARIES:
        return st.bf_summary_pseudo_values(d, codes, np.ones(n_groups, bool), name)
    if name == "recovery":
        return st.ratio_pseudo_values(sim["c3"] - sim["c2"], sim["c1"] - sim["c2"])
    raise ValueError(name)


STATISTICS = ("F", "RF", "F_g", "BF_g", "BF_max", "BF_spread", "BF_std", "recovery")


@functools.lru_cache(maxsize=None)
def truth(regime: Regime, name: str, n_runs: int = 40_000, seed: int = 12345) -> float:
    """E[θ of one run] over seeds and test sets of regime.n_questions questions (Monte Carlo, n_runs runs)."""
    rng = np.random.default_rng(seed)
    thetas = [pseudo(simulate(regime, 1, rng, 2000), name)[0] for _ in range(max(n_runs // 2000, 1))]
    return float(np.nanmean(np.concatenate(thetas)))


def covers(regime: Regime, name: str, n_seeds: int, n_experiments: int, seed: int,
           true_value: float) -> tuple[float, float]:
    """(coverage, mean width) of nominal 95 % crossed intervals for `name` over n_experiments simulated chains."""
    sim = simulate(regime, n_seeds, np.random.default_rng(seed), n_experiments)
    _, y = pseudo(sim, name)
    hits, widths = [], []
    for k in range(n_experiments):
        ci = st.crossed_interval(y[k], floor=name not in st.BF_SUMMARIES)
        hits.append(ci.ci_low <= true_value <= ci.ci_high)
        widths.append(ci.ci_high - ci.ci_low)
    return float(np.mean(hits)), float(np.nanmean(widths))


SECOND_ORDER_SHIFT = -0.5  # the second chain forgets less (logit shift of φ0)


def order_truth(regime: Regime) -> float:
    """E[RF of a run of the first chain] − E[RF of a run of the second chain]."""
    return truth(regime, "RF") - truth(replace(regime, forget0=regime.forget0 + SECOND_ORDER_SHIFT), "RF")


def order_covers(regime: Regime, n_seeds: int, n_experiments: int, seed: int) -> float:
    """Coverage of the crossed interval of mean RF(first chain) − mean RF(second chain): independent seeds, separate
    test sets (the two orders of a pair evaluate different tasks)."""
    second = replace(regime, forget0=regime.forget0 + SECOND_ORDER_SHIFT)
    rng = np.random.default_rng(seed)
    _, y1 = pseudo(simulate(regime, n_seeds, rng, n_experiments), "RF")
    _, y2 = pseudo(simulate(second, n_seeds, rng, n_experiments), "RF")
    true_value = order_truth(regime)
    hits = [(ci := st.crossed_difference(y1[k], y2[k])).ci_low <= true_value <= ci.ci_high
            for k in range(n_experiments)]
    return float(np.mean(hits))


def pigeonhole_covers(regime: Regime, n_seeds: int, n_experiments: int, seed: int, n_resamples: int = 500) -> float:
    """Coverage of Owen's (2007) pigeonhole bootstrap for F, for comparison: each replicate resamples the seeds and,
    once for all of them, the questions; 95 % percentile interval."""
    rng = np.random.default_rng(seed)
    d = forgetting(simulate(regime, n_seeds, rng, n_experiments))
    true_value, hits = truth(regime, "F"), []
    for k in range(n_experiments):
        rows = rng.integers(0, n_seeds, (n_resamples, n_seeds))
        cols = rng.integers(0, regime.n_questions, (n_resamples, regime.n_questions))
        means = np.array([d[k][np.ix_(r, c)].mean() for r, c in zip(rows, cols)])
        lo, hi = np.percentile(means, [2.5, 97.5])
        hits.append(lo <= true_value <= hi)
    return float(np.mean(hits))


def coverage_table(n_experiments: int = 1000, seeds: tuple[int, ...] = (3, 5, 10)) -> str:
    """The Markdown coverage table of docs/metrics.md: every statistic, both regimes, each number of seeds."""
    lines = ["| statistic | regime | " + " | ".join(f"{s} seeds" for s in seeds) + " |",
             "|---|---|" + "---|" * len(seeds)]
    for regime in REGIMES:
        for name in STATISTICS:
            cells = [f"{100 * covers(regime, name, s, n_experiments, 1000 + s, truth(regime, name))[0]:.1f}"
                     for s in seeds]
            lines.append(f"| {name} | {regime.name} | " + " | ".join(cells) + " |")
        cells = [f"{100 * order_covers(regime, s, n_experiments, 2000 + s):.1f}" for s in seeds]
        lines.append(f"| order difference (RF) | {regime.name} | " + " | ".join(cells) + " |")
        cells = [f"{100 * pigeonhole_covers(regime, s, min(n_experiments, 400), 3000 + s):.1f}" for s in seeds]
        lines.append(f"| F, pigeonhole bootstrap (not used) | {regime.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # python tests/crossed_sim.py: the coverage table of docs/metrics.md
    print(coverage_table())
