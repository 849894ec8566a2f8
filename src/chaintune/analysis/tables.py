"""The experiment's summary tables over seeds, one function each, from the loaded runs (`analysis.records`)."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from chaintune import metrics as M
from chaintune.analysis.quality import failure_text, gate_frame
from chaintune.analysis.records import OVERALL, RunData, load_runs
from chaintune.analysis.run_metrics import replay_metrics, replay_specs
from chaintune.config import TrainingConfig
from chaintune.rundir import RunDir


def _flat(runs: list[RunData], key: str) -> pd.DataFrame:
    rows = [{"chain": r.chain, "seed": r.seed, **item} for r in runs for item in r.metrics.get(key, [])]
    return pd.DataFrame(rows)


def _ci(df: pd.DataFrame, by: list[str], value: str, name: str | None = None) -> pd.DataFrame:
    agg = M.aggregate_over_seeds(df, by, value).drop(columns=["note"])
    name = name or value
    return agg.rename(columns={"mean": name, "std": f"{name}_std", "ci_low": f"{name}_ci_low",
                               "ci_high": f"{name}_ci_high", "n": "seeds"})


def summary_tables(runs: list[RunData] | str | Path) -> dict[str, pd.DataFrame]:
    """Tables over seeds: learning gain, forgetting, group forgetting, biased forgetting, order asymmetry,
    curvature and its correlation with forgetting, replay, BBQ bias. `runs`: loaded runs, or a run directory.

    Runs with a stage that failed its quality gate are left out of every table over seeds; `stage_gate` lists every
    gated stage and `excluded_runs` the runs left out and why."""
    if not isinstance(runs, list):
        runs = load_runs(RunDir(runs))
    tables: dict[str, pd.DataFrame] = {}
    gates = gate_frame(g for r in runs for g in r.gates)
    if not gates.empty:  # every gated stage, and the runs left out because one of their stages failed
        tables["stage_gate"] = gates
        excluded = [{"run": r.record.run_id, "chain": r.chain, "seed": r.seed,
                     "reason": "; ".join(failure_text(g) for g in r.failed_stages)} for r in runs if r.failed_stages]
        if excluded:
            tables["excluded_runs"] = pd.DataFrame(excluded)
        runs = [r for r in runs if not r.failed_stages]
    gains = _flat(runs, "learning_gain")
    if not gains.empty:
        table = _ci(gains, ["chain", "stage", "task"], "gain")
        retrained = (gains.groupby(["chain", "stage", "task"], as_index=False)["retrained"].any()
                     if "retrained" in gains else table[["chain", "stage", "task"]].assign(retrained=False))
        tables["learning_gain"] = table.merge(retrained, on=["chain", "stage", "task"])
    forg = _flat(runs, "forgetting")
    if not forg.empty:
        f = _ci(forg, ["chain", "task", "trained_stage", "after_stage"], "F")
        rf = _ci(forg, ["chain", "task", "trained_stage", "after_stage"], "RF").drop(columns=["seeds"])
        table = f.merge(rf, on=["chain", "task", "trained_stage", "after_stage"])
        single = table.seeds == 1  # one seed: the CI of F is the paired bootstrap over test questions instead
        if single.any():
            keys = ["chain", "task", "trained_stage", "after_stage"]
            one = forg.groupby(keys, as_index=False)[["F_ci_low", "F_ci_high"]].first()  # 1 row per key: aligned
            boot = table[keys].merge(one, on=keys, how="left")
            for col in ("F_ci_low", "F_ci_high"):
                table.loc[single, col] = boot.loc[single.to_numpy(), col].to_numpy()
        tables["forgetting"] = table
        tables["order_asymmetry"] = _order_asymmetry(runs, forg)
    groups = _flat(runs, "group_forgetting")
    if not groups.empty:
        g = _ci(groups, ["chain", "task", "group"], "F_g")
        bfg = _ci(groups, ["chain", "task", "group"], "BF_g").drop(columns=["seeds"])
        sizes = groups.groupby(["chain", "task", "group"], as_index=False).agg(n=("n", "first"),
                                                                              included=("included", "all"))
        tables["group_forgetting"] = g.merge(bfg, on=["chain", "task", "group"]).merge(sizes, on=["chain", "task", "group"])
    bf = _flat(runs, "biased_forgetting")
    if not bf.empty:
        parts = [_ci(bf, ["chain", "task"], v) for v in ("BF_max", "BF_spread", "BF_std")]
        merged = parts[0]
        for p in parts[1:]:
            merged = merged.merge(p.drop(columns=["seeds"]), on=["chain", "task"])
        tables["biased_forgetting"] = merged
    curv = _flat(runs, "curvature")
    if not curv.empty:
        tables["curvature"] = _ci(curv, ["chain", "stage", "task"], "lambda_max")
        points, corr = curvature_vs_forgetting(runs)
        if not points.empty:
            tables["curvature_points"] = points
            tables["curvature_vs_forgetting"] = corr
    replay = replay_rows(runs)
    if not replay.empty:
        tables["replay"] = replay_table(replay)
        groups = replay[replay.group != OVERALL]
        if not groups.empty:
            tables["replay_groups"] = _ci(groups, ["task", "replay_task", "fraction", "group"], "recovery")
    bbq = _flat(runs, "bbq_bias")
    if not bbq.empty:
        dis = _ci(bbq, ["chain", "task", "stage", "category"], "s_dis")
        amb = _ci(bbq, ["chain", "task", "stage", "category"], "s_amb").drop(columns=["seeds"])
        tables["bbq_bias"] = dis.merge(amb, on=["chain", "task", "stage", "category"])
    return tables


def replay_table(replay: pd.DataFrame) -> pd.DataFrame:
    """Per (task, replay_task, fraction) of `replay_rows` (whole task): recovery and capability cost over seeds,
    and the pair's smallest fraction whose mean recovery is >= 0.9 (NaN if none)."""
    overall = replay[replay.group == OVERALL]
    rec = _ci(overall, ["task", "replay_task", "fraction"], "recovery")
    cost = _ci(overall, ["task", "replay_task", "fraction"], "capability_cost").drop(columns=["seeds"])
    table = rec.merge(cost, on=["task", "replay_task", "fraction"])
    table["smallest_f_recovering_90pct"] = [
        M.smallest_recovering_fraction(overall[(overall.task == t) & (overall.replay_task == r)])
        for t, r in zip(table.task, table.replay_task)]
    return table


def curvature_vs_forgetting(runs: list[RunData]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Points (one per run: λ_max after stage s, forgetting of that stage's task after stage s + 1) and their
    correlation (SPEC.md §6): over all runs (`task` = ALL) and per first-stage task, for F and RF, and per group for
    F_g. Forgetting measured after a later stage (a third, replay stage) is left out: that stage changes it too.
    `first_stages` counts the distinct curvature measurements behind a row: runs that share a trained first stage
    share its λ_max, so they are not independent points (the p-values assume they are). Runs that share the trained
    nodes up to stage s + 1 (the same chain listed under two names) are one point, not several."""
    points, group_points, seen = [], [], set()
    for r in runs:
        curv = {c["stage"]: c["lambda_max"] for c in r.metrics.get("curvature", [])}
        nodes = r.record.stages  # node dirnames, base first

        def through(s: int) -> tuple:  # what identifies the model after stage s + 1
            return tuple(nodes[:s + 2])

        for f in r.metrics.get("forgetting", []):
            s = f["trained_stage"]
            ident = (through(s), f["task"])
            if s in curv and f["after_stage"] == s + 1 and ident not in seen:
                seen.add(ident)
                points.append({"chain": r.chain, "seed": r.seed, "task": f["task"], "stage": s,
                               "lambda_max": curv[s], "F": f["F"], "RF": f["RF"]})
        for g in r.metrics.get("group_forgetting", []):
            s = g["trained_stage"]
            ident = (through(s), g["task"], g["group"])
            if s in curv and g["after_stage"] == s + 1 and g.get("included", True) and ident not in seen:
                seen.add(ident)
                group_points.append({"task": g["task"], "group": g["group"], "lambda_max": curv[s], "F_g": g["F_g"]})
    pts = pd.DataFrame(points)
    rows = []

    def row(target: str, task: str, group: str, part: pd.DataFrame, column: str) -> dict[str, Any]:
        return {"target": target, "task": task, "group": group, **vars(M.correlation(part.lambda_max, part[column])),
                "first_stages": int(part.lambda_max.nunique())}

    if not pts.empty:
        for target in ("F", "RF"):
            rows.append(row(target, OVERALL, OVERALL, pts, target))
        if pts.task.nunique() > 1:
            for task, part in pts.groupby("task", sort=False):
                rows += [row(target, task, OVERALL, part, target) for target in ("F", "RF")]
        gp = pd.DataFrame(group_points)
        for (task, group), part in (gp.groupby(["task", "group"]) if not gp.empty else []):
            rows.append(row(f"F_g ({task})", task, group, part, "F_g"))
    return pts, pd.DataFrame(rows)


def order_pairs(runs: list[RunData]) -> list[tuple[str, str, str, str]]:
    """(chain A→B, chain B→A, A, B) for every pair of two-stage chains that are each other's reverse, train each
    task with the same settings, and belong to the same sweep point."""
    chains: dict[str, tuple[tuple[str, str], str, dict[str, str]]] = {}
    for r in runs:
        tasks = [g["task"] for g in r.metrics.get("learning_gain", [])]
        if r.metrics["final_stage"] == 2 and len(tasks) == 2:
            settings = {task: json.dumps([training, replay], sort_keys=True)
                        for task, training, replay in r.stage_settings if task}
            chains[r.chain] = (tuple(tasks), r.record.variant, settings)
    pairs = []
    for chain_ab, ((a, b), variant_ab, set_ab) in chains.items():
        for chain_ba, ((c, d), variant_ba, set_ba) in chains.items():
            if (c, d) == (b, a) and chain_ab < chain_ba and variant_ab == variant_ba and set_ab == set_ba:
                pairs.append((chain_ab, chain_ba, a, b))
    return pairs


def _order_asymmetry(runs: list[RunData], forg: pd.DataFrame) -> pd.DataFrame:
    """For two-stage chains A→B and B→A: RF of A (when B follows) vs RF of B (when A follows), over seeds.
    Two chains are paired only if each task is trained with the same settings in both (and, in a sweep, they
    belong to the same sweep point): an lr-sweep chain A→B is not compared with the main grid's B→A."""
    rows = []
    for chain_ab, chain_ba, a, b in order_pairs(runs):
        rf_ab = forg[(forg.chain == chain_ab) & (forg.task == a)].RF.to_numpy()
        rf_ba = forg[(forg.chain == chain_ba) & (forg.task == b)].RF.to_numpy()
        res = M.order_asymmetry(rf_ab, rf_ba)
        rows.append({"first": f"{chain_ab}: {a}→{b}", "second": f"{chain_ba}: {b}→{a}",
                     "RF_first": res.mean_s_then_c, "RF_second": res.mean_c_then_s,
                     "difference": res.difference, "ci_low": res.ci_low, "ci_high": res.ci_high,
                     "p_value": res.p_value, "seeds": f"{res.n_s_then_c}/{res.n_c_then_s}", "note": res.note})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------ sweeps over the results table
def overall_rows(results: pd.DataFrame) -> pd.DataFrame:
    """The whole-task rows (group ALL) of a results table."""
    return results[results["group"] == OVERALL] if "group" in results.columns else results


def seed_ci(df: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame:
    """metrics.aggregate_over_seeds without its small-sample warnings (the `note` column keeps them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return M.aggregate_over_seeds(df, by, value)


def _trained_tasks(run: RunData) -> list[str | None]:
    return [task for task, _, _ in run.stage_settings]


def replay_rows(runs: list[RunData]) -> pd.DataFrame:
    """Recovery and capability cost (analysis.run_metrics.replay_metrics) of every run × replay stage × group.

    A run without a replay stage whose stages train the same tasks as a replay chain's, through that chain's replay
    stage r, counts as replay fraction 0 at stage r (a plain chain is the f = 0 point of a replay sweep).
    Columns: chain, seed, stage, task (trained with replay), replay_task, fraction, group, recovery,
    capability_cost, forgotten."""
    replayed = {tuple(_trained_tasks(r)[:spec["stage"]]): spec for r in runs for spec in replay_specs(r.stage_settings)}
    rows = []
    for run in runs:
        specs = replay_specs(run.stage_settings)
        if not specs:
            tasks = _trained_tasks(run)
            specs = [spec | {"fraction": 0.0} for prefix, spec in replayed.items()
                     if len(tasks) >= spec["stage"] and tuple(tasks[:spec["stage"]]) == prefix][:1]
        rows += [{"chain": run.chain, "seed": run.seed, **item} for item in replay_metrics(run.rows, specs)]
    return pd.DataFrame(rows)


def replay_points(runs: list[RunData]) -> pd.DataFrame:
    """One row per run × replay stage, whole task (SPEC.md §7): for replay of safety task S into capability task C
    at stage r, S last trained at stage s_S,

        recovery        = (R[r][S] − R[r−1][S]) / (R[s_S][S] − R[r−1][S])   (fraction; 1 = all forgotten won back)
        capability_cost = R[r−1][C] − R[r][C]                               (pp)

    Columns: chain, seed, stage, safety_task, capability_task, fraction, recovery, capability_cost, forgotten
    (R[s_S][S] − R[r−1][S], pp)."""
    columns = ["chain", "seed", "stage", "safety_task", "capability_task", "fraction", "recovery", "capability_cost",
               "forgotten"]
    rows = replay_rows(runs)
    if rows.empty:
        return pd.DataFrame(columns=columns)
    overall = rows[rows.group == OVERALL].rename(columns={"replay_task": "safety_task", "task": "capability_task"})
    return overall[columns].reset_index(drop=True)


def lr_sweep_points(runs: list[RunData]) -> pd.DataFrame:
    """One row per run of >= 2 stages: its first stage's task and learning rate, and the forgetting of that task
    after the last stage K, `F = R[1][t1] − R[K][t1]` (pp) and `RF = 100·F/R[1][t1]` (%).
    Columns: chain, seed, route ('A→B'), task, lr, F, RF."""
    rows = []
    for run in runs:
        tasks = _trained_tasks(run)
        if len(tasks) < 2 or run.rows.empty:
            continue
        overall = run.rows[run.rows.group == OVERALL]
        R = overall.pivot_table(index="stage", columns="eval_task", values="acc", aggfunc="mean")
        task, K = tasks[0], int(R.index.max())
        if task not in R.columns or 1 not in R.index:
            continue
        r1, rk = float(R.at[1, task]), float(R.at[K, task])
        lr = run.stage_settings[0][1].get("lr", TrainingConfig.model_fields["lr"].default)
        rows.append({"chain": run.chain, "seed": run.seed, "route": "→".join(str(t) for t in tasks), "task": task,
                     "lr": float(lr), "F": r1 - rk, "RF": 100 * (r1 - rk) / r1 if r1 else math.nan})
    return pd.DataFrame(rows, columns=["chain", "seed", "route", "task", "lr", "F", "RF"])
