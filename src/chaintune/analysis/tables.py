"""The experiment's summary tables over seeds, one function each, from the loaded runs (`analysis.records`)."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from chaintune import metrics as M
from chaintune import stats as st
from chaintune.analysis import intervals as iv
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


def _t_only(table: pd.DataFrame) -> pd.DataFrame:
    """`ci_method` of a table whose intervals are t intervals over seeds."""
    return table.assign(ci_method=[iv.T_OVER_SEEDS if n > 1 else iv.NO_INTERVAL for n in table["seeds"]])


def runs_by_chain(runs: list[RunData]) -> dict[str, list[RunData]]:
    """Chain → its runs, in order."""
    chains: dict[str, list[RunData]] = {}
    for r in runs:
        chains.setdefault(r.chain, []).append(r)
    return chains


def correction_of(runs: list[RunData]) -> str:
    """The multiple-comparison correction the runs' config asks for (`multiple_comparisons`; Holm by default)."""
    return next((r.correction for r in runs), "holm")


def summary_tables(runs: list[RunData] | str | Path, correction: str | None = None) -> dict[str, pd.DataFrame]:
    """Tables over seeds: learning gain, forgetting, group forgetting, biased forgetting, order asymmetry,
    curvature and its correlation with forgetting, replay, BBQ bias, and the paper's claims with verdicts
    (`analysis.claims`). `runs`: loaded runs, or a run directory;
    `correction`: holm | bh for the per-group families (default: the experiment's `multiple_comparisons`).

    Intervals over >= 2 seeds are crossed seed × question t intervals (`analysis.intervals`) where the runs' stored
    predictions allow, else t intervals over seeds; with one seed, F and F_g / BF_g keep the run's paired
    bootstrap over questions. Every table's `ci_method` column says which.

    Runs with a stage that failed its quality gate are left out of every table over seeds; `stage_gate` lists every
    gated stage and `excluded_runs` the runs left out and why."""
    if not isinstance(runs, list):
        runs = load_runs(RunDir(runs))
    correction = correction or correction_of(runs)
    tables: dict[str, pd.DataFrame] = {}
    gates = gate_frame(g for r in runs for g in r.gates)
    if not gates.empty:  # every gated stage, and the runs left out because one of their stages failed
        tables["stage_gate"] = gates
        excluded = [{"run": r.record.run_id, "chain": r.chain, "seed": r.seed,
                     "reason": "; ".join(failure_text(g) for g in r.failed_stages)} for r in runs if r.failed_stages]
        if excluded:
            tables["excluded_runs"] = pd.DataFrame(excluded)
        runs = [r for r in runs if not r.failed_stages]
    q, by_chain = iv.Questions(), runs_by_chain(runs)
    gains = _flat(runs, "learning_gain")
    if not gains.empty:
        table = iv.fill(_ci(gains, ["chain", "stage", "task"], "gain"), ["gain"],
                        lambda row, _: iv.interval([iv.difference_values(q, r, row["task"], row["stage"],
                                                                         row["stage"] - 1)
                                                    for r in by_chain[row["chain"]]]))
        retrained = (gains.groupby(["chain", "stage", "task"], as_index=False)["retrained"].any()
                     if "retrained" in gains else table[["chain", "stage", "task"]].assign(retrained=False))
        tables["learning_gain"] = table.merge(retrained, on=["chain", "stage", "task"])
    forg = _flat(runs, "forgetting")
    if not forg.empty:
        tables["forgetting"] = _forgetting_table(forg, by_chain, q)
        tables["order_asymmetry"] = _order_asymmetry(runs, q)
    groups = _flat(runs, "group_forgetting")
    if not groups.empty:
        tables["group_forgetting"] = _group_table(groups, by_chain, q, correction)
    bf = _flat(runs, "biased_forgetting")
    if not bf.empty:
        parts = [_ci(bf, ["chain", "task"], v) for v in st.BF_SUMMARIES]
        merged = parts[0]
        for p in parts[1:]:
            merged = merged.merge(p.drop(columns=["seeds"]), on=["chain", "task"])
        tables["biased_forgetting"] = iv.fill(merged, st.BF_SUMMARIES,
                                              lambda row, kind: _summary_interval(row, kind, groups, by_chain, q))
    curv = _flat(runs, "curvature")
    if not curv.empty:
        tables["curvature"] = _t_only(_ci(curv, ["chain", "stage", "task"], "lambda_max"))
        points, corr = curvature_vs_forgetting(runs)
        if not points.empty:
            tables["curvature_points"] = points
            tables["curvature_vs_forgetting"] = corr
    replay = replay_rows(runs)
    if not replay.empty:
        tables["replay"] = replay_table(replay, runs)
        groups = replay[replay.group != OVERALL]
        if not groups.empty:
            tables["replay_groups"] = replay_group_table(groups, runs, correction)
    bbq = _flat(runs, "bbq_bias")
    if not bbq.empty:
        dis = _ci(bbq, ["chain", "task", "stage", "category"], "s_dis")
        amb = _ci(bbq, ["chain", "task", "stage", "category"], "s_amb").drop(columns=["seeds"])
        tables["bbq_bias"] = _t_only(dis.merge(amb, on=["chain", "task", "stage", "category"]))
    from chaintune.analysis.claims import claims_table  # it builds on the tables above (and power's findings)
    claims = claims_table(runs, tables, correction)
    if not claims.empty:
        tables["claims"] = claims
    return tables


def _forgetting_table(forg: pd.DataFrame, by_chain: dict[str, list[RunData]], q: iv.Questions) -> pd.DataFrame:
    """F and RF over seeds: crossed intervals; one seed: the run's paired-bootstrap interval of F."""
    keys = ["chain", "task", "trained_stage", "after_stage"]
    f = _ci(forg, keys, "F")
    rf = _ci(forg, keys, "RF").drop(columns=["seeds"])
    table = iv.fill(f.merge(rf, on=keys), ["F", "RF"], lambda row, name: iv.interval(
        [iv.forgetting_values(q, r, row["task"], row["trained_stage"], row["after_stage"], name)
         for r in by_chain[row["chain"]]]))
    single = table.seeds == 1
    if single.any():
        one = forg.groupby(keys, as_index=False)[["F_ci_low", "F_ci_high"]].first()  # 1 row per key: aligned
        boot = table[keys].merge(one, on=keys, how="left")
        for col in ("F_ci_low", "F_ci_high"):
            table.loc[single, col] = boot.loc[single.to_numpy(), col].to_numpy()
        table.loc[single, "ci_method"] = f"{iv.BOOTSTRAP}, F only"
    return table


def _group_table(groups: pd.DataFrame, by_chain: dict[str, list[RunData]], q: iv.Questions,
                 correction: str) -> pd.DataFrame:
    """F_g and BF_g over seeds with crossed intervals and p-values (one seed: the run's paired bootstrap), adjusted
    within each (chain, task) over its included groups."""
    keys = ["chain", "task", "group"]
    g = _ci(groups, keys, "F_g")
    bfg = _ci(groups, keys, "BF_g").drop(columns=["seeds"])
    sizes = groups.groupby(keys, as_index=False).agg(n=("n", "first"), included=("included", "all"),
                                                     trained_stage=("trained_stage", "first"),
                                                     after_stage=("after_stage", "first"))
    table = g.merge(bfg, on=keys).merge(sizes, on=keys)
    table["F_g_p_value"] = table["BF_g_p_value"] = math.nan
    table = iv.fill(table, ["F_g", "BF_g"], lambda row, name: iv.interval(
        [iv.group_values(q, r, row["task"], row["trained_stage"], row["after_stage"], row["group"], name)
         for r in by_chain[row["chain"]]]), p_values=True)
    single = table.seeds == 1
    if single.any():  # the run's paired bootstrap over questions
        cols = {"ci_low": "F_g_ci_low", "ci_high": "F_g_ci_high", "p_value": "F_g_p_value",
                "bf_ci_low": "BF_g_ci_low", "bf_ci_high": "BF_g_ci_high", "bf_p_value": "BF_g_p_value"}
        have = [c for c in cols if c in groups.columns]
        one = table[keys].merge(groups.groupby(keys, as_index=False)[have].first(), on=keys, how="left")
        for c in have:
            table.loc[single, cols[c]] = one.loc[single.to_numpy(), c].to_numpy()
        table.loc[single, "ci_method"] = iv.BOOTSTRAP
    table = iv.adjust(table.drop(columns=["trained_stage", "after_stage"]), ["chain", "task"], ["F_g", "BF_g"],
                      correction, table["included"])
    order = [c for c in table.columns if c != "ci_method"] + ["ci_method"]
    return table[order]


def _summary_interval(row: dict, kind: str, groups: pd.DataFrame, by_chain: dict[str, list[RunData]],
                      q: iv.Questions) -> st.CrossedInterval | str:
    part = groups[(groups.chain == row["chain"]) & (groups.task == row["task"])]
    included = part.groupby("group")["included"].all()
    trained, after = int(part.trained_stage.iloc[0]), int(part.after_stage.iloc[0])
    return iv.interval([iv.summary_values(q, r, row["task"], trained, after, included[included].index, kind)
                        for r in by_chain[row["chain"]]], floor=False)


def _runs_by_id(runs: list[RunData] | None) -> dict[str, RunData]:
    return {r.record.run_id: r for r in runs or []}


def replay_table(replay: pd.DataFrame, runs: list[RunData] | None = None) -> pd.DataFrame:
    """Per (task, replay_task, fraction) of `replay_rows` (whole task): recovery and capability cost over seeds,
    and the pair's smallest fraction whose mean recovery is >= 0.9 (NaN if none). With the `runs` the rows came
    from, crossed seed × question intervals; without them, t intervals over seeds."""
    keys = ["task", "replay_task", "fraction"]
    overall = replay[replay.group == OVERALL]
    rec = _ci(overall, keys, "recovery")
    cost = _ci(overall, keys, "capability_cost").drop(columns=["seeds"])
    table = rec.merge(cost, on=keys)
    by_id = _runs_by_id(runs)
    if by_id and "run_id" in overall:
        def compute(row: dict, name: str) -> st.CrossedInterval | str:
            part = overall[(overall.task == row["task"]) & (overall.replay_task == row["replay_task"])
                           & (overall.fraction == row["fraction"])]
            if name == "recovery":
                return iv.interval([iv.recovery_values(q, by_id[p.run_id], p.replay_task, p.trained_stage, p.stage)
                                    for p in part.itertuples()])
            return iv.interval([iv.difference_values(q, by_id[p.run_id], p.task, p.stage - 1, p.stage)
                                for p in part.itertuples()])

        q = iv.Questions()
        table = iv.fill(table, ["recovery", "capability_cost"], compute)
    else:
        table = _t_only(table)
    table["smallest_f_recovering_90pct"] = [
        M.smallest_recovering_fraction(overall[(overall.task == t) & (overall.replay_task == r)])
        for t, r in zip(table.task, table.replay_task)]
    order = [c for c in table.columns if c != "ci_method"] + ["ci_method"]
    return table[order]


def replay_group_table(groups: pd.DataFrame, runs: list[RunData], correction: str) -> pd.DataFrame:
    """Per (task, replay_task, fraction, group): recovery over seeds with crossed intervals and p-values of
    recovery = 0, adjusted within each (task, replay_task, fraction) over its groups."""
    keys = ["task", "replay_task", "fraction", "group"]
    by_id, q = _runs_by_id(runs), iv.Questions()

    def compute(row: dict, _: str) -> st.CrossedInterval | str:
        part = groups[(groups.task == row["task"]) & (groups.replay_task == row["replay_task"])
                      & (groups.fraction == row["fraction"]) & (groups.group == row["group"])]
        return iv.interval([iv.recovery_values(q, by_id[p.run_id], p.replay_task, p.trained_stage, p.stage, p.group)
                            for p in part.itertuples()])

    table = _ci(groups, keys, "recovery").assign(recovery_p_value=math.nan)
    table = iv.fill(table, ["recovery"], compute, p_values=True)
    table = iv.adjust(table, keys[:-1], ["recovery"], correction)
    order = [c for c in table.columns if c != "ci_method"] + ["ci_method"]
    return table[order]


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


def _first_rf(run: RunData, task: str) -> float:
    """RF of `task` (trained at stage 1) after stage 2 of a two-stage run; NaN if the run has none."""
    return next((f["RF"] for f in run.metrics.get("forgetting", []) if f["task"] == task and f["trained_stage"] == 1),
                math.nan)


def order_difference(pairs: list[tuple[list[RunData], str, list[RunData], str]],
                     q: iv.Questions | None = None) -> dict[str, Any]:
    """Mean RF of the first chains' first task minus mean RF of the second chains' first task, over all runs of the
    given (first runs, first task, second runs, second task) pairs: its crossed seed × question interval and t-test
    p-value (the two sides have independent seeds; runs of one side with the same seed label are one seed), Welch's
    t-test p and a permutation test that permutes the order labels of the runs within each pair (exact when the
    assignments are few). Without per-question data, the interval is Welch's."""
    q = q or iv.Questions()
    rf = [([_first_rf(r, a) for r in first], [_first_rf(r, b) for r in second]) for first, a, second, b in pairs]
    welch = M.order_asymmetry([v for x, _ in rf for v in x], [v for _, y in rf for v in y])
    perm = st.permutation_test(rf)
    out = {"RF_first": welch.mean_s_then_c, "RF_second": welch.mean_c_then_s, "difference": welch.difference,
           "ci_low": welch.ci_low, "ci_high": welch.ci_high, "p_value": welch.p_value, "welch_p_value": welch.p_value,
           "permutation_p_value": perm.p_value, "n_first": welch.n_s_then_c, "n_second": welch.n_c_then_s,
           "ci_method": iv.WELCH if welch.n_s_then_c > 1 and welch.n_c_then_s > 1 else iv.NO_INTERVAL,
           "note": welch.note}
    blocks = order_blocks(pairs, q)
    if isinstance(blocks, str):
        out["ci_method"] += f" ({blocks})" if out["ci_method"] == iv.WELCH else ""
        return out
    res = st.crossed_estimate(blocks)
    return out | {"ci_low": res.ci_low, "ci_high": res.ci_high, "p_value": res.p_value, "ci_method": iv.CROSSED}


def order_blocks(pairs: list[tuple[list[RunData], str, list[RunData], str]],
                 q: iv.Questions) -> list[st.Block] | str:
    """The crossed blocks of `order_difference`'s RF difference (seed groups 'first' and 'second'), or why not."""
    sides = [iv.crossed([iv.forgetting_values(q, r, task, 1, 2, "RF") for runs, task in side for r in runs],
                        name, sign)
             for side, name, sign in (([(p[0], p[1]) for p in pairs], "first", 1.0),
                                      ([(p[2], p[3]) for p in pairs], "second", -1.0))]
    reasons = [s for s in sides if isinstance(s, str)]
    return "; ".join(dict.fromkeys(reasons)) if reasons else sides[0] + sides[1]


def _order_asymmetry(runs: list[RunData], q: iv.Questions) -> pd.DataFrame:
    """For two-stage chains A→B and B→A: RF of A (when B follows) vs RF of B (when A follows), over seeds.
    Two chains are paired only if each task is trained with the same settings in both (and, in a sweep, they
    belong to the same sweep point): an lr-sweep chain A→B is not compared with the main grid's B→A."""
    rows = []
    for chain_ab, chain_ba, a, b in order_pairs(runs):
        res = order_difference([([r for r in runs if r.chain == chain_ab], a,
                                 [r for r in runs if r.chain == chain_ba], b)], q)
        rows.append({"first": f"{chain_ab}: {a}→{b}", "second": f"{chain_ba}: {b}→{a}",
                     **{k: res[k] for k in ("RF_first", "RF_second", "difference", "ci_low", "ci_high", "p_value",
                                            "welch_p_value", "permutation_p_value")},
                     "seeds": f"{res['n_first']}/{res['n_second']}", "ci_method": res["ci_method"], "note": res["note"]})
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
    Columns: chain, seed, run_id, stage, trained_stage (s_S: the stage that last trained replay_task before),
    task (trained with replay), replay_task, fraction, group, recovery, capability_cost, forgotten."""
    replayed = {tuple(_trained_tasks(r)[:spec["stage"]]): spec for r in runs for spec in replay_specs(r.stage_settings)}
    rows = []
    for run in runs:
        specs = replay_specs(run.stage_settings)
        if not specs:
            tasks = _trained_tasks(run)
            specs = [spec | {"fraction": 0.0} for prefix, spec in replayed.items()
                     if len(tasks) >= spec["stage"] and tuple(tasks[:spec["stage"]]) == prefix][:1]
        rows += [{"chain": run.chain, "seed": run.seed, "run_id": run.record.run_id, **item}
                 for item in replay_metrics(run.rows, specs)]
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
