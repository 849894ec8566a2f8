"""The paper's questions (SPEC.md §1) answered in sentences with numbers, and the summary folder that holds them
with every table."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from chaintune.analysis.intervals import BOOTSTRAP, CROSSED, SIGNIFICANCE, T_OVER_SEEDS, WELCH
from chaintune.analysis.quality import failure_text
from chaintune.analysis.records import GROUP_SEPARATOR, OVERALL, RunData
from chaintune.analysis.tables import order_difference, order_pairs, summary_tables
from chaintune.rundir import RunDir


def write_summary(out: RunDir, runs: list[RunData], tables: dict[str, pd.DataFrame],
                  group_by: tuple[str, ...] = ()) -> Path:
    """Write every table as CSV and one Markdown file (findings first) under summary/ (with `group_by`, the
    metadata columns the runs were regrouped by: summary/by_<cols>/); returns that folder."""
    folder = out.summary_folder(group_by)
    md = [f"# Summary of {out.root.name}{f' (groups: {GROUP_SEPARATOR.join(group_by)})' if group_by else ''}\n"]
    for question, lines in findings(runs, tables).items():
        md += [f"**{question}**\n"] + [f"- {line}" for line in lines] + [""]
    for name, df in tables.items():
        out.write_table(folder / f"{name}.csv", df)
        md += [f"## {name.replace('_', ' ')}\n", df.to_markdown(index=False, floatfmt=".2f"), ""]
    out.write_text(folder / "summary.md", "\n".join(md) + "\n")
    return folder


def _ci_text(row: Any, col: str, fmt: str = ".2f") -> str:
    lo, hi = row.get(f"{col}_ci_low", math.nan), row.get(f"{col}_ci_high", math.nan)
    ci = f" [{lo:{fmt}}, {hi:{fmt}}]" if isinstance(lo, float) and math.isfinite(lo) else ""
    return f"{row[col]:{fmt}}{ci}"


def _tests(res: dict[str, Any]) -> str:
    """' [lo, hi], p = …, Welch p = …, permutation p = …' of an `order_difference` result ('' without an interval)."""
    if not math.isfinite(res["ci_low"]):
        return ""
    crossed = f", p = {res['p_value']:.3g}" if res["ci_method"] == CROSSED else ""
    return (f" [{res['ci_low']:.2f}, {res['ci_high']:.2f}]{crossed}, Welch p = {res['welch_p_value']:.3g}, "
            f"permutation p = {res['permutation_p_value']:.3g}")


def _methods(tables: dict[str, pd.DataFrame]) -> list[str]:
    """One sentence per interval method that the tables used."""
    used = {str(m) for df in tables.values() if "ci_method" in df.columns for m in df["ci_method"]}
    lines = []
    if CROSSED in used:
        lines.append("Chains with >= 2 seeds: 95 % seed × question intervals (variance components of seeds, test "
                     "questions and their interaction; t with Satterthwaite df), since every seed answers the same "
                     "questions; ratios (RF, recovery) and group summaries are linearised per question.")
    if any(m.startswith(BOOTSTRAP) for m in used):
        lines.append("Chains with one seed: 95 % paired bootstrap over test questions (1,000 resamples) for F, F_g "
                     "and BF_g.")
    if any(m.startswith((T_OVER_SEEDS, WELCH)) for m in used):
        lines.append("Tables marked 't over seeds' (curvature, BBQ bias, rows without per-question predictions) use "
                     "95 % t intervals over seeds.")
    return lines


def findings(runs: list[RunData], tables: dict[str, pd.DataFrame] | None = None) -> dict[str, list[str]]:
    """The paper's questions (SPEC.md §1) answered from an experiment's results, as sentences with numbers:
    learning gains (the precondition), order asymmetry, biased forgetting, curvature → forgetting, replay, and how
    the intervals were computed (each table's `ci_method`)."""
    tables = tables if tables is not None else summary_tables(runs)
    kinds = {task: kind for r in runs for task, kind in r.task_kinds.items()}
    out: dict[str, list[str]] = {}
    gates = tables.get("stage_gate")
    if gates is not None and not gates.empty:
        failed = gates[~gates.passed]
        excluded = tables.get("excluded_runs", pd.DataFrame(columns=["run", "reason"]))
        retried = int((gates.attempts > 1).sum())
        out["Stage quality gate"] = [
            f"{len(gates) - len(failed)} of {len(gates)} trained stages passed their quality gate (validation slice "
            f"of {gates.n_validation.min()}–{gates.n_validation.max()} held-out train examples; accuracy ≥ majority "
            f"baseline, gain ≥ threshold, no divergence){f'; {retried} needed more than one attempt' if retried else ''}."]
        out["Stage quality gate"] += [f"Failed: {failure_text(r)}." for r in failed.to_dict("records")]
        out["Stage quality gate"].append(
            f"{len(excluded)} of {len(runs)} runs are excluded from every table and answer below"
            + (": " + "; ".join(f"{r.run} ({r.reason})" for r in excluded.itertuples()) + "." if len(excluded) else "."))
        runs = [r for r in runs if not r.failed_stages]

    def _kind(task: str) -> str:
        return kinds.get(task, "other")

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
        lines, pooled_pairs = [], []
        for chain_ab, chain_ba, a, b in pairs:
            s_first, c_first, s, c = (chain_ab, chain_ba, a, b) if _kind(a) == "safety" else (chain_ba, chain_ab, b, a)
            pair = ([r for r in runs if r.chain == s_first], s, [r for r in runs if r.chain == c_first], c)
            pooled_pairs.append(pair)
            res = order_difference([pair])
            lines.append(f"{s_first} ({s}→{c}): RF of {s} {res['RF_first']:.2f} % vs {c_first} ({c}→{s}): RF of {c} "
                         f"{res['RF_second']:.2f} %; difference {res['difference']:.2f}{_tests(res)} "
                         f"({res['n_first']}/{res['n_second']} seeds).")
        pooled = order_difference(pooled_pairs)
        lo, hi = pooled["ci_low"], pooled["ci_high"]
        verdict = ("safety is forgotten more when it comes first" if math.isfinite(lo) and lo > 0
                   else "the capability task is forgotten more when it comes first" if math.isfinite(hi) and hi < 0
                   else "no significant difference between the orders" if math.isfinite(lo)
                   else f"no test ({pooled.get('note') or 'too few seeds'})")
        out["Order: is safety forgotten more when it comes first?"] = [
            f"Pooled over {len(pairs)} task pairs: RF of the safety task in S→C {pooled['RF_first']:.2f} % "
            f"(n = {pooled['n_first']} runs) vs RF of the capability task in C→S {pooled['RF_second']:.2f} % "
            f"(n = {pooled['n_second']}); difference {pooled['difference']:.2f}{_tests(pooled)}: {verdict}."] + lines
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
            sig = [f"{r.group} (BF_g {r.BF_g:+.1f} pp)" for r in part.itertuples() if r.BF_g_significant]
            row = bf[(bf.chain == chain) & (bf.task == task)].iloc[0] if bf is not None and len(bf) else None
            spread = f"BF_spread {_ci_text(row, 'BF_spread')} pp, " if row is not None else ""
            tested = int(part.BF_g_adj_p.notna().sum())
            lines.append(f"{chain} ({task}, {len(part)} groups): {spread}most forgotten: {top} pp; groups whose BF_g "
                         f"interval excludes 0 at the {part.correction.iloc[0]}-corrected level ({tested} tests, "
                         f"adjusted p < {SIGNIFICANCE:g}): {', '.join(sig) if sig else 'no group'}.")
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
        unstable = sorted({r.record.stages[c["stage"]] for r in runs  # a stage shared by runs: named once
                           for c in r.metrics.get("curvature", []) if c.get("unstable")})
        if unstable:
            out["Does first-stage curvature predict forgetting?"].append(
                f"λ_max is unstable (its interval spans 0 or its ends differ beyond curvature.disagreement) for: "
                f"{', '.join(unstable)} — raise curvature.examples before reading these points.")
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
    claims = tables.get("claims")
    if claims is not None and not claims.empty:
        out["The paper's claims: verdicts"] = [
            f"{r.claim} — {r.subject}: {r.effect:.3g} {r.unit} [{r.ci_low:.3g}, {r.ci_high:.3g}], p = {r.p_value:.3g}, "
            f"adjusted p = {r.adj_p:.3g} ({r.correction}); MDE at 80 % power {r.mde:.3g} vs target {r.target:g} "
            f"({r.n}): {r.verdict}." for r in claims.itertuples()] + [
            "Verdicts: reproduces = significant after correction in the paper's direction; does not (powered null) "
            "= not significant although the MDE is at most the target effect; cannot tell at this power = not "
            "significant with the MDE above the target (docs/metrics.md)."]
    methods = _methods(tables)
    if methods:
        out["How were the intervals computed?"] = methods
    return out
