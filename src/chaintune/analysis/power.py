"""Power planning from a finished pilot run or sweep (`chaintune power`).

For every finding of the pilot, the crossed seed × question variance terms of its statistic (`analysis.intervals`,
`stats.crossed`) give the minimal detectable effect of the pilot's own design (two-sided α, 80 % power) and, for a
target effect, the test questions needed at each number of seeds (`stats.power`), with the CPU time each design
would take at the pilot's measured speeds (stage records: training, curvature and evaluation seconds).

Findings and their effects:
- forgetting F (pp) of each chain's trained task: MDE only;
- order difference: mean RF(S→C) − mean RF(C→S) (points of RF, %) per order pair, and pooled over the
  safety/capability pairs; target `order`;
- BF_spread (pp) of each chain × task with groups: a spread δ = max F_g − min F_g puts some group at
  |BF_g| >= δ/2 (F is a weighted mean of the F_g), so the planner asks for power to detect |BF_g| = δ/2 at the
  Bonferroni level α/G (Holm's first step; its power is at least this) for the group of median standard error;
  target `spread`;
- replay recovery (fraction) at each replay fraction f > 0: recovery = 0 vs the target `recovery`;
- curvature → forgetting: Pearson r of λ_max after stage s vs F after stage s + 1 over the distinct measured
  stages (the points, `tables.curvature_vs_forgetting`), all tasks and per first-stage task; Fisher-z power for
  the target `correlation`, with the points scaling with the seeds (no question part: the test is over stages).

Designs scale every chain of the finding to n seeds and every test set to k × its questions, drawn from the same
question population; k is never below 1 (fewer questions than the pilot would extrapolate the linearised ratios
outside what the pilot measured).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import chi2

from chaintune import stats as st
from chaintune.analysis import intervals as iv
from chaintune.analysis.records import RunData, load_runs
from chaintune.analysis.run_metrics import OVERALL
from chaintune.analysis.tables import curvature_vs_forgetting, order_blocks, order_pairs, replay_rows, runs_by_chain
from chaintune.errors import ChaintuneError
from chaintune.rundir import RunDir

__all__ = ["Targets", "PowerPlan", "plan_power"]


@dataclass(frozen=True)
class Targets:
    """Effects to detect (order: points of RF; spread: pp; recovery: fraction; correlation: Pearson r of λ_max vs
    forgetting), two-sided level, power, and the numbers of seeds per chain to offer designs for."""

    order: float = 5.0
    spread: float = 10.0
    recovery: float = 0.5
    correlation: float = 0.5
    alpha: float = 0.05
    power: float = 0.8
    seeds: tuple[int, ...] = (3, 5, 8, 10, 15, 20)

    def check(self) -> None:
        """One-line ChaintuneError naming the first bad value."""
        for name in ("order", "spread", "recovery"):
            if not getattr(self, name) > 0:
                raise ChaintuneError(f"target {name} must be > 0, got {getattr(self, name)}",
                                     f"pass a positive --{name}")
        if not 0 < self.correlation < 1:
            raise ChaintuneError(f"target correlation must lie in (0, 1), got {self.correlation}",
                                 "pass e.g. --correlation 0.5")
        if not 0 < self.alpha < 1:
            raise ChaintuneError(f"alpha must lie in (0, 1), got {self.alpha}", "pass e.g. --alpha 0.05")
        if not self.alpha < self.power < 1:
            raise ChaintuneError(f"power must lie in (alpha, 1), got {self.power}", "pass e.g. --power 0.8")
        if not self.seeds or min(self.seeds) < 2:
            raise ChaintuneError(f"seed options must be >= 2, got {list(self.seeds)}", "pass e.g. --seeds 3,5,10")


@dataclass
class PowerPlan:
    """`findings`: one row per finding (estimate, pilot design, variance parts, MDE, power at the target);
    `designs`: per finding with a target and per seed option, the question factor needed, the questions per test
    set, the design's power and its CPU hours; `speeds`: the pilot's measured speeds per task; `notes`."""

    findings: pd.DataFrame
    designs: pd.DataFrame
    speeds: pd.DataFrame
    notes: list[str] = field(default_factory=list)


@dataclass
class Finding:
    finding: str
    subject: str
    unit: str
    estimate: float
    interval: st.CrossedInterval
    level: float  # two-sided test level (α, or α/G for one group of G)
    target: float | None  # effect the test must detect (for BF: the group's |BF_g| = spread / 2)
    scale: float  # reported effect = scale × the tested effect (2 for BF_spread, else 1)
    runs: list[RunData]


def _pilot_seeds(runs: list[RunData]) -> int:
    return len({r.seed for r in runs})


def _forgetting(runs: list[RunData], q: iv.Questions, alpha: float) -> list[Finding]:
    out = []
    for chain, part in runs_by_chain(runs).items():
        for f in part[0].metrics.get("forgetting", []):
            res = iv.interval([iv.forgetting_values(q, r, f["task"], f["trained_stage"], f["after_stage"], "F")
                               for r in part])
            if not isinstance(res, str):
                out.append(Finding("forgetting F", f"{chain}: {f['task']}", "pp", res.estimate, res, alpha, None,
                                    1.0, part))
    return out


def order_findings(runs: list[RunData], q: iv.Questions, targets: Targets) -> list[Finding]:
    kinds = {task: kind for r in runs for task, kind in r.task_kinds.items()}
    out, pooled = [], []
    for chain_ab, chain_ba, a, b in order_pairs(runs):
        if kinds.get(b) == "safety" and kinds.get(a) != "safety":  # the safety-first chain first, as in findings
            chain_ab, chain_ba, a, b = chain_ba, chain_ab, b, a
        first, second = [r for r in runs if r.chain == chain_ab], [r for r in runs if r.chain == chain_ba]
        pair = (first, a, second, b)
        if {kinds.get(a), kinds.get(b)} == {"safety", "capability"}:
            pooled.append(pair)
        blocks = order_blocks([pair], q)
        if not isinstance(blocks, str):
            res = st.crossed_estimate(blocks)
            out.append(Finding("order difference (RF)", f"{chain_ab} vs {chain_ba}", "% RF", res.estimate, res,
                                targets.alpha, targets.order, 1.0, first + second))
    if len(pooled) > 1:
        blocks = order_blocks(pooled, q)
        if not isinstance(blocks, str):
            res = st.crossed_estimate(blocks)
            out.insert(0, Finding("order difference (RF)", f"pooled over {len(pooled)} safety/capability pairs",
                                   "% RF", res.estimate, res, targets.alpha, targets.order, 1.0,
                                   [r for p in pooled for r in p[0] + p[2]]))
    return out


def spread_findings(runs: list[RunData], q: iv.Questions, targets: Targets) -> list[Finding]:
    out = []
    for chain, part in runs_by_chain(runs).items():
        for bf in part[0].metrics.get("biased_forgetting", []):
            groups = [g for g in part[0].metrics.get("group_forgetting", [])
                      if g["task"] == bf["task"] and g["trained_stage"] == bf["trained_stage"] and g["included"]]
            if len(groups) < 2:
                continue
            level = targets.alpha / len(groups)
            per_group = [iv.interval([iv.group_values(q, r, bf["task"], bf["trained_stage"], bf["after_stage"],
                                                      g["group"], "BF_g") for r in part]) for g in groups]
            per_group = [res for res in per_group if not isinstance(res, str) and math.isfinite(res.se)]
            if not per_group:
                continue
            median = sorted(per_group, key=lambda res: res.se)[(len(per_group) - 1) // 2]
            spread = float(np.nanmean([x["BF_spread"] for r in part for x in r.metrics.get("biased_forgetting", [])
                                       if x["task"] == bf["task"] and x["trained_stage"] == bf["trained_stage"]]))
            out.append(Finding(f"BF_spread ({len(groups)} groups, median group at α/{len(groups)})",
                                f"{chain}: {bf['task']}", "pp", spread, median, level, targets.spread / 2, 2.0, part))
    return out


def recovery_findings(runs: list[RunData], q: iv.Questions, targets: Targets) -> list[Finding]:
    rows = replay_rows(runs)
    if rows.empty:
        return []
    by_id, out = {r.record.run_id: r for r in runs}, []
    overall = rows[(rows.group == "ALL") & (rows.fraction > 0)]
    for (task, replay_task, fraction), part in overall.groupby(["task", "replay_task", "fraction"], sort=True):
        involved = [by_id[p.run_id] for p in part.itertuples()]
        res = iv.interval([iv.recovery_values(q, by_id[p.run_id], p.replay_task, p.trained_stage, p.stage)
                           for p in part.itertuples()])
        if not isinstance(res, str):
            out.append(Finding("replay recovery", f"{replay_task} into {task}, f = {100 * fraction:g} %",
                                "fraction", res.estimate, res, targets.alpha, targets.recovery, 1.0, involved))
    return out


def _curvature(runs: list[RunData], costs: dict[str, "_NodeCost"], targets: Targets) -> tuple[list[dict], list[dict]]:
    """(findings rows, design rows) of λ_max vs F: one per correlation row over all tasks and per first-stage task;
    the points of a design with n seeds are the pilot's distinct measured stages × n / the pilot's seeds."""
    _, corr = curvature_vs_forgetting(runs)
    if corr.empty:
        return [], []
    pilot_seeds, found, designs = _pilot_seeds(runs), [], []
    for c in corr[(corr.target == "F") & (corr.group == OVERALL)].itertuples():
        involved = runs if c.task == OVERALL else [r for r in runs if any(
            x["task"] == c.task for x in r.metrics.get("curvature", []))]
        points, subject = int(c.first_stages), ("all first-stage tasks" if c.task == OVERALL else c.task)
        subject = f"λ_max after a stage vs F after the next ({subject})"
        found.append({
            "finding": "curvature → forgetting (Pearson r)", "subject": subject, "unit": "r",
            "estimate": c.pearson_r, "seeds": pilot_seeds, "questions": math.nan, "se": math.nan,
            "seed_share": math.nan, "question_share": math.nan, "residual_share": math.nan, "level": targets.alpha,
            "mde": st.correlation_mde(points, targets.alpha, targets.power), "target": targets.correlation,
            "power_at_target": st.correlation_power(targets.correlation, points, targets.alpha),
            "cpu_hours": _cpu_hours(costs, involved, pilot_seeds, 1.0), "points": points})
        for n in targets.seeds:
            scaled = max(1, round(points * n / pilot_seeds))
            designs.append({"finding": found[-1]["finding"], "subject": subject, "target": targets.correlation,
                            "seeds": n, "question_factor": math.nan, "questions": None, "points": scaled,
                            "power": st.correlation_power(targets.correlation, scaled, targets.alpha),
                            "cpu_hours": _cpu_hours(costs, involved, n, 1.0)})
    return found, designs


# ------------------------------------------------------------------------------------------------ CPU time
@dataclass(frozen=True)
class _NodeCost:
    trained: bool
    fixed: float  # training + curvature seconds
    eval: float  # evaluation seconds


def _node_costs(out: RunDir, runs: list[RunData]) -> dict[str, _NodeCost]:
    costs = {}
    for node in {n for r in runs for n in r.record.stages}:
        record, curvature = out.node(node), out.curvature(node)
        fixed = (record.train_seconds if record else 0.0) + float((curvature or {}).get("seconds") or 0.0)
        costs[node] = _NodeCost(record is not None, fixed, sum(ev.seconds for ev in out.evaluations(node)))
    return costs


def _cpu_hours(costs: dict[str, _NodeCost], runs: list[RunData], n_seeds: int, factor: float) -> float:
    """Hours of the runs' stages at n_seeds seeds (trained stages scale with seeds, evaluations with seeds × k;
    the base model is evaluated once)."""
    ratio = n_seeds / _pilot_seeds(runs)
    nodes = {n for r in runs for n in r.record.stages}
    seconds = sum((costs[n].fixed * ratio + costs[n].eval * ratio * factor) if costs[n].trained
                  else costs[n].eval * factor for n in nodes)
    return seconds / 3600


def _speeds(out: RunDir, runs: list[RunData]) -> pd.DataFrame:
    rows: dict[str, dict[str, float]] = {}
    nodes = {n for r in runs for n in r.record.stages}
    for node in sorted(nodes):
        record = out.node(node)
        if record is not None:
            row = rows.setdefault(record.task, {"stages": 0, "train_s": 0.0, "tokens": 0, "eval_s": 0.0, "eval_n": 0})
            row["stages"] += 1
            row["train_s"] += record.train_seconds
            row["tokens"] += record.tokens
        for ev in out.evaluations(node):
            row = rows.setdefault(ev.task, {"stages": 0, "train_s": 0.0, "tokens": 0, "eval_s": 0.0, "eval_n": 0})
            row["eval_s"] += ev.seconds
            row["eval_n"] += ev.n
    table = pd.DataFrame([{"task": task, "stages trained": int(v["stages"]),
                           "train s per stage": v["train_s"] / v["stages"] if v["stages"] else math.nan,
                           "tokens per s": v["tokens"] / v["train_s"] if v["train_s"] else math.nan,
                           "eval ms per question": 1000 * v["eval_s"] / v["eval_n"] if v["eval_s"] else math.nan}
                          for task, v in rows.items()])
    return table


# ------------------------------------------------------------------------------------------------ the plan
def _design(f: Finding, n_seeds: int, targets: Targets) -> tuple[float | None, float]:
    """(question factor k >= 1 that reaches the target power, the design's power) at n_seeds; (None, power at the
    largest k tried) when no k does."""
    terms = f.interval.terms
    k = st.questions_needed(terms, n_seeds, f.target, f.level, targets.power)
    k = None if k is None else max(k, 1.0)
    variance, df = st.design_variance(terms, n_seeds, k or 1e3)
    return k, st.power(f.target, variance, df, f.level)


def plan_power(run_dir: str | Path, targets: Targets = Targets()) -> PowerPlan:
    """The power plan of a finished pilot run directory (see the module docstring)."""
    targets.check()
    root = Path(run_dir)
    if not root.is_dir():
        raise ChaintuneError(f"run directory '{root}' does not exist", "pass the output_dir of a finished pilot run")
    out = RunDir(root)
    runs = load_runs(out)
    q = iv.Questions()
    found = (_forgetting(runs, q, targets.alpha) + order_findings(runs, q, targets) + spread_findings(runs, q, targets)
             + recovery_findings(runs, q, targets))
    found = [f for f in found if math.isfinite(f.interval.se) and f.interval.se > 0]
    if not found:
        seeds = max((len({r.seed for r in runs if r.chain == c}) for c in {r.chain for r in runs}), default=0)
        why = ("every chain has one seed, so the seed variance cannot be estimated" if seeds < 2 else
               "no statistic has per-question predictions shared by its seeds, or every one is constant")
        raise ChaintuneError(f"'{out.root}' cannot be planned from: {why}",
                             "run the pilot with >= 2 seeds per chain (e.g. --set seeds=[0,1,2]) to completion")
    costs = _node_costs(out, runs)
    findings_rows, design_rows = [], []
    for f in found:
        ci = f.interval
        mde = st.minimal_detectable_effect(ci.se ** 2, ci.df, f.level, targets.power) * f.scale
        now = st.power(f.target, ci.se ** 2, ci.df, f.level) if f.target is not None else math.nan
        findings_rows.append({
            "finding": f.finding, "subject": f.subject, "unit": f.unit, "estimate": f.estimate,
            "seeds": _pilot_seeds(f.runs), "questions": ci.n_questions, "se": ci.se * f.scale,
            "seed_share": ci.var_seed / ci.se ** 2, "question_share": ci.var_question / ci.se ** 2,
            "residual_share": ci.var_residual / ci.se ** 2, "level": f.level, "mde": mde,
            "target": f.target * f.scale if f.target is not None else math.nan, "power_at_target": now,
            "cpu_hours": _cpu_hours(costs, f.runs, _pilot_seeds(f.runs), 1.0), "points": math.nan})
        if f.target is None:
            continue
        for n in targets.seeds:
            k, achieved = _design(f, n, targets)
            design_rows.append({"finding": f.finding, "subject": f.subject, "target": f.target * f.scale,
                                "seeds": n, "question_factor": k,
                                "questions": math.ceil(k * ci.n_questions) if k else None,
                                "points": math.nan, "power": achieved, "cpu_hours": _cpu_hours(costs, f.runs, n, k) if k else math.nan})
    curvature_rows, curvature_designs = _curvature(runs, costs, targets)
    findings_rows += curvature_rows
    design_rows += curvature_designs
    notes = [f"Variance parts from {len(runs)} runs; designs keep each finding's chains and scale them to n seeds "
             "and k × the test questions (k >= 1) of the same question population.",
             "CPU time: the sum of the pilot's measured stage times (training, curvature, evaluation) scaled to the "
             "design; with --workers W the wall time is about CPU time / W."]
    if curvature_rows:
        notes.append("Curvature → forgetting: Fisher-z power over the distinct measured stages (points), which "
                     "scale with the seeds; its MDE and target are Pearson r.")
    fewest = min(_pilot_seeds(f.runs) for f in found)
    if fewest < 10:
        low, high = (fewest - 1) / chi2.ppf([0.95, 0.05], fewest - 1)
        notes.append(f"The seed variance of a chain with {fewest} seeds rests on {fewest - 1} df: the true value may be "
                     f"{low:.2g}–{high:.2g} × the estimate (90 %), and so may the seed part of every plan above.")
    if not any(c.eval for c in costs.values()):
        notes.append("The pilot's records hold no evaluation times (older run directory): CPU hours count training "
                     "and curvature only.")
    return PowerPlan(pd.DataFrame(findings_rows), pd.DataFrame(design_rows), _speeds(out, runs), notes)
