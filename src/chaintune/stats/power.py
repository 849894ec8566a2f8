"""Power of the crossed seed × question t test (`stats.crossed`) for other designs: more or fewer seeds per chain,
larger or smaller test sets.

The estimated variance terms of a statistic (`CrossedInterval.terms`) are rescaled to a design with `n_seeds` seeds
in every seed group and `question_factor` × the questions of every question set (the same question population):

    seed term · S / n_seeds,   question term / k,   residual term · S / (n_seeds · k)

and the design's degrees of freedom follow Satterthwaite (1946), each term on n_seeds − 1, k·Q − 1 or
(n_seeds − 1)(k·Q − 1) df. Power is that of the two-sided t test at level α for a true effect δ: with
T ~ noncentral t(ν, δ / se), power = P(|T| > t_{1−α/2, ν}).

Correlations (curvature → forgetting over n distinct first stages) use Fisher's z: atanh(r̂) is about
N(atanh ρ, 1 / (n − 3)), so the two-sided test of ρ = 0 at level α has power
Φ(atanh(ρ)·√(n − 3) − z_{1−α/2}) + Φ(−atanh(ρ)·√(n − 3) − z_{1−α/2}).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import optimize, stats

from chaintune.stats.crossed import VarianceTerm, satterthwaite_df

__all__ = ["design_variance", "power", "minimal_detectable_effect", "questions_needed", "seeds_needed",
           "correlation_power", "correlation_mde", "correlation_points_needed"]


def design_variance(terms: Sequence[VarianceTerm], n_seeds: int, question_factor: float = 1.0) -> tuple[float, float]:
    """(Var θ̂ in units², df) of the design with `n_seeds` seeds per seed group and `question_factor` × each
    question set's questions.

    The df mirror what `crossed_estimate` would compute on that design's data: per seed group a mean square
    seed + Σ residual on n_seeds − 1 df, per question set with a question part (question + Σ residual) on k·Q − 1 df
    minus its residuals on (n_seeds − 1)(k·Q − 1) df, combined by Satterthwaite and kept at least the smallest df
    of the positive parts."""
    if n_seeds < 2:
        raise ValueError(f"need >= 2 seeds for a seed variance, got {n_seeds}")
    k = question_factor
    scaled = {"seed": lambda t: t.variance * t.n_seeds / n_seeds, "question": lambda t: t.variance / k,
              "residual": lambda t: t.variance * t.n_seeds / (n_seeds * k)}
    if any(t.kind not in scaled for t in terms):
        raise ValueError(f"unknown variance term kind in {sorted({t.kind for t in terms})}")
    new = [(t, scaled[t.kind](t)) for t in terms]
    variance = float(sum(v for _, v in new))
    seed_parts: dict = {}
    for t, v in new:
        if t.kind in ("seed", "residual"):
            seed_parts[t.seed_group] = seed_parts.get(t.seed_group, 0.0) + v
    parts, dfs = list(seed_parts.values()), [n_seeds - 1] * len(seed_parts)
    for t, v in new:
        if t.kind == "question":
            own = [(r, rv) for r, rv in new if r.kind == "residual" and r.question_set == t.question_set]
            df_q = max(k * t.n_questions - 1, 1.0)
            parts += [v + sum(rv for _, rv in own)] + [-rv for _, rv in own]
            dfs += [df_q] + [(n_seeds - 1) * df_q] * len(own)
    if variance <= 0:
        return variance, math.nan
    floor = min(d for p, d in zip(parts, dfs) if p > 0)
    return variance, max(satterthwaite_df(parts, dfs), floor)


def power(effect: float, variance: float, df: float, alpha: float = 0.05) -> float:
    """P(reject θ = 0 | θ = effect) of the two-sided t test with standard error √variance on df degrees of freedom."""
    if not (variance > 0 and df > 0):
        return math.nan
    crit = stats.t.ppf(1 - alpha / 2, df)
    ncp = abs(effect) / math.sqrt(variance)
    far = stats.nct.cdf(-crit, df, ncp)  # the wrong-sign tail; scipy gives NaN where it is ~0 (large ncp)
    return float(min(1.0, stats.nct.sf(crit, df, ncp) + (far if math.isfinite(far) else 0.0)))


def minimal_detectable_effect(variance: float, df: float, alpha: float = 0.05, target: float = 0.8) -> float:
    """The smallest |effect| that the two-sided t test detects with probability `target` (units of θ)."""
    if not (variance > 0 and df > 0):
        return math.nan
    se = math.sqrt(variance)
    hi = (stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(target, df) + 1) * se * 4
    return float(optimize.brentq(lambda e: power(e, variance, df, alpha) - target, 0.0, hi, xtol=1e-10 * se))


def questions_needed(terms: Sequence[VarianceTerm], n_seeds: int, effect: float, alpha: float = 0.05,
                     target: float = 0.8, max_factor: float = 1e3) -> float | None:
    """The smallest question factor k at which `n_seeds` seeds detect `effect` with probability `target`; None
    when even `max_factor` × the questions do not (the seed part alone is too large)."""
    sizes = [t.n_questions for t in terms if t.n_questions > 0]
    low = 2.0 / min(sizes) if sizes else 1.0

    def gap(k: float) -> float:
        variance, df = design_variance(terms, n_seeds, k)
        return power(effect, variance, df, alpha) - target

    if not np.isfinite(gap(max_factor)) or gap(max_factor) < 0:
        return None
    if gap(low) >= 0:
        return low
    return float(optimize.brentq(gap, low, max_factor, xtol=1e-6))


def seeds_needed(terms: Sequence[VarianceTerm], effect: float, question_factor: float = 1.0, alpha: float = 0.05,
                 target: float = 0.8, max_seeds: int = 200) -> int | None:
    """The fewest seeds per seed group (>= 2) with which `question_factor` × the questions detect `effect` with
    probability `target`; None if `max_seeds` do not."""
    for n in range(2, max_seeds + 1):
        variance, df = design_variance(terms, n, question_factor)
        if power(effect, variance, df, alpha) >= target:
            return n
    return None


def correlation_power(rho: float, n_points: int, alpha: float = 0.05) -> float:
    """P(reject ρ = 0) of the two-sided Fisher-z test over `n_points` independent points when the true
    correlation is `rho` (NaN below 4 points)."""
    if n_points < 4:
        return math.nan
    shift, crit = math.atanh(min(abs(rho), 1 - 1e-12)) * math.sqrt(n_points - 3), stats.norm.ppf(1 - alpha / 2)
    return float(stats.norm.cdf(shift - crit) + stats.norm.cdf(-shift - crit))


def correlation_mde(n_points: int, alpha: float = 0.05, target: float = 0.8) -> float:
    """The smallest |ρ| that `n_points` independent points detect with probability `target` (NaN below 4)."""
    if n_points < 4:
        return math.nan
    z = (stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(target)) / math.sqrt(n_points - 3)
    return float(optimize.brentq(lambda r: correlation_power(r, n_points, alpha) - target, 0.0, math.tanh(z + 1)))


def correlation_points_needed(rho: float, alpha: float = 0.05, target: float = 0.8,
                              max_points: int = 10**6) -> int | None:
    """The fewest independent points (>= 4) that detect correlation `rho` with probability `target`; None if
    `max_points` do not."""
    if rho == 0:
        return None
    z = (stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(target)) / math.atanh(min(abs(rho), 1 - 1e-12))
    n = max(4, math.floor(z * z + 3) - 1)
    while n <= max_points and correlation_power(rho, n, alpha) < target:
        n += 1
    return n if n <= max_points else None
