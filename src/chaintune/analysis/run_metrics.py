"""Metrics of one run (SPEC.md §5) from its tidy accuracy rows and per-example predictions: learning gain,
forgetting with paired-bootstrap intervals, per-group and biased forgetting, k-stage forgetting, BWT, the metrics a
task declares (`bbq_bias`), replay recovery and cost. The engine freezes them into runs/<run>/metrics.json; analysis
recomputes them from the same records with the same functions."""
from __future__ import annotations

import math
import warnings
from typing import Any

import pandas as pd

from chaintune import metrics as M

OVERALL = "ALL"  # `group` value of whole-task rows in the results table

def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in df.to_dict(orient="records")]


def run_metrics(run_df: pd.DataFrame, predictions: pd.DataFrame, data_seed: int, min_group_size: int,
                metrics_by_task: dict[str, list[str]]) -> dict[str, Any]:
    """Metrics of one run (SPEC.md §5) from its tidy accuracy rows and per-example predictions.

    `run_df`: rows (stage, trained_task, eval_task, group, n, acc) for one chain × seed; stage 0 = base.
    `data_seed` seeds the bootstraps; groups under `min_group_size` questions are flagged, not ranked;
    `metrics_by_task`: the extra metrics each evaluated task declares (e.g. {"bbq": ["bbq_bias"]}).
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
            boot = M.paired_bootstrap(before.correct.to_numpy(), after.correct.to_numpy(), seed=data_seed)
            out["forgetting"].append({"task": task, "trained_stage": s, "after_stage": K, "F": f, "RF": rf,
                                      "F_ci_low": boot.ci_low, "F_ci_high": boot.ci_high})
            groups = run_df[(run_df.eval_task == task) & (run_df.group != OVERALL)]
            if groups.empty:
                continue
            g_before = groups[groups.stage == s].set_index("group")
            g_after = groups[groups.stage == K].set_index("group")
            bf = M.biased_forgetting(M.group_forgetting(g_before.acc, g_after.acc), f, g_before.n, min_group_size)
            gboot = M.paired_bootstrap_groups(before.correct.to_numpy(), after.correct.to_numpy(),
                                              before.group.to_numpy(), seed=data_seed)
            table = bf.table.join(gboot[["ci_low", "ci_high", "p_value", "bf_ci_low", "bf_ci_high",
                                          "bf_p_value"]]).reset_index()
            out["group_forgetting"] += _records(table.assign(task=task, trained_stage=s, after_stage=K))
            out["biased_forgetting"].append({"task": task, "trained_stage": s, "after_stage": K, "BF_max": bf.bf_max,
                                             "BF_spread": bf.bf_spread, "BF_std": bf.bf_std, "n_groups": bf.n_groups,
                                             "note": bf.note})
        if K > 2:
            first = {t: s for s, t in sorted(trained.items(), reverse=True) if t in evaluated}
            out["k_stage_forgetting"] = M.k_stage_forgetting(R, first).to_dict()
            out["bwt"] = M.backward_transfer(R, first)
        bbq_tasks = sorted(t for t in evaluated if "bbq_bias" in metrics_by_task.get(t, ()))
        if bbq_tasks:
            out["bbq_bias"] = []
            for task in bbq_tasks:
                for s in R.index:
                    p = predictions[(predictions.eval_task == task) & (predictions.stage == s)]
                    scores = M.bbq_bias_scores(p)
                    out["bbq_bias"] += _records(scores.table.reset_index().assign(task=task, stage=int(s)))
    out["warnings"] += [str(w.message) for w in caught]
    out["accuracy_matrix"] = {str(t): {int(s): v for s, v in R[t].items()} for t in R.columns}
    return out


def replay_specs(stage_settings: list[tuple[str | None, dict[str, Any], Any]]) -> list[dict[str, Any]]:
    """[{stage, task, replay_task, fraction}] of the replay stages among a run's (task, training, replay) stages."""
    return [{"stage": s, "task": task, "replay_task": replay["task"], "fraction": replay["fraction"]}
            for s, (task, _, replay) in enumerate(stage_settings, start=1) if replay]


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
            rows.append({"stage": s, "trained_stage": s_S, "task": C, "replay_task": S, "fraction": r["fraction"],
                         "group": g,
                         "recovery": rec, "capability_cost": cost if g == OVERALL else math.nan,
                         "forgotten": acc[(s_S, S, g)] - acc[(s - 1, S, g)]})
    return _records(pd.DataFrame(rows)) if rows else []
