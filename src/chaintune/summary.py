"""Per-run metrics and the experiment summary tables (forgetting, biased forgetting, asymmetry, BBQ bias)."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from chaintune import metrics as M
from chaintune.errors import ChaintuneError
from chaintune.io import read_json, write_table, write_text

OVERALL = "ALL"  # `group` value of whole-task rows in the results table


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in df.to_dict(orient="records")]


def run_metrics(run_df: pd.DataFrame, predictions: pd.DataFrame, cfg) -> dict[str, Any]:
    """Metrics of one run (SPEC.md §5) from its tidy accuracy rows and per-example predictions.

    `run_df`: rows (stage, trained_task, eval_task, group, n, acc) for one chain × seed; stage 0 = base.
    """
    overall = run_df[run_df.group == OVERALL]
    R = M.accuracy_matrix(overall.rename(columns={"eval_task": "task"})[["stage", "task", "acc"]])
    K = int(R.index.max())
    trained = {int(s): t for s, t in overall.drop_duplicates("stage")[["stage", "trained_task"]].values if s > 0}
    evaluated = set(R.columns)
    out: dict[str, Any] = {"final_stage": K, "learning_gain": [], "forgetting": [], "group_forgetting": [],
                           "biased_forgetting": [], "warnings": []}
    first_trained = {t: s for s, t in sorted(trained.items(), reverse=True)}
    for s, task in trained.items():
        if task in evaluated:
            gain = M.learning_gain(R, s, task)
            # a stage that trains a task again (e.g. the replay stage C + f·S after C) starts from a model that
            # already learned it: its gain is not the "did it learn at all" precondition (its cost is reported)
            out["learning_gain"].append({"stage": s, "task": task, "gain": gain, "before": R.loc[s - 1, task],
                                         "after": R.loc[s, task], "retrained": s > first_trained[task]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["warnings"] += M.learning_gain_warnings(
            R, {s: t for s, t in trained.items() if t in evaluated and s == first_trained[t]})
        for s, task in trained.items():
            if task not in evaluated or s == K:
                continue
            f = M.forgetting(R, task, s, K)
            rf = M.relative_forgetting(R, task, s, K)
            p = predictions[predictions.eval_task == task]
            before = p[p.stage == s].set_index("id")
            after = p[p.stage == K].set_index("id").loc[before.index]
            boot = M.paired_bootstrap(before.correct.to_numpy(), after.correct.to_numpy(), seed=cfg.data_seed)
            out["forgetting"].append({"task": task, "trained_stage": s, "after_stage": K, "F": f, "RF": rf,
                                      "F_ci_low": boot.ci_low, "F_ci_high": boot.ci_high})
            groups = run_df[(run_df.eval_task == task) & (run_df.group != OVERALL)]
            if groups.empty:
                continue
            g_before = groups[groups.stage == s].set_index("group")
            g_after = groups[groups.stage == K].set_index("group")
            bf = M.biased_forgetting(M.group_forgetting(g_before.acc, g_after.acc), f, g_before.n, cfg.min_group_size)
            gboot = M.paired_bootstrap_groups(before.correct.to_numpy(), after.correct.to_numpy(),
                                              before.group.to_numpy(), seed=cfg.data_seed)
            table = bf.table.join(gboot[["ci_low", "ci_high", "bf_ci_low", "bf_ci_high"]]).reset_index()
            out["group_forgetting"] += _records(table.assign(task=task, trained_stage=s, after_stage=K))
            out["biased_forgetting"].append({"task": task, "trained_stage": s, "after_stage": K, "BF_max": bf.bf_max,
                                             "BF_spread": bf.bf_spread, "BF_std": bf.bf_std, "n_groups": bf.n_groups,
                                             "note": bf.note})
        if K > 2:
            first = {t: s for s, t in sorted(trained.items(), reverse=True) if t in evaluated}
            out["k_stage_forgetting"] = M.k_stage_forgetting(R, first).to_dict()
            out["bwt"] = M.backward_transfer(R, first)
        if "bbq" in evaluated or "bbq_lite" in evaluated:
            out["bbq_bias"] = []
            for task in [t for t in ("bbq", "bbq_lite") if t in evaluated]:
                for s in R.index:
                    p = predictions[(predictions.eval_task == task) & (predictions.stage == s)]
                    scores = M.bbq_bias_scores(p)
                    out["bbq_bias"] += _records(scores.table.reset_index().assign(task=task, stage=int(s)))
    out["warnings"] += [str(w.message) for w in caught]
    out["accuracy_matrix"] = {str(t): {int(s): v for s, v in R[t].items()} for t in R.columns}
    return out


def replay_metrics(run_df: pd.DataFrame, replay_stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Recovery and capability cost of every replay stage (SPEC.md §7), overall and per group.

    `replay_stages`: [{stage, task, replay_task, fraction}]. For replay of S at stage s after S was trained at
    stage s_S: recovery = (R[s][S] − R[s−1][S]) / (R[s_S][S] − R[s−1][S]); cost = R[s−1][C] − R[s][C].
    """
    acc = run_df.set_index(["stage", "eval_task", "group"]).acc
    trained = dict(run_df.drop_duplicates("stage")[["stage", "trained_task"]].values)
    rows = []
    for r in replay_stages:
        s, S, C = r["stage"], r["replay_task"], r["task"]
        earlier = [k for k in range(1, s) if trained.get(k) == S]
        if not earlier or (s, S, OVERALL) not in acc.index:
            continue
        s_S = earlier[-1]
        groups = sorted(run_df[(run_df.eval_task == S) & (run_df.stage == s)].group.unique())
        for g in groups:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", M.MetricWarning)
                rec = M.replay_recovery(acc[(s_S, S, g)], acc[(s - 1, S, g)], acc[(s, S, g)])
            cost = M.capability_cost(acc[(s - 1, C, OVERALL)], acc[(s, C, OVERALL)]) if (s, C, OVERALL) in acc.index \
                else math.nan
            rows.append({"stage": s, "task": C, "replay_task": S, "fraction": r["fraction"], "group": g,
                         "recovery": rec, "capability_cost": cost if g == OVERALL else math.nan,
                         "forgotten": acc[(s_S, S, g)] - acc[(s - 1, S, g)]})
    return _records(pd.DataFrame(rows)) if rows else []


# --------------------------------------------------------------------------------------------- experiment summary
def load_run_metrics(out_dir: Path) -> list[dict[str, Any]]:
    """Every finished run: run.json, its metrics.json (`metrics`) and its stages' tasks and resolved training
    settings (`stage_settings`: [(task, training dict)], from the stages' node.json)."""
    runs = []
    for path in sorted((out_dir / "runs").glob("*/metrics.json")):
        meta = read_json(path.parent / "run.json")
        settings = []
        for node in meta.get("stages", [])[1:]:
            info = out_dir / "stages" / node / "node.json"
            node_meta = read_json(info) if info.is_file() else {}
            training = {k: v for k, v in node_meta.get("training", {}).items() if k != "checkpoint_every"}
            settings.append((node_meta.get("task"), training, node_meta.get("stage", {}).get("replay")))
        runs.append(meta | {"metrics": read_json(path), "stage_settings": settings})
    if not runs:
        raise ChaintuneError(f"'{out_dir}' holds no finished runs (no runs/*/metrics.json)",
                             "pass the output_dir of a finished `chaintune run`")
    return runs


def _flat(runs: list[dict[str, Any]], key: str) -> pd.DataFrame:
    rows = [{"chain": r["chain"], "seed": r["seed"], **item} for r in runs for item in r["metrics"].get(key, [])]
    return pd.DataFrame(rows)


def _ci(df: pd.DataFrame, by: list[str], value: str, name: str | None = None) -> pd.DataFrame:
    agg = M.aggregate_over_seeds(df, by, value).drop(columns=["note"])
    name = name or value
    return agg.rename(columns={"mean": name, "std": f"{name}_std", "ci_low": f"{name}_ci_low",
                               "ci_high": f"{name}_ci_high", "n": "seeds"})


def summary_tables(out_dir: str | Path) -> dict[str, pd.DataFrame]:
    """Tables over seeds: learning gain, forgetting, group forgetting, biased forgetting, order asymmetry, BBQ bias."""
    out_dir = Path(out_dir)
    runs = load_run_metrics(out_dir)
    tables: dict[str, pd.DataFrame] = {}
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
    replay = _flat(runs, "replay")
    if not replay.empty:
        overall = replay[replay.group == OVERALL]
        rec = _ci(overall, ["task", "replay_task", "fraction"], "recovery")
        cost = _ci(overall, ["task", "replay_task", "fraction"], "capability_cost").drop(columns=["seeds"])
        table = rec.merge(cost, on=["task", "replay_task", "fraction"])
        table["smallest_f_recovering_90pct"] = [
            M.smallest_recovering_fraction(overall[(overall.task == t) & (overall.replay_task == r)])
            for t, r in zip(table.task, table.replay_task)]
        tables["replay"] = table
        groups = replay[replay.group != OVERALL]
        if not groups.empty:
            tables["replay_groups"] = _ci(groups, ["task", "replay_task", "fraction", "group"], "recovery")
    bbq = _flat(runs, "bbq_bias")
    if not bbq.empty:
        dis = _ci(bbq, ["chain", "task", "stage", "category"], "s_dis")
        amb = _ci(bbq, ["chain", "task", "stage", "category"], "s_amb").drop(columns=["seeds"])
        tables["bbq_bias"] = dis.merge(amb, on=["chain", "task", "stage", "category"])
    return tables


def curvature_vs_forgetting(runs: list[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Points (one per run: λ_max after stage s, forgetting of that stage's task after stage s + 1) and their
    correlation (SPEC.md §6): over all runs (`task` = ALL) and per first-stage task, for F and RF, and per group for
    F_g. Forgetting measured after a later stage (a third, replay stage) is left out: that stage changes it too.
    `first_stages` counts the distinct curvature measurements behind a row: runs that share a trained first stage
    share its λ_max, so they are not independent points (the p-values assume they are). Runs that share the trained
    nodes up to stage s + 1 (the same chain listed under two names) are one point, not several."""
    points, group_points, seen = [], [], set()
    for r in runs:
        curv = {c["stage"]: c["lambda_max"] for c in r["metrics"].get("curvature", [])}
        nodes = r.get("stages")  # node dirnames, base first; absent in hand-built runs: every run is distinct

        def through(s: int) -> tuple:  # what identifies the model after stage s + 1
            return tuple(nodes[:s + 2]) if nodes else (r["chain"], r["seed"])

        for f in r["metrics"].get("forgetting", []):
            s = f["trained_stage"]
            ident = (through(s), f["task"])
            if s in curv and f["after_stage"] == s + 1 and ident not in seen:
                seen.add(ident)
                points.append({"chain": r["chain"], "seed": r["seed"], "task": f["task"], "stage": s,
                               "lambda_max": curv[s], "F": f["F"], "RF": f["RF"]})
        for g in r["metrics"].get("group_forgetting", []):
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


def order_pairs(runs: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(chain A→B, chain B→A, A, B) for every pair of two-stage chains that are each other's reverse, train each
    task with the same settings, and belong to the same sweep point."""
    chains: dict[str, tuple[tuple[str, str], str, dict[str, str]]] = {}
    for r in runs:
        tasks = [g["task"] for g in r["metrics"].get("learning_gain", [])]
        if r["metrics"]["final_stage"] == 2 and len(tasks) == 2:
            settings = {task: json.dumps([training, replay], sort_keys=True)
                        for task, training, replay in r.get("stage_settings", []) if task}
            chains[r["chain"]] = (tuple(tasks), r.get("variant", ""), settings)
    pairs = []
    for chain_ab, ((a, b), variant_ab, set_ab) in chains.items():
        for chain_ba, ((c, d), variant_ba, set_ba) in chains.items():
            if (c, d) == (b, a) and chain_ab < chain_ba and variant_ab == variant_ba and set_ab == set_ba:
                pairs.append((chain_ab, chain_ba, a, b))
    return pairs


def _order_asymmetry(runs: list[dict[str, Any]], forg: pd.DataFrame) -> pd.DataFrame:
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


def write_summary(out_dir: str | Path, tables: dict[str, pd.DataFrame]) -> Path:
    """Write every table as CSV and one Markdown file; returns the summary folder."""
    folder = Path(out_dir) / "summary"
    md = [f"# Summary of {Path(out_dir).name}\n"]
    for question, lines in findings(out_dir, tables).items():
        md += [f"**{question}**\n"] + [f"- {line}" for line in lines] + [""]
    for name, df in tables.items():
        write_table(folder / f"{name}.csv", df)
        md += [f"## {name.replace('_', ' ')}\n", df.to_markdown(index=False, floatfmt=".2f"), ""]
    write_text(folder / "summary.md", "\n".join(md) + "\n")
    return folder


def _ci_text(row: Any, col: str, fmt: str = ".2f") -> str:
    lo, hi = row.get(f"{col}_ci_low", math.nan), row.get(f"{col}_ci_high", math.nan)
    ci = f" [{lo:{fmt}}, {hi:{fmt}}]" if isinstance(lo, float) and math.isfinite(lo) else ""
    return f"{row[col]:{fmt}}{ci}"


def _kind(task: str) -> str:
    from chaintune.tasks import canonical_task_name, get_task

    return get_task(canonical_task_name(task)).kind


def findings(out_dir: str | Path, tables: dict[str, pd.DataFrame] | None = None) -> dict[str, list[str]]:
    """The paper's questions (SPEC.md §1) answered from an experiment's results, as sentences with numbers:
    learning gains (the precondition), order asymmetry, biased forgetting, curvature → forgetting, replay.
    Intervals are 95% over seeds (t) unless noted."""
    out_dir = Path(out_dir)
    tables = tables if tables is not None else summary_tables(out_dir)
    runs = load_run_metrics(out_dir)
    out: dict[str, list[str]] = {}
    gains = tables.get("learning_gain")
    if gains is not None and not gains.empty:
        again = gains[gains.retrained]
        gains = gains[~gains.retrained]
        bad = gains[~(gains.gain > 0)]
        out["Learning gains"] = [f"{len(gains) - len(bad)} of {len(gains)} (chain, stage) gains on the stage's own "
                                 f"task are positive (mean over seeds); range {gains.gain.min():.2f} to "
                                 f"{gains.gain.max():.2f} pp."]
        out["Learning gains"] += [f"Not positive: {r.chain}, stage {r.stage} ({r.task}): {_ci_text(r._asdict(), 'gain')} "
                                  "pp — forgetting measured after it is not meaningful." for r in bad.itertuples()]
        if not again.empty:
            out["Learning gains"].append(
                f"{len(again)} (chain, stage) pairs train a task the chain trained before (e.g. a replay stage); "
                f"their gains ({again.gain.min():.2f} to {again.gain.max():.2f} pp) are not a precondition.")
    pairs = [p for p in order_pairs(runs) if {_kind(p[2]), _kind(p[3])} == {"safety", "capability"}]
    if pairs:
        lines, rf_s, rf_c = [], [], []
        by_chain = {}
        for r in runs:
            for f in r["metrics"].get("forgetting", []):
                if f["trained_stage"] == 1:
                    by_chain.setdefault(r["chain"], []).append(f["RF"])
        for chain_ab, chain_ba, a, b in pairs:
            s_first, c_first, s, c = (chain_ab, chain_ba, a, b) if _kind(a) == "safety" else (chain_ba, chain_ab, b, a)
            res = M.order_asymmetry(by_chain.get(s_first, []), by_chain.get(c_first, []))
            rf_s += by_chain.get(s_first, [])
            rf_c += by_chain.get(c_first, [])
            ci = f" [{res.ci_low:.2f}, {res.ci_high:.2f}], Welch p = {res.p_value:.3g}" if math.isfinite(res.ci_low) else ""
            lines.append(f"{s_first} ({s}→{c}): RF of {s} {res.mean_s_then_c:.2f} % vs {c_first} ({c}→{s}): RF of {c} "
                         f"{res.mean_c_then_s:.2f} %; difference {res.difference:.2f}{ci} ({res.n_s_then_c}/"
                         f"{res.n_c_then_s} seeds).")
        pooled = M.order_asymmetry(rf_s, rf_c)
        ci = (f" [{pooled.ci_low:.2f}, {pooled.ci_high:.2f}], Welch p = {pooled.p_value:.3g}"
              if math.isfinite(pooled.ci_low) else "")
        verdict = ("safety is forgotten more when it comes first" if math.isfinite(pooled.ci_low) and pooled.ci_low > 0
                   else "the capability task is forgotten more when it comes first" if math.isfinite(pooled.ci_high)
                   and pooled.ci_high < 0 else "no significant difference between the orders")
        out["Order: is safety forgotten more when it comes first?"] = [
            f"Pooled over {len(pairs)} task pairs: RF of the safety task in S→C {pooled.mean_s_then_c:.2f} % "
            f"(n = {pooled.n_s_then_c} runs) vs RF of the capability task in C→S {pooled.mean_c_then_s:.2f} % "
            f"(n = {pooled.n_c_then_s}); difference {pooled.difference:.2f}{ci}: {verdict}."] + lines
    groups, bf = tables.get("group_forgetting"), tables.get("biased_forgetting")
    safety_first = {p[0] if _kind(p[2]) == "safety" else p[1] for p in pairs}
    if groups is not None and not groups.empty:
        lines = []
        for (chain, task), part in groups.groupby(["chain", "task"], sort=False):
            if _kind(task) != "safety" or (safety_first and chain not in safety_first):
                continue
            part = part[part.included].sort_values("F_g", ascending=False)
            if part.empty:
                continue
            top = ", ".join(f"{r.group} {_ci_text(r._asdict(), 'F_g', '.1f')}" for r in part.head(3).itertuples())
            sig = [r.group for r in part.itertuples() if math.isfinite(r.BF_g_ci_low) and
                   (r.BF_g_ci_low > 0 or r.BF_g_ci_high < 0)]
            row = bf[(bf.chain == chain) & (bf.task == task)].iloc[0] if bf is not None and len(bf) else None
            spread = f"BF_spread {_ci_text(row, 'BF_spread')} pp, " if row is not None else ""
            lines.append(f"{chain} ({task}, {len(part)} groups): {spread}most forgotten: {top} pp; groups whose BF_g "
                         f"interval excludes 0: {', '.join(sig) if sig else 'none'}.")
        if lines:
            out["Is forgetting biased across groups?"] = lines
    corr = tables.get("curvature_vs_forgetting")
    if corr is not None and not corr.empty:
        overall = corr[corr.group == OVERALL]
        out["Does first-stage curvature predict forgetting?"] = [
            f"λ_max vs {r.target}{'' if r.task == OVERALL else f' of {r.task}'}: Pearson r = {r.pearson_r:.2f} "
            f"(p = {r.pearson_p:.3g}), Spearman ρ = {r.spearman_rho:.2f} (p = {r.spearman_p:.3g}), R² = {r.r2:.2f}, "
            f"n = {r.n} runs from {r.first_stages} distinct first stages."
            for r in overall.itertuples()] + [
            "Runs that share a first stage share its λ_max; the p-values treat every run as independent, so read "
            "them against the number of distinct first stages. Pooled rows mix tasks whose λ_max and forgetting "
            "differ by task; the per-task rows are free of that."]
    replay = tables.get("replay")
    if replay is not None and not replay.empty:
        out["How much does replay recover, at what cost?"] = [
            f"{r.replay_task} replayed into {r.task} at f = {100 * r.fraction:g} %: recovery "
            f"{_ci_text(r._asdict(), 'recovery')} (1 = all forgetting undone), capability cost "
            f"{_ci_text(r._asdict(), 'capability_cost')} pp ({r.seeds} seeds)."
            for r in replay.sort_values(["task", "replay_task", "fraction"]).itertuples()]
        for r in replay.drop_duplicates(["task", "replay_task"]).itertuples():
            f = r.smallest_f_recovering_90pct
            found = isinstance(f, float) and math.isfinite(f)
            out["How much does replay recover, at what cost?"].append(
                f"Smallest f recovering ≥ 90 % ({r.replay_task} into {r.task}): "
                f"{f'{100 * f:g} %' if found else 'none of the fractions tried'}.")
    return out
