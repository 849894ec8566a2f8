"""Power of the crossed seed × question t test (`stats.crossed`) for other designs: more or fewer seeds per chain,
larger or smaller test sets.

The estimated variance terms of a statistic (`CrossedInterval.terms`) are rescaled to a design with `n_seeds` seeds
in every seed group and `question_factor` × the questions of every question set (the same question population):

    seed term · S / n_seeds,   question term / k,   residual term · S / (n_seeds · k)

and the design's degrees of freedom follow Satterthwaite (1946), each term on n_seeds − 1, k·Q − 1 or
(n_seeds − 1)(k·Q − 1) df. Power is that of the two-sided t test at level α for a true effect δ: with
T ~ noncentral t(ν, δ / se), power = P(|T| > t_{1−α/2, ν}).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import optimize, stats

from chaintune.stats.crossed import VarianceTerm, satterthwaite_df

__all__ = ["design_variance", "power", "minimal_detectable_effect", "questions_needed"]


def design_variance(terms: Sequence[VarianceTerm], n_seeds: int, question_factor: float = 1.0) -> tuple[float, float]:
    """(Var θ̂ in units², Satterthwaite df) of the design with `n_seeds` seeds per seed group and
    `question_factor` × each question set's questions."""
    if n_seeds < 2:
        raise ValueError(f"need >= 2 seeds for a seed variance, got {n_seeds}")
    parts, dfs = [], []
    for term in terms:
        k = question_factor
        if term.kind == "seed":
            parts.append(term.variance * term.n_seeds / n_seeds)
            dfs.append(n_seeds - 1)
        elif term.kind == "question":
            parts.append(term.variance / k)
            dfs.append(max(k * term.n_questions - 1, 1.0))
        elif term.kind == "residual":
            parts.append(term.variance * term.n_seeds / (n_seeds * k))
            dfs.append((n_seeds - 1) * max(k * term.n_questions - 1, 1.0))
        else:
            raise ValueError(f"unknown variance term kind {term.kind!r}")
    variance = float(sum(parts))
    return variance, satterthwaite_df(parts, dfs) if variance > 0 else math.nan


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
