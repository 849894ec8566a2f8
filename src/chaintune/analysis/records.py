"""Records → per-run data: the tidy accuracy rows, predictions and curves of a run, read from its stages' records.

The engine calls `export_run` when a run completes (it writes runs/<run>/); analysis calls `load_runs`, which reads
the same records with the same functions and never the exported files, so a run directory of any schema version
is analysed with today's definitions.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from chaintune.analysis.quality import gate_row
from chaintune.analysis.run_metrics import OVERALL, replay_metrics, replay_specs, run_metrics
from chaintune.config import ExperimentConfig, Stage, TrainingConfig
from chaintune.errors import ChaintuneError
from chaintune.rundir import RunDir, RunRecord



def _stage_name(out: RunDir, node: str) -> tuple[str, str | None]:
    """(stage label, trained task) of a node folder; ("base", None) for the base model."""
    record = out.node(node)
    if record is None:
        if node.startswith("base-"):
            return "base", None
        raise ChaintuneError(f"stage '{node}' of a run has no node.json in '{out.root}'",
                             "rerun the experiment to recompute it")
    return Stage.model_validate(record.stage).label, record.task


def run_rows(out: RunDir, run: RunRecord, eval_tasks: list[str], experiment: str) -> list[dict[str, Any]]:
    """The run's rows of the results table: one per (stage, eval task, group), with ALL for the whole task."""
    rows = []
    for index, node in enumerate(run.stages):
        name, trained = _stage_name(out, node)
        for task in eval_tasks:
            ev = out.evaluation(node, task)
            if ev is None:
                raise ChaintuneError(f"stage '{node}' has no evaluation of '{task}'", "rerun the experiment")
            common = {"experiment": experiment, "chain": run.chain, "seed": run.seed, "run_id": run.run_id,
                      "variant": run.variant, "stage": index, "stage_name": name, "trained_task": trained,
                      "eval_task": task, "node": node}
            rows.append(common | {"group": OVERALL, "n": ev.n, "acc": ev.acc, "acc_norm": ev.acc_norm})
            for group, g in ev.per_group.items():
                rows.append(common | {"group": group, "n": g["n"], "acc": g["acc"], "acc_norm": g["acc_norm"]})
    return rows


def run_predictions(out: RunDir, run: RunRecord, eval_tasks: list[str]) -> pd.DataFrame:
    return pd.concat([out.predictions(node, task).assign(stage=index, eval_task=task)
                      for index, node in enumerate(run.stages) for task in eval_tasks], ignore_index=True)


def run_curves(out: RunDir, run: RunRecord) -> pd.DataFrame | None:
    curves = []
    for index, node in enumerate(run.stages[1:], start=1):
        curve = out.train_curve(node)
        if curve is not None:
            curves.append(curve.assign(stage=index, task=_stage_name(out, node)[1]))
    return pd.concat(curves, ignore_index=True) if curves else None


def stage_settings(out: RunDir, run: RunRecord) -> list[tuple[str | None, dict[str, Any], Any]]:
    """(task, training settings without checkpoint_every, replay spec or None) of each trained stage, stage 1 first."""
    settings = []
    for node in run.stages[1:]:
        meta = out.node(node)
        training = {k: v for k, v in (meta.training if meta else {}).items() if k != "checkpoint_every"}
        settings.append((meta.task if meta else None, training, (meta.stage if meta else {}).get("replay")))
    return settings


@dataclass
class RunData:
    """Everything analysis needs of one finished run, read from the run directory's records."""

    record: RunRecord
    rows: pd.DataFrame  # the run's results rows
    predictions: pd.DataFrame
    metrics: dict[str, Any]  # run_summary(): run_metrics + curvature + replay, as in runs/<run>/metrics.json
    stage_settings: list[tuple[str | None, dict[str, Any], Any]]  # (task, training w/o checkpoint_every, replay)
    task_kinds: dict[str, str]  # eval task → safety | capability | other
    correction: str = "holm"  # multiple_comparisons of the run's config: holm | bh
    gates: list[dict[str, Any]] = field(default_factory=list)  # analysis.quality.gate_row of each gated stage

    @property
    def failed_stages(self) -> list[dict[str, Any]]:
        """Gate rows of the run's stages that failed their quality gate: the run is no finding."""
        return [g for g in self.gates if not g["passed"]]

    @property
    def chain(self) -> str:
        return self.record.chain

    @property
    def seed(self) -> int:
        return self.record.seed


def run_summary(out: RunDir, record: RunRecord, run_df: pd.DataFrame, predictions: pd.DataFrame, data_seed: int,
                min_group_size: int, metrics_by_task: dict[str, list[str]]) -> dict[str, Any]:
    """The run's metrics (analysis.run_metrics), its stages' curvature records and its replay metrics."""
    curvature = [c for c in (out.curvature(n) for n in record.stages) if c is not None]
    return run_metrics(run_df, predictions, data_seed, min_group_size, metrics_by_task) | {
        "curvature": curvature, "replay": replay_metrics(run_df, replay_specs(stage_settings(out, record)))}


class _Schema1:
    """What schema-1 records do not hold, read once per directory on first need: the user tasks' kinds (from the
    stored experiment) and each run's eval-task order (from the results table)."""

    def __init__(self, out: RunDir):
        self.out = out

    @functools.cached_property
    def user_kinds(self) -> dict[str, str]:
        return {str(spec.get("name")): spec.get("kind", "other") for spec in self.out.custom_tasks()}

    @functools.cached_property
    def task_order(self) -> dict[str, list[str]]:
        if not self.out.results_path.is_file():
            return {}
        results = self.out.results()
        return {str(r): list(dict.fromkeys(part.eval_task)) for r, part in results.groupby("run_id", sort=False)}


def task_kind(task: str, recorded: str | None, legacy: _Schema1) -> str:
    """A task's kind: as recorded with its evaluation (schema 2), else from the stored user task specs, else from
    the registry of built-in tasks."""
    if recorded:
        return recorded
    if task in legacy.user_kinds:
        return legacy.user_kinds[task]
    from chaintune.tasks import get_task

    return get_task(task).kind


def declared_metrics(task: str, recorded: list[str] | None) -> list[str]:
    """The extra metrics a task declares: as recorded with its evaluation (schema 2), else a built-in task's."""
    if recorded is not None:
        return list(recorded)
    from chaintune.tasks import builtin_task_names, get_task

    return list(get_task(task).metrics) if task in builtin_task_names() else []


def _point_settings(out: RunDir) -> dict[str, dict[str, Any]]:
    """Sweep point label → its config mapping ("" always present: the first point, or the defaults)."""
    points = dict(out.point_configs()) if out.experiment_path.is_file() else {}
    defaults = {k: ExperimentConfig.model_fields[k].default for k in ("name", "data_seed", "min_group_size")}
    return points | {"": points.get("", next(iter(points.values()), defaults))}


def _eval_tasks(out: RunDir, record: RunRecord, legacy: _Schema1) -> list[str]:
    """The tasks the run scored after every stage, in order: recorded in run.json (schema 2); for schema 1, the
    order of the run's rows in the results table, else the tasks every stage of the run holds."""
    if record.eval_tasks:
        return list(record.eval_tasks)
    if legacy.task_order.get(record.run_id):
        return legacy.task_order[record.run_id]
    held = [ev.task for ev in out.evaluations(record.stages[0])]
    return [t for t in held if all(out.eval_path(n, t).is_file() for n in record.stages)]


def load_run(out: RunDir, run_id: str, points: dict[str, dict[str, Any]], legacy: _Schema1) -> RunData:
    """One run's data, its metrics computed with today's definitions from the stages' records."""
    record = out.run(run_id)
    cfg = points.get(record.variant, points[""])
    defaults = ExperimentConfig.model_fields
    tasks = _eval_tasks(out, record, legacy)
    rows = pd.DataFrame(run_rows(out, record, tasks, str(cfg.get("name", ""))))
    last = {t: out.evaluation(record.stages[-1], t) for t in tasks}
    kinds = {t: task_kind(t, ev.kind, legacy) for t, ev in last.items()}
    metrics = {t: declared_metrics(t, ev.metrics) for t, ev in last.items()}
    settings = stage_settings(out, record)
    predictions = run_predictions(out, record, tasks)
    summary = run_summary(out, record, rows, predictions, int(cfg.get("data_seed", defaults["data_seed"].default)),
                          int(cfg.get("min_group_size", defaults["min_group_size"].default)), metrics)
    nodes = {n: out.node(n) for n in record.stages[1:]}
    gates = [row for n, meta in nodes.items() if meta is not None and (row := gate_row(n, meta)) is not None]
    return RunData(record, rows, predictions, summary, settings, kinds,
                   str(cfg.get("multiple_comparisons", defaults["multiple_comparisons"].default)), gates)


def load_runs(out: RunDir) -> list[RunData]:
    """Every finished run of the directory (a run.json), read from the records."""
    from chaintune.tasks import register_user_tasks

    register_user_tasks(out.custom_tasks())  # a fresh process knows the user tasks the experiment used
    points = _point_settings(out)
    legacy = _Schema1(out)
    runs = [load_run(out, run_id, points, legacy) for run_id in out.run_ids()]
    if not runs:
        raise ChaintuneError(f"'{out.root}' holds no finished runs (no runs/*/run.json)",
                             "pass the output_dir of a finished `chaintune run`")
    return runs


def runs_from_results(results: pd.DataFrame, experiment: dict[str, Any]) -> list[RunData]:
    """Runs rebuilt from a results table and its experiment config alone (a folder without stage records): their
    rows and stage settings (task, lr, replay from the config's chains), no predictions and no metrics. Enough for
    the tables computed from accuracies (replay and learning-rate sweep points)."""
    training = experiment.get("training") or {}
    chains = {c["name"]: c["stages"] for c in experiment.get("chains", [])}
    runs = []
    for (chain, seed), rows in results.groupby(["chain", "seed"], sort=False):
        stages = chains.get(chain, [])
        settings = [(st["task"], {"lr": st.get("lr", training.get("lr", TrainingConfig.model_fields["lr"].default))},
                     st.get("replay")) for st in stages]
        record = RunRecord(run_id=str(rows.run_id.iloc[0]) if "run_id" in rows else f"{chain}-seed{seed}", id="",
                           chain=str(chain), base_chain=str(chain), seed=int(seed),
                           stages=list(dict.fromkeys(rows.node)) if "node" in rows else [])
        runs.append(RunData(record, rows, pd.DataFrame(), {}, settings, {}))
    return runs


def export_run(out: RunDir, record: RunRecord, experiment: str, data_seed: int, min_group_size: int,
               metrics_by_task: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Write runs/<run>/ (accuracy matrix, group accuracies, predictions, curves, metrics, run.json) from the
    records; returns the run's results rows."""
    rows = run_rows(out, record, record.eval_tasks, experiment)
    run_df = pd.DataFrame(rows)
    preds = run_predictions(out, record, record.eval_tasks)
    folder = out.run_dir(record.run_id)
    overall = run_df[run_df.group == OVERALL]
    out.write_table(folder / "accuracy_matrix.csv",
                    overall.pivot(index=["stage", "stage_name"], columns="eval_task", values="acc").reset_index())
    out.write_table(folder / "group_accuracy.csv", run_df[run_df.group != OVERALL][
        ["stage", "stage_name", "eval_task", "group", "n", "acc", "acc_norm"]])
    out.write_table(folder / "predictions.parquet", preds)
    curves = run_curves(out, record)
    if curves is not None:
        out.write_table(folder / "train_curves.csv", curves)
    out.write_json(folder / "metrics.json",
                   run_summary(out, record, run_df, preds, data_seed, min_group_size, metrics_by_task))
    out.write_record(folder / "run.json", record)
    return rows
