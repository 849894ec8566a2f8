"""The report's sections: one builder per section, each adding its text, figures and tables of one experiment (or,
for the sweeps, of all experiments) to a `render._Builder`; a section whose data is absent adds nothing."""
from __future__ import annotations

import html
from typing import Mapping, Sequence

import pandas as pd

from chaintune.analysis import findings
from chaintune.analysis.tables import lr_sweep_points, overall_rows, replay_points, replay_rows, replay_table
from chaintune.formatting import format_seconds
from chaintune.report.data import (
    _Experiment, _node_table, accuracy_matrices, chain_tasks, training_curves,
)
from chaintune.report.figures import (
    plot_accuracy_matrices, plot_bbq_bias, plot_curvature, plot_curvature_vs_forgetting, plot_forgetting,
    plot_group_forgetting, plot_lr_forgetting, plot_replay, plot_training_curves,
)
from chaintune.report.render import _Builder


def _findings(b: _Builder, exp: _Experiment, tag: str, prefix: str) -> None:
    if not exp.tables:
        return
    answers = findings(exp.runs, exp.tables)
    if not answers:
        return
    sec = b.section(f"Findings{tag}")
    for question, lines in answers.items():
        items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
        b.text(sec, f"<p><b>{html.escape(question)}</b></p><ul>{items}</ul>")
    claims = exp.tables.get("claims")
    if claims is not None and not claims.empty:
        b.table(sec, f"{prefix}claims", claims, "The paper's claims: effect [95% interval, ci_method], p and the p "
                "adjusted within its family (correction), the design's minimal detectable effect at 80% power (mde) "
                "against the target effect, and the verdict (docs/metrics.md).")


def _gate(b: _Builder, exp: _Experiment, tag: str, prefix: str) -> None:
    gates = exp.tables.get("stage_gate")
    if gates is None or gates.empty:
        return
    sec = b.section(f"Stage quality gate{tag}")
    failed = int((~gates.passed).sum())
    b.text(sec, f"{len(gates) - failed} of {len(gates)} trained stages passed their quality gate: accuracy on a "
                "held-out slice of their own train split at least the majority-class baseline, a gain of at least "
                "the threshold, and no diverging loss. A run with a failed stage is left out of every table and "
                "figure below.")
    b.table(sec, f"{prefix}stage_gate", gates, "Every gated stage: validation accuracy before and after it (pp), "
            "the task's majority-class and chance baselines on the same slice, attempts, verdict.")
    excluded = exp.tables.get("excluded_runs")
    if excluded is not None and not excluded.empty:
        b.table(sec, f"{prefix}excluded_runs", excluded, "Runs excluded from the summaries, and why.")


def _ci_note(tables: Mapping[str, pd.DataFrame], key: str) -> str:
    """The error bars' methods, as the table's `ci_method` column records them."""
    df = tables.get(key)
    methods = list(dict.fromkeys(df["ci_method"])) if df is not None and "ci_method" in df.columns else []
    if not methods:
        return "No intervals (run more seeds for error bars)."
    return f"Error bars: 95% intervals — {'; '.join(methods)}."


def _overview(b: _Builder, exp: _Experiment, tag: str, prefix: str) -> None:
    sec = b.section(f"Overview{tag}")
    t, res = exp.tables, exp.results
    routes = chain_tasks(res)
    chains = ", ".join(f"{c} ({' → '.join(ts)})" for c, ts in routes.items())
    seeds = sorted({int(s) for s in res["seed"].unique()})
    b.text(sec, f"Experiment <b>{html.escape(exp.name)}</b>: chains {html.escape(chains)}; seeds {seeds}; "
                f"evaluated tasks {html.escape(', '.join(map(str, dict.fromkeys(res['eval_task']))))}. "
                "Accuracies are in percentage points (pp); F = R[s][A] − R[K][A] (positive = forgotten), "
                "RF = 100·F / R[s][A] (%).")
    mats = accuracy_matrices(res)
    if mats:
        b.figure(sec, f"{prefix}accuracy_matrix", plot_accuracy_matrices(mats),
                 "Accuracy matrix R[s][t] per chain (mean over seeds, pp): rows = the model after each stage "
                 "(0 = base), columns = evaluated tasks.")
        long = pd.concat([R.reset_index().assign(chain=c) for c, R in mats.items()], ignore_index=True)
        b.table(sec, f"{prefix}accuracy_matrix", long[["chain"] + [c for c in long.columns if c != "chain"]],
                "Accuracy matrix (mean over seeds, pp).")
    if "learning_gain" in t:
        b.table(sec, f"{prefix}learning_gain", t["learning_gain"],
                "Learning gain G = R[s][t_s] − R[s−1][t_s] of each stage on its own task (pp; should be > 1).")
    if "forgetting" in t:
        b.figure(sec, f"{prefix}forgetting", plot_forgetting(t["forgetting"], routes),
                 "Forgetting F (pp) and relative forgetting RF (%) of the earlier task after the last stage, both "
                 f"orders of every task pair side by side. {_ci_note(t, 'forgetting')}")
        b.table(sec, f"{prefix}forgetting", t["forgetting"], "Forgetting F (pp) and relative forgetting RF (%), mean "
                "over seeds [95% CI].")
    if "order_asymmetry" in t and not t["order_asymmetry"].empty:
        b.table(sec, f"{prefix}order_asymmetry", t["order_asymmetry"],
                "Order asymmetry: RF(A→B) vs RF(B→A), difference [95% CI, see ci_method] with its p-value, Welch's "
                "t-test p and a permutation test over the runs' order labels.")
    notes = [f"{run.record.run_id}: {w}" for run in exp.runs for w in run.metrics.get("warnings", [])]
    if notes:
        shown = notes[:12] + ([f"… and {len(notes) - 12} more"] if len(notes) > 12 else [])
        b.text(sec, "Warnings from the metrics:<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in shown) + "</ul>")


def _groups(b: _Builder, exp: _Experiment, tag: str, prefix: str) -> None:
    t = exp.tables
    if "group_forgetting" not in t and "biased_forgetting" not in t:
        return
    sec = b.section(f"Per-group (biased) forgetting{tag}")
    min_size = exp.config.get("min_group_size")
    if "group_forgetting" in t:
        g = t["group_forgetting"]
        for (chain, task), part in g.groupby(["chain", "task"], sort=False):
            b.figure(sec, f"{prefix}group_forgetting_{chain}_{task}", plot_group_forgetting(part, min_size),
                     f"{chain}: forgetting F_g (pp) of every {task} group; dashed = task-average F, so a bar above "
                     f"it is forgotten more than the task (BF_g = F_g − F > 0). Hatched grey = fewer than "
                     f"{min_size or 'min_group_size'} test questions: shown, but left out of the BF summaries. "
                     f"{_ci_note(t, 'group_forgetting')}")
        b.table(sec, f"{prefix}group_forgetting", g, "Per-group forgetting F_g and biased forgetting BF_g = F_g − F "
                "(pp), mean over seeds [95% CI]; included = counted in the summaries; p-values adjusted over the "
                "included groups of each chain × task (adj_p, significant = adjusted p < 0.05; see correction).")
    if "biased_forgetting" in t:
        b.table(sec, f"{prefix}biased_forgetting", t["biased_forgetting"],
                "Biased-forgetting summaries over included groups: BF_max = max |BF_g|, BF_spread = max F_g − "
                "min F_g, BF_std (pp); '—' when no group is large enough.")


def _bbq(b: _Builder, exp: _Experiment, tag: str, prefix: str) -> None:
    df = exp.tables.get("bbq_bias")
    if df is None or df.empty:
        return
    sec = b.section(f"BBQ bias scores{tag}")
    overall = overall_rows(exp.results)
    for (chain, task), part in df.groupby(["chain", "task"], sort=False):
        names = dict(overall[overall.chain == chain].drop_duplicates("stage")[["stage", "stage_name"]].values)
        b.figure(sec, f"{prefix}bbq_bias_{chain}_{task}", plot_bbq_bias(part, {int(k): v for k, v in names.items()}),
                 f"{chain}: {task} bias scores per category after each stage (−100…100; 0 = unbiased, > 0 = "
                 f"answers follow the stereotype). {_ci_note(exp.tables, 'bbq_bias')}")
    b.table(sec, f"{prefix}bbq_bias", df, "BBQ bias scores s_DIS and s_AMB per stage and category, mean over seeds "
            "[95% CI].")


def _curvature(b: _Builder, exp: _Experiment, tag: str, prefix: str) -> None:
    t = exp.tables
    if "curvature" not in t:
        return
    sec = b.section(f"Curvature{tag}")
    points = t.get("curvature_points")
    b.figure(sec, f"{prefix}curvature", plot_curvature(t["curvature"], points),
             f"Largest Hessian eigenvalue λ_max of the stage's training loss after the stage (dots: seeds). "
             f"{_ci_note(t, 'curvature')}")
    b.table(sec, f"{prefix}curvature", t["curvature"], "λ_max after the stage, mean over seeds [95% CI].")
    if points is not None and not points.empty:
        corr = t.get("curvature_vs_forgetting")
        b.figure(sec, f"{prefix}curvature_vs_forgetting", plot_curvature_vs_forgetting(points, corr),
                 "Curvature after the first stage vs later forgetting of that stage's task, one point per run, with "
                 "the least-squares line over all runs (Pearson r, p in the legend).")
        if corr is not None and not corr.empty:
            b.table(sec, f"{prefix}curvature_vs_forgetting", corr, "Correlation of λ_max with forgetting after the next stage "
                    "over runs: pooled (task ALL), per first-stage task and per group (Pearson r, Spearman ρ, R² of the "
                    "least-squares line, p-values; `first_stages`: distinct λ_max measurements behind the row).")


def _sweeps(b: _Builder, exps: Sequence[_Experiment]) -> None:
    many = len(exps) > 1
    lr = pd.concat([lr_sweep_points(e.runs).assign(experiment=e.name) for e in exps], ignore_index=True)
    rp = pd.concat([replay_points(e.runs).assign(experiment=e.name) for e in exps], ignore_index=True)
    replay = pd.concat([replay_rows(e.runs) for e in exps], ignore_index=True)  # pooled over a sweep folder
    lr = lr[lr.groupby("route")["lr"].transform("nunique") > 1] if not lr.empty else lr
    if lr.empty and rp.empty:
        return
    sec = b.section("Learning-rate and replay sweeps")
    if not lr.empty:
        cols = (["experiment"] if many else []) + ["chain", "seed", "route", "task", "lr", "F", "RF"]
        b.figure(sec, "lr_forgetting", plot_lr_forgetting(lr),
                 "Forgetting of the first task vs the first stage's learning rate (mean over seeds, 95% CI; dots: "
                 "seeds).")
        b.table(sec, "lr_sweep", lr[cols], "Per run: first-stage learning rate and forgetting of the first task "
                "after the last stage (F in pp, RF in %).")
    if not rp.empty:
        cols = (["experiment"] if many else []) + list(rp.columns.drop("experiment"))
        b.figure(sec, "replay", plot_replay(rp),
                 "Replay: recovery = (R[r][S] − R[r−1][S]) / (R[s_S][S] − R[r−1][S]) (% of the forgetting undone) "
                 "and capability cost = R[r−1][C] − R[r][C] (pp) vs the replay fraction f (mean over seeds, 95% CI).")
        b.table(sec, "replay_summary", replay_table(replay, None if many else exps[0].runs),
                "Replay per fraction f: recovery (fraction, 1 = all forgetting undone) and capability cost (pp), "
                "mean over seeds [95% CI]; smallest f with mean recovery ≥ 0.9 (the summary's replay table).")
        b.table(sec, "replay_runs", rp[cols], "Replay per run.")


def _training(b: _Builder, exp: _Experiment, tag: str, prefix: str) -> None:
    sec = b.section(f"Training and run metadata{tag}")
    curves = training_curves(exp.path)
    if not curves.empty:
        b.figure(sec, f"{prefix}training_curves", plot_training_curves(curves),
                 "Training loss per optimizer step (mean cross-entropy over answer tokens); stages end to end, one "
                 "line per seed.")
    cfg, env = exp.config, exp.environment
    nodes = _node_table(exp.path)
    packages = env.get("packages") or {}
    meta = {"experiment": exp.name, "run directory": str(exp.path),
            "model": cfg.get("model") or "embedded SmolLM2-135M-Instruct",
            "data dir": env.get("data_dir") or cfg.get("data_dir") or "—",
            "seeds": ", ".join(map(str, cfg.get("seeds", sorted(exp.results["seed"].unique())))),
            "training": ", ".join(f"{k}={v}" for k, v in (cfg.get("training") or {}).items()
                                  if k in ("method", "lr", "batch_size", "grad_accum", "epochs", "scheduler")),
            "git sha": env.get("git_sha") or "—", "started (UTC)": env.get("time_utc") or "—",
            "device": f"{env.get('device', '—')} ({env.get('device_name', '—')})",
            "python": env.get("python") or "—", "platform": env.get("platform") or "—",
            "versions": ", ".join(f"{k} {v}" for k, v in packages.items()) or "—"}
    if not nodes.empty:
        total = {c: float(pd.to_numeric(nodes[c], errors="coerce").sum()) for c in ("train_s", "eval_s", "curvature_s")
                 if c in nodes.columns}
        meta["wall time"] = (f"{format_seconds(sum(total.values()))} (training "
                             f"{format_seconds(total.get('train_s', 0))}, evaluation "
                             f"{format_seconds(total.get('eval_s', 0))}, curvature "
                             f"{format_seconds(total.get('curvature_s', 0))}; each shared stage counted once)")
    b.table(sec, f"{prefix}run_metadata", pd.DataFrame({"key": list(meta), "value": [str(v) for v in meta.values()]}),
            "Run metadata (experiment.yaml, environment.json, stages/*/node.json).")
    if not nodes.empty:
        b.table(sec, f"{prefix}stages", nodes, "Trained stages (shared prefixes trained once): examples, steps, "
                "tokens, seconds spent training, evaluating and measuring curvature.")
