"""The paper's four claims (Ung et al. 2024, SPEC.md §1) as one table, each with its effect, interval, corrected
p-value, the design's minimal detectable effect (MDE, two-sided, 80 % power) and a verdict.

| claim | effect (unit) | paper's direction | test | family corrected over |
|---|---|---|---|---|
| order | RF(S→C) − RF(C→S) (points of RF) | > 0 | crossed seed × question t | the task pairs (pooled row: one test) |
| biased forgetting | BF_spread (pp), interval from the spread's own pseudo-values | some BF_g ≠ 0 | smallest adjusted BF_g p (the group family's correction) | the groups |
| curvature | Pearson r of λ_max vs F over distinct first stages | > 0 | Fisher z on the distinct first stages | first-stage tasks (pooled row: one test) |
| replay | recovery at fraction f (1 = all forgetting undone) | > 0 | crossed seed × question t | the fractions of one (task, replay task) |

Each family is corrected with the experiment's `multiple_comparisons` (Holm unless set to bh), as the group tables are.

Verdicts: **reproduces** — significant after correction, in the paper's direction; **does not (opposite
direction)** — significant the other way; **does not (powered null)** — not significant although the design's MDE
is at most the target effect (`power.Targets`: an effect that large would have been seen with ≥ 80 % power);
**cannot tell at this power** — not significant and the MDE is above the target; **no test** — too few seeds or
points (a one-seed chain's per-group p-values come from its bootstrap over questions: they describe that run, not
the recipe, so they give no verdict). The MDE of BF_spread is that of `chaintune power` (the median group's BF_g at α/G, doubled).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from chaintune import stats as st
from chaintune.analysis import intervals as iv
from chaintune.analysis.power import Targets, order_findings, recovery_findings, spread_findings
from chaintune.analysis.records import RunData
from chaintune.analysis.run_metrics import OVERALL

__all__ = ["claims_table", "verdict"]

COLUMNS = ["claim", "subject", "effect", "unit", "ci_low", "ci_high", "ci_method", "p_value", "adj_p", "correction",
           "mde", "target", "verdict", "n"]


def verdict(adj_p: float, effect: float, mde: float, target: float, direction: int = 1,
            alpha: float = 0.05) -> str:
    """reproduces / does not / cannot tell at this power (module docstring); `direction` +1 or −1 is the sign the
    paper predicts, 0 any sign."""
    if not math.isfinite(adj_p):
        return "no test"
    if adj_p < alpha:
        return "reproduces" if direction == 0 or np.sign(effect) == direction else "does not (opposite direction)"
    return "does not (powered null)" if math.isfinite(mde) and mde <= target else "cannot tell at this power"


def _adjust(values: list[float], correction: str) -> list[float]:
    """The family's adjusted p-values (`stats.adjust_p_values`: NaN stays NaN and is not counted)."""
    return st.adjust_p_values(values, correction).tolist()


def _mde(interval: st.CrossedInterval, level: float, targets: Targets, scale: float = 1.0) -> float:
    return st.minimal_detectable_effect(interval.se ** 2, interval.df, level, targets.power) * scale


def _row(claim: str, subject: str, effect: float, unit: str, low: float, high: float, method: str, p: float,
         adj_p: float, correction: str, mde: float, target: float, direction: int, n: Any,
         targets: Targets) -> dict[str, Any]:
    return {"claim": claim, "subject": subject, "effect": effect, "unit": unit, "ci_low": low, "ci_high": high,
            "ci_method": method, "p_value": p, "adj_p": adj_p, "correction": correction, "mde": mde,
            "target": target, "verdict": verdict(adj_p, effect, mde, target, direction, targets.alpha), "n": n}


def _order_rows(runs: list[RunData], q: iv.Questions, targets: Targets, correction: str) -> list[dict[str, Any]]:
    found = order_findings(runs, q, targets)
    pooled = [f for f in found if f.subject.startswith("pooled")]
    pairs = [f for f in found if not f.subject.startswith("pooled")]
    adjusted = _adjust([f.interval.p_value for f in pairs], correction)
    rows = []
    for f, adj in zip(pooled + pairs, [f.interval.p_value for f in pooled] + adjusted):
        family = ("none (one test)" if f in pooled or len(pairs) == 1
                  else f"{st.correction_name(correction)} over {len(pairs)} task pairs")
        ci = f.interval
        rows.append(_row("order: safety forgotten more when it comes first", f.subject, f.estimate, "RF points",
                         ci.ci_low, ci.ci_high, iv.CROSSED, ci.p_value, adj, family, _mde(ci, f.level, targets),
                         targets.order, 1, f"{ci.n_seeds} seeds × {ci.n_questions} q", targets))
    return rows


def _bias_rows(runs: list[RunData], q: iv.Questions, targets: Targets,
               tables: dict[str, pd.DataFrame]) -> list[dict[str, Any]]:
    bf, groups = tables.get("biased_forgetting"), tables.get("group_forgetting")
    if bf is None or groups is None:
        return []
    kinds = {task: kind for r in runs for task, kind in r.task_kinds.items()}
    mdes = {f.subject: _mde(f.interval, f.level, targets, f.scale) for f in spread_findings(runs, q, targets)}
    rows = []
    for b in bf.itertuples():
        if kinds.get(b.task) != "safety":
            continue
        part = groups[(groups.chain == b.chain) & (groups.task == b.task) & groups.included]
        adj = part.BF_g_adj_p.dropna()
        if adj.empty:
            continue
        family = f"{part.correction.iloc[0]} over {len(adj)} groups"
        raw = float(part.loc[adj.idxmin(), "BF_g_p_value"])
        row = _row("biased forgetting across groups", f"{b.chain}: {b.task}", b.BF_spread, "BF_spread pp",
                   b.BF_spread_ci_low, b.BF_spread_ci_high, b.ci_method, raw, float(adj.min()), family,
                   mdes.get(f"{b.chain}: {b.task}", math.nan), targets.spread, 0, f"{len(part)} groups", targets)
        if b.seeds < 2:  # the one run's bootstrap over questions: a finding about that run, not about the recipe
            row["verdict"] = "no test (one seed: questions only)"
        rows.append(row)
    return rows


def _fisher(r: float, n: int, confidence: float = 0.95) -> tuple[float, float, float]:
    """(ci_low, ci_high, p) of Pearson r over n independent points by Fisher's z (NaN below 4 points)."""
    if n < 4 or not math.isfinite(r):
        return math.nan, math.nan, math.nan
    z, se = math.atanh(max(min(r, 1 - 1e-12), -1 + 1e-12)), 1 / math.sqrt(n - 3)
    half = sps.norm.ppf(0.5 + confidence / 2) * se
    return math.tanh(z - half), math.tanh(z + half), float(2 * sps.norm.sf(abs(z) / se))


def _curvature_rows(targets: Targets, tables: dict[str, pd.DataFrame], correction: str) -> list[dict[str, Any]]:
    corr = tables.get("curvature_vs_forgetting")
    if corr is None or corr.empty:
        return []
    part = corr[(corr.target == "F") & (corr.group == OVERALL)]
    pooled, per_task = part[part.task == OVERALL], part[part.task != OVERALL]
    tests = [(r, *_fisher(r.pearson_r, int(r.first_stages))) for r in pooled.itertuples()]
    task_tests = [(r, *_fisher(r.pearson_r, int(r.first_stages))) for r in per_task.itertuples()]
    adjusted = [t[3] for t in tests] + _adjust([t[3] for t in task_tests], correction)
    tested = sum(math.isfinite(t[3]) for t in task_tests)
    rows = []
    for (r, low, high, p), adj in zip(tests + task_tests, adjusted):
        family = ("none (one test)" if r.task == OVERALL or tested < 2
                  else f"{st.correction_name(correction)} over {tested} first-stage tasks")
        subject = "all first-stage tasks" if r.task == OVERALL else f"first stage {r.task}"
        rows.append(_row("curvature: sharper first stage, more forgetting", subject, r.pearson_r, "Pearson r", low,
                         high, "Fisher z over distinct first stages", p, adj, family,
                         st.correlation_mde(int(r.first_stages), targets.alpha, targets.power), targets.correlation, 1,
                         f"{int(r.first_stages)} first stages", targets))
    return rows


def _replay_rows(runs: list[RunData], q: iv.Questions, targets: Targets, correction: str) -> list[dict[str, Any]]:
    families: dict[str, list] = {}
    for f in recovery_findings(runs, q, targets):  # subject "<replay task> into <task>, f = <fraction> %"
        families.setdefault(f.subject.split(",")[0], []).append(f)
    rows = []
    for fs in families.values():
        adjusted = _adjust([f.interval.p_value for f in fs], correction)
        family = "none (one test)" if len(fs) == 1 else f"{st.correction_name(correction)} over {len(fs)} fractions"
        for f, adj in zip(fs, adjusted):
            ci = f.interval
            rows.append(_row("replay recovers what was forgotten", f.subject, f.estimate, "recovery fraction",
                             ci.ci_low, ci.ci_high, iv.CROSSED, ci.p_value, adj, family, _mde(ci, f.level, targets),
                             targets.recovery, 1, f"{ci.n_seeds} seeds × {ci.n_questions} q", targets))
    return rows


def claims_table(runs: list[RunData], tables: dict[str, pd.DataFrame], correction: str = "holm",
                 targets: Targets = Targets()) -> pd.DataFrame:
    """One row per tested statement of the four claims (module docstring). `runs`: the runs the tables were made
    from (failed-gate runs already left out); `tables`: their `summary_tables`; `correction`: holm | bh, as for the
    tables' group families."""
    q = iv.Questions()
    rows = (_order_rows(runs, q, targets, correction) + _bias_rows(runs, q, targets, tables)
            + _curvature_rows(targets, tables, correction) + _replay_rows(runs, q, targets, correction))
    return pd.DataFrame(rows, columns=COLUMNS)
