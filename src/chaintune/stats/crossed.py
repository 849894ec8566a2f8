"""Intervals for statistics over seeds that answer the SAME test questions: seeds and questions are crossed.

Model (random effects, one value per cell): for seed s and question q, y[s, q] = μ + a_s + b_q + e_sq with
Var a = σ²_seed, Var b = σ²_question and Var e = σ²_residual (the seed × question interaction, which one value per
cell cannot tell apart from noise). The mean over S seeds and Q questions then has

    Var(ȳ) = σ²_seed / S + σ²_question / Q + σ²_residual / (S·Q),

and the question part does not shrink as seeds are added. From the two-way layout (mean squares MS_seed = Q·var(row
means), MS_question = S·var(column means), MS_residual = Σ (y − row − column + grand)² / ((S − 1)(Q − 1))):

    σ̂²_seed = (MS_seed − MS_residual) / Q,   σ̂²_question = (MS_question − MS_residual) / S,   σ̂²_residual = MS_residual

each truncated at 0, and the interval is ȳ ± t_{(1+confidence)/2, ν} · √V̂ with Satterthwaite's (1946) ν for the
linear combination of mean squares that V̂ is. These estimators need no normality: they are unbiased whenever seeds
are exchangeable and questions are exchangeable (the setting of Owen 2007, "The pigeonhole bootstrap").

`crossed_estimate` generalises this to a weighted sum of several matrices (`Block`s), for differences between chains
and for pooled statements: blocks in the same `seed_group` share their seeds (rows with the same label are the same
seed, e.g. chains that share a trained first stage), blocks in the same `question_set` share their questions;
different groups / sets are independent. Units: those of the values (pp, %, or a fraction).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Hashable, Sequence

import numpy as np
from scipy import stats

__all__ = ["Block", "RunValues", "VarianceTerm", "CrossedInterval", "variance_components", "crossed_estimate",
           "crossed_interval", "crossed_difference", "blocks_from_runs", "satterthwaite_df", "t_interval"]


@dataclass(frozen=True, eq=False)
class Block:
    """One matrix of the statistic θ = Σ_b weight_b · mean(values_b).

    `values`: (S, Q) float array, rows = `seeds` (labels), columns = `questions` (ids). Blocks with the same
    `seed_group` and `question_set` are summed (after aligning rows and columns by label); blocks of one seed group
    must hold the same seeds, blocks of one question set the same questions."""

    values: np.ndarray
    seeds: tuple
    questions: tuple
    seed_group: Hashable = 0
    question_set: Hashable = 0
    weight: float = 1.0


@dataclass(frozen=True)
class VarianceTerm:
    """One estimated contribution to Var(θ̂) (units²): `kind` 'seed' (∝ 1 / n_seeds), 'question' (∝ 1 / n_questions)
    or 'residual' (∝ 1 / (n_seeds · n_questions)), at the design it was estimated on. `seed_group` /
    `question_set`: whose seeds / questions it belongs to (None where the kind has none)."""

    kind: str
    variance: float
    n_seeds: int
    n_questions: int
    seed_group: Hashable = None
    question_set: Hashable = None


@dataclass(frozen=True)
class CrossedInterval:
    """θ̂ (`estimate`), its standard error `se`, Satterthwaite `df`, the t interval [ci_low, ci_high], t = θ̂ / se and
    the two-sided p-value of θ = 0. `var_seed`, `var_question`, `var_residual`: the parts of se² (units²);
    `terms`: the same per seed group / question set, for power planning. NaN fields come with a `note`."""

    estimate: float
    se: float
    df: float
    ci_low: float
    ci_high: float
    t: float
    p_value: float
    var_seed: float
    var_question: float
    var_residual: float
    n_seeds: int
    n_questions: int
    terms: tuple[VarianceTerm, ...] = field(default=())
    note: str = ""


@dataclass(frozen=True)
class RunValues:
    """One run's per-question values of a statistic (row means of its pseudo-values = the run's statistic).

    `seed`: the run's seed label; `question_set`: which test set the questions come from (e.g. the task);
    `questions`: question ids, one per value; `values`: (Q,) float array."""

    seed: Hashable
    question_set: Hashable
    questions: tuple
    values: np.ndarray


def variance_components(y: np.ndarray) -> tuple[float, float, float]:
    """(MS_seed, MS_question, MS_residual) of an (S, Q) matrix with S, Q >= 2 (two-way layout, one value a cell)."""
    y = np.asarray(y, dtype=float)
    S, Q = y.shape
    if S < 2 or Q < 2:
        raise ValueError(f"need >= 2 seeds and >= 2 questions, got a {S}×{Q} matrix")
    rows, cols, grand = y.mean(axis=1), y.mean(axis=0), y.mean()
    resid = y - rows[:, None] - cols[None, :] + grand
    return (float(Q * rows.var(ddof=1)), float(S * cols.var(ddof=1)),
            float((resid ** 2).sum() / ((S - 1) * (Q - 1))))


def satterthwaite_df(parts: Sequence[float], dfs: Sequence[float]) -> float:
    """ν = (Σ c_i·MS_i)² / Σ (c_i·MS_i)² / df_i for the signed parts c_i·MS_i of a variance (Satterthwaite 1946);
    infinite when a part has infinite df only, NaN when every part is 0."""
    parts, dfs = np.asarray(parts, dtype=float), np.asarray(dfs, dtype=float)
    total = parts.sum()
    denom = float(np.sum(parts ** 2 / dfs))
    if denom == 0:
        return math.nan if total == 0 else math.inf
    return float(total ** 2 / denom)


def t_interval(estimate: float, variance: float, df: float, confidence: float = 0.95,
               **fields) -> CrossedInterval:
    """The CrossedInterval of `estimate` with standard error √variance on `df` degrees of freedom."""
    defaults = {"var_seed": math.nan, "var_question": math.nan, "var_residual": math.nan, "n_seeds": 0,
                "n_questions": 0}
    fields = defaults | fields
    if not (math.isfinite(variance) and variance > 0 and df > 0):
        note = fields.pop("note", "") or "zero variance: no interval or test"
        lo = hi = estimate if variance == 0 else math.nan
        return CrossedInterval(estimate, math.sqrt(variance) if variance >= 0 else math.nan, df, lo, hi, math.nan,
                               math.nan, note=note, **fields)
    se = math.sqrt(variance)
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    t = estimate / se
    return CrossedInterval(estimate, se, df, estimate - half, estimate + half, t,
                           float(2 * stats.t.sf(abs(t), df)), **fields)


def _positions(labels: Sequence, wanted: Sequence) -> list[int]:
    """Where each of `wanted` sits in `labels`."""
    where = {label: i for i, label in enumerate(labels)}
    return [where[w] for w in wanted]


def _merge(blocks: Sequence[Block]) -> dict[tuple, tuple[np.ndarray, tuple, tuple]]:
    """(seed_group, question_set) → (Σ weight · values, seeds, questions), rows/columns aligned by label."""
    merged: dict[tuple, tuple[np.ndarray, tuple, tuple]] = {}
    for b in blocks:
        values = np.asarray(b.values, dtype=float)
        if values.shape != (len(b.seeds), len(b.questions)):
            raise ValueError(f"block values {values.shape} do not match {len(b.seeds)} seeds × "
                             f"{len(b.questions)} questions")
        key = (b.seed_group, b.question_set)
        if key not in merged:
            merged[key] = (b.weight * values, tuple(b.seeds), tuple(b.questions))
            continue
        acc, seeds, questions = merged[key]
        if set(seeds) != set(b.seeds) or set(questions) != set(b.questions):
            raise ValueError(f"blocks of seed group {key[0]!r} and question set {key[1]!r} hold different seeds "
                             "or questions")
        merged[key] = (acc + b.weight * values[np.ix_(_positions(b.seeds, seeds), _positions(b.questions, questions))],
                       seeds, questions)
    return merged


def crossed_estimate(blocks: Sequence[Block], confidence: float = 0.95, floor: bool = True) -> CrossedInterval:
    """θ̂ = Σ_b weight_b · mean(values_b) with its crossed seed × question variance and Satterthwaite t interval.

    Per seed group g: z_g(s) = Σ_t (row means of block (g, t))(s) and A_g = var(z_g) / S_g (the seeds' own spread
    of θ); per question set t: v_t(q) = Σ_g (column means)(q) and B_t = var(v_t) / Q_t; per block:
    r_gt = MS_residual(g, t) / (S_g · Q_t), and r_g = Σ_t r_gt, r_t = Σ_g r_gt. Then

        V̂ = Σ_g max(A_g, r_g) + Σ_t max(0, B_t − r_t)

    For one block this is (MS_seed + MS_question − MS_residual) / (S·Q) with the seed and question components
    truncated at 0, and E[A_g] = σ²_seed / S + σ²_residual / (S·Q) ≥ E[r_g]. `floor=False` uses A_g alone: for a
    statistic that is not smooth in its questions (BF_max, BF_spread, BF_std), the linearised residual r_g overstates
    how much a run's θ varies, while A_g measures it directly. Satterthwaite's ν treats A_g, B_t and each
    MS_residual as mean squares on S_g − 1, Q_t − 1 and (S_g − 1)(Q_t − 1) df, and is kept at least the smallest df
    of its positive parts (the negative −r_t parts can otherwise drive it towards 0). A seed group with one seed or
    a question set with one question gives NaN (noted): its variance cannot be estimated.
    """
    merged = _merge(blocks)
    if not merged:
        raise ValueError("no blocks")
    group_seeds: dict[Hashable, tuple] = {}
    set_questions: dict[Hashable, tuple] = {}
    for (g, t), (_, seeds, questions) in merged.items():
        if set(group_seeds.setdefault(g, seeds)) != set(seeds):
            raise ValueError(f"seed group {g!r}: its blocks hold different seeds")
        if set(set_questions.setdefault(t, questions)) != set(questions):
            raise ValueError(f"question set {t!r}: its blocks hold different questions")
    estimate = float(sum(values.mean() for values, _, _ in merged.values()))
    n_seeds, n_questions = sum(map(len, group_seeds.values())), sum(map(len, set_questions.values()))
    small = [f"seed group {g!r} has {len(s)} seed" for g, s in group_seeds.items() if len(s) < 2] + \
            [f"question set {t!r} has {len(q)} question" for t, q in set_questions.items() if len(q) < 2]
    if small:
        return t_interval(estimate, math.nan, math.nan, confidence, n_seeds=n_seeds, n_questions=n_questions,
                          note="; ".join(small) + ": its variance cannot be estimated")
    z = {g: np.zeros(len(s)) for g, s in group_seeds.items()}
    v = {t: np.zeros(len(q)) for t, q in set_questions.items()}
    resid: dict[tuple, float] = {}
    for (g, t), (values, seeds, questions) in merged.items():
        z[g] += values.mean(axis=1)[_positions(seeds, group_seeds[g])]
        v[t] += values.mean(axis=0)[_positions(questions, set_questions[t])]
        resid[(g, t)] = variance_components(values)[2] / values.size
    rows_var = {g: z[g].var(ddof=1) / z[g].size for g in z}  # A_g
    resid_of_group = {g: sum(r for (gg, _), r in resid.items() if gg == g) for g in z}
    question = {t: v[t].var(ddof=1) / v[t].size - sum(r for (_, tt), r in resid.items() if tt == t) for t in v}
    parts, dfs, terms = [], [], []
    for g, a in rows_var.items():
        own = [((g, t), r) for (gg, t), r in resid.items() if gg == g]
        if floor and a < resid_of_group[g]:  # the seeds agree more than seed × question noise allows: use r_g
            parts += [r for _, r in own]
            dfs += [(len(group_seeds[g]) - 1) * (len(set_questions[t]) - 1) for (_, t), _ in own]
        else:
            parts.append(a)
            dfs.append(len(group_seeds[g]) - 1)
        # A_g = seed part + residual part; with floor=False and A_g < r_g the residual part is A_g
        share = 1.0 if floor or a >= resid_of_group[g] else a / resid_of_group[g]
        terms.append(VarianceTerm("seed", float(max(a - resid_of_group[g], 0.0)), len(group_seeds[g]), 0, g))
        terms += [VarianceTerm("residual", float(r * share), len(group_seeds[g]), len(set_questions[t]), g, t)
                  for (_, t), r in own]
    for t, value in question.items():
        if value > 0:
            parts.append(value + sum(r for (_, tt), r in resid.items() if tt == t))
            dfs.append(len(set_questions[t]) - 1)
            parts += [-r for (g, tt), r in resid.items() if tt == t]
            dfs += [(len(group_seeds[g]) - 1) * (len(set_questions[t]) - 1) for (g, tt) in resid if tt == t]
            terms.append(VarianceTerm("question", float(value), 0, len(set_questions[t]), None, t))
    var_seed, var_question, var_residual = (float(sum(term.variance for term in terms if term.kind == kind))
                                            for kind in ("seed", "question", "residual"))
    variance = var_seed + var_question + var_residual
    df_floor = min(d for part, d in zip(parts, dfs) if part > 0) if any(p > 0 for p in parts) else math.nan
    return t_interval(estimate, variance, max(satterthwaite_df(parts, dfs), df_floor), confidence, var_seed=var_seed,
                      var_question=var_question, var_residual=var_residual, n_seeds=n_seeds,
                      n_questions=n_questions, terms=tuple(terms))


def crossed_interval(y: np.ndarray, confidence: float = 0.95, floor: bool = True) -> CrossedInterval:
    """Mean of an (S seeds, Q questions) matrix with its crossed interval (see `crossed_estimate`)."""
    y = np.asarray(y, dtype=float)
    if y.ndim != 2:
        raise ValueError(f"need a seeds × questions matrix, got shape {y.shape}")
    return crossed_estimate([Block(y, tuple(range(y.shape[0])), tuple(range(y.shape[1])))], confidence, floor)


def crossed_difference(y1: np.ndarray, y2: np.ndarray, shared_questions: bool = False,
                       confidence: float = 0.95) -> CrossedInterval:
    """mean(y1) − mean(y2) for two chains with independent seeds (S1 × Q1 and S2 × Q2 matrices).

    `shared_questions=True`: both answered the same questions in the same column order (Q1 == Q2), so a question's
    effect on both cancels in part; otherwise the question sets are independent."""
    y1, y2 = np.asarray(y1, dtype=float), np.asarray(y2, dtype=float)
    if shared_questions and y1.shape[1] != y2.shape[1]:
        raise ValueError(f"shared questions need equal question counts, got {y1.shape[1]} and {y2.shape[1]}")
    q2 = "A" if shared_questions else "B"
    return crossed_estimate([Block(y1, tuple(range(y1.shape[0])), tuple(range(y1.shape[1])), "A", "A"),
                             Block(y2, tuple(range(y2.shape[0])), tuple(range(y2.shape[1])), "B", q2, -1.0)],
                            confidence)


def blocks_from_runs(runs: Sequence[RunValues], seed_group: Hashable = 0, sign: float = 1.0) -> list[Block]:
    """Blocks whose statistic is sign × (mean over `runs` of each run's mean value).

    Runs are grouped by question set; runs with the same seed label are one seed (their rows are added, e.g. two
    chains that share a trained first stage). Every question set must have runs for the same seeds and one set of
    questions (ValueError otherwise)."""
    if not runs:
        raise ValueError("no runs")
    seeds = tuple(dict.fromkeys(r.seed for r in runs))
    total, blocks = len(runs), []
    by_set: dict[Hashable, list[RunValues]] = defaultdict(list)
    for r in runs:
        by_set[r.question_set].append(r)
    for qset, part in by_set.items():
        questions = part[0].questions
        if any(set(r.questions) != set(questions) for r in part):
            raise ValueError(f"question set {qset!r}: runs answered different questions")
        if {r.seed for r in part} != set(seeds):
            raise ValueError(f"question set {qset!r}: runs for seeds {sorted({r.seed for r in part}, key=str)}, "
                             f"not all of {sorted(seeds, key=str)}")
        values = np.zeros((len(seeds), len(questions)))
        for r in part:
            values[seeds.index(r.seed)] += np.asarray(r.values, dtype=float)[_positions(r.questions, questions)]
        blocks.append(Block(values, seeds, questions, seed_group, qset, sign * len(seeds) / total))
    return blocks
