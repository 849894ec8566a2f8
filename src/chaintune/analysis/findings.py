"""The paper's questions (SPEC.md §1) answered in sentences with numbers, and the summary folder that holds them
with every table."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from chaintune import metrics as M
from chaintune.analysis.records import OVERALL, RunData
from chaintune.analysis.tables import order_pairs, summary_tables
from chaintune.rundir import RunDir


def write_summary(out: RunDir, runs: list[RunData], tables: dict[str, pd.DataFrame]) -> Path:
    """Write every table as CSV and one Markdown file (findings first) under summary/; returns that folder."""
    folder = out.summary_dir
    md = [f"# Summary of {out.root.name}\n"]
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


def findings(runs: list[RunData], tables: dict[str, pd.DataFrame] | None = None) -> dict[str, list[str]]:
    """The paper's questions (SPEC.md §1) answered from an experiment's results, as sentences with numbers:
    learning gains (the precondition), order asymmetry, biased forgetting, curvature → forgetting, replay.
    Intervals are 95% over seeds (t) unless noted."""
    tables = tables if tables is not None else summary_tables(runs)
    kinds = {task: kind for r in runs for task, kind in r.task_kinds.items()}

    def _kind(task: str) -> str:
        return kinds.get(task, "other")

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
            for f in r.metrics.get("forgetting", []):
                if f["trained_stage"] == 1:
                    by_chain.setdefault(r.chain, []).append(f["RF"])
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
                   and pooled.ci_high < 0 else "no significant difference between the orders"
                   if math.isfinite(pooled.ci_low) else f"no test ({pooled.note})")
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
