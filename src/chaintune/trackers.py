"""Experiment trackers (`logging.trackers`): TensorBoard, MLflow and W&B receive what the run directory records.

One tracker run per chaintune run (chain × seed × sweep point), named by its run id (`ab-seed0-lr0.001`) and tagged
with its chain, seed and sweep point. It receives, stage by stage, the training curve (loss, lr, grad norm,
tokens/s, validation loss; x-axis: the run's optimizer step counted across its stages), every evaluation
(accuracy, acc_norm, per group; x-axis: the stage, 0 = base model), the quality gate and curvature, and, once the
run is complete, its forgetting tables.

The engine calls `Trackers.sync` in the driver process after each finished job and once at the end. Logging reads
the stored records, never the training loop: it works alike whatever process or machine ran the job (the
executors' workers import no tracker), a killed run logs nothing twice (trackers/state.json holds how many stages
each tracker run has received) and a tracker added to a finished run receives all of it. A tracker's failure is
a warning; the records are intact and the next `chaintune run` sends what is missing.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import pandas as pd

from chaintune.config import LoggingConfig, Stage, config_hash
from chaintune.errors import ChaintuneError
from chaintune.plan import Plan, Run
from chaintune.rundir import RunDir
from chaintune.stage import job_done

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # tracker → module it needs
STEP, STAGE = "step", "stage"  # x-axes: the run's optimizer step across its stages; the stage index (0 = base)
FINAL_TABLES = ("learning_gain", "forgetting", "group_forgetting", "biased_forgetting", "bbq_bias", "replay",
                "curvature")

Rows = list[tuple[int, dict[str, float]]]  # (x, {metric: value}) pairs


def check_installed(cfg: LoggingConfig) -> None:
    """Every requested tracker's package is importable (checked at preflight, before any training)."""
    for tracker in cfg.trackers:
        if importlib.util.find_spec(PACKAGES[tracker]) is None:
            raise ChaintuneError(f"the {tracker} tracker needs the package '{PACKAGES[tracker]}', which is not "
                                 "installed", "pip install 'chaintune[trackers]' (or drop the tracker from "
                                 "logging.trackers / --tracker)")


def metric_key(*parts: Any) -> str:
    """A metric name every tracker accepts: parts joined by '/', other characters than [A-Za-z0-9_.-] become '_'."""
    return "/".join(re.sub(r"[^A-Za-z0-9_.\-]", "_", str(p)) for p in parts)


def _finite(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TrackerRun(Protocol):
    """One open tracker run."""

    def params(self, values: dict[str, Any]) -> None: ...
    def log(self, axis: str, rows: Rows) -> None: ...
    def table(self, name: str, df: pd.DataFrame) -> None: ...
    def close(self, finished: bool) -> None: ...


class TensorBoardRun:
    """Event files in trackers/tensorboard/<run>/ (one more file per sync; readers merge them)."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def params(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            self.writer.add_text(metric_key("params", key), str(value))

    def log(self, axis: str, rows: Rows) -> None:
        for x, metrics in rows:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, x)

    def table(self, name: str, df: pd.DataFrame) -> None:
        self.writer.add_text(metric_key("tables", name), df.to_markdown(index=False))

    def close(self, finished: bool) -> None:
        self.writer.close()


class MlflowRun:
    """A run of an MLflow tracking store (by default a file store in trackers/mlflow/: no server)."""

    BATCH = 1000  # MLflow's limit of metrics per log_batch call

    def __init__(self, uri: str, experiment: str, name: str, tags: dict[str, str], run_id: str | None):
        from mlflow.tracking import MlflowClient

        if uri.startswith("file:"):  # MLflow >= 3.8 refuses its file store (in maintenance mode) unless allowed
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            run_id = self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        self.id = run_id

    def params(self, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(key, str(value)[:6000]) for key, value in values.items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.id, params=params[i:i + 100])

    def log(self, axis: str, rows: Rows) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, x) for x, values in rows for key, value in values.items()]
        for i in range(0, len(metrics), self.BATCH):
            self.client.log_batch(self.id, metrics=metrics[i:i + self.BATCH])

    def table(self, name: str, df: pd.DataFrame) -> None:
        self.client.log_text(self.id, df.to_csv(index=False), f"tables/{name}.csv")

    def close(self, finished: bool) -> None:
        if finished:
            self.client.set_terminated(self.id)


class WandbRun:
    """A W&B run (offline by default: trackers/wandb/wandb/offline-run-*, upload later with `wandb sync`)."""

    def __init__(self, folder: Path, project: str, mode: str, run_key: str, name: str, group: str,
                 tags: dict[str, str]):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=project, id=run_key, name=name, group=group, tags=[f"{k}:{v}"[:64] for k, v in
                              tags.items()], dir=str(folder), mode=mode, resume="allow", reinit="create_new",
                              settings=wandb.Settings(silent=True, console="off"))
        self.run.define_metric("train/step")
        self.run.define_metric("train/*", step_metric="train/step")
        self.run.define_metric(STAGE)
        for prefix in ("eval", "gate", "curvature", "final"):
            self.run.define_metric(f"{prefix}/*", step_metric=STAGE)

    def params(self, values: dict[str, Any]) -> None:
        self.run.config.update(values, allow_val_change=True)

    def log(self, axis: str, rows: Rows) -> None:
        for x, metrics in rows:
            self.run.log(metrics | {"train/step" if axis == STEP else STAGE: x})

    def table(self, name: str, df: pd.DataFrame) -> None:
        self.run.log({metric_key("tables", name): self.wandb.Table(dataframe=df.astype(str))})

    def close(self, finished: bool) -> None:
        self.run.finish()


# ------------------------------------------------------------------------------------------------ what is logged
def stage_params(out: RunDir, node: str, index: int) -> dict[str, Any]:
    """A trained stage's task, data and hyper-parameters as flat `stage<i>.<key>` parameters."""
    record = out.node(node)
    if record is None:
        return {}
    training = {f"lora.{k}": v for k, v in record.training.get("lora", {}).items()} | {
        k: v for k, v in record.training.items() if k != "lora"}
    values = {"task": record.task, "name": Stage.model_validate(record.stage).label, "seed": record.seed,
              "n_train_examples": record.n_train_examples, "replay": record.stage.get("replay"), **training}
    return {f"stage{index}.{k}": v for k, v in values.items()}


def curve_rows(curve: pd.DataFrame, offset: int) -> Rows:
    """Per-step loss, lr, grad norm, tokens/s (tokens of the step / its seconds) and validation loss, at the run's
    step (`offset` = the optimizer steps of the run's earlier stages)."""
    tokens_per_second = curve.tokens.diff().fillna(curve.tokens) / curve.seconds.diff().fillna(curve.seconds)
    rows = []
    for row, tps in zip(curve.to_dict("records"), tokens_per_second):
        values = {"loss": row["loss"], "lr": row["lr"], "grad_norm": row["grad_norm"], "tokens_per_second": tps,
                  "val_loss": row.get("val_loss"), "epoch": row["epoch"]}
        rows.append((offset + int(row["step"]), {metric_key("train", k): v for k, v in _finite(values).items()}))
    return rows


def stage_metrics(out: RunDir, node: str, eval_tasks: tuple[str, ...]) -> dict[str, float]:
    """A stage's evaluations (overall and per group), its quality gate and its curvature, as scalars."""
    values: dict[str, Any] = {}
    for task in eval_tasks:
        ev = out.evaluation(node, task)
        if ev is None:
            continue
        values |= {metric_key("eval", task, "acc"): ev.acc, metric_key("eval", task, "acc_norm"): ev.acc_norm}
        values |= {metric_key("eval", task, "group", g, "acc"): v.get("acc") for g, v in ev.per_group.items()}
    record = out.node(node)
    if record is not None and record.gate is not None:
        final = record.gate.final
        values |= {"gate/val_acc": final.val_acc, "gate/val_acc_before": final.val_acc_before,
                   "gate/passed": float(not record.gate.failed)}
    curvature = out.curvature(node) or {}
    values |= {metric_key("curvature", k): curvature.get(k) for k in ("lambda_max", "lambda_max_ci_low",
                                                                     "lambda_max_ci_high", "trace")}
    return _finite(values)


def final_metrics(metrics: dict[str, Any]) -> tuple[dict[str, float], dict[str, pd.DataFrame]]:
    """A complete run's forgetting scalars (F, RF, BF_* per task, learning gains) and its tables (metrics.json)."""
    scalars: dict[str, Any] = {}
    for row in metrics.get("forgetting", []):
        scalars |= {metric_key("final", "forgetting", row["task"], k): row.get(k) for k in ("F", "RF")}
    for row in metrics.get("biased_forgetting", []):
        scalars |= {metric_key("final", "biased_forgetting", row["task"], k): row.get(k)
                    for k in ("BF_max", "BF_spread", "BF_std")}
    for row in metrics.get("learning_gain", []):
        scalars[metric_key("final", "learning_gain", f"s{row['stage']}", row["task"])] = row.get("gain")
    tables = {name: pd.DataFrame(metrics[name]) for name in FINAL_TABLES if metrics.get(name)}
    if metrics.get("accuracy_matrix"):
        tables["accuracy_matrix"] = pd.DataFrame(metrics["accuracy_matrix"]).rename_axis("stage").reset_index()
    return _finite(scalars), tables


# ------------------------------------------------------------------------------------------------ the driver's side
class Trackers:
    """The configured trackers of one experiment, fed from its run directory (see the module docstring)."""

    def __init__(self, cfg: LoggingConfig, out: RunDir, plan: Plan, echo: Callable[[str], None] = print):
        self.cfg, self.out, self.plan, self.echo = cfg, out, plan, echo
        self.experiment = plan.points[0].cfg.name
        self.state = out.trackers_state()

    def sync(self, node_key: str | None = None) -> None:
        """Send every tracker what it lacks of the runs through `node_key` (all runs when None)."""
        for point, run in self.plan.runs:
            if node_key is not None and all(n.key != node_key for n in run.nodes):
                continue
            done = self._done_stages(point, run)
            metrics = self.out.run_metrics(run.run_id) if done == len(run.nodes) else None
            for tracker in self.cfg.trackers:
                state = self.state.setdefault(tracker, {}).setdefault(run.run_id, {"stages": 0, "final": False})
                final = metrics is not None and not state["final"]
                if state["stages"] >= done and not final:
                    continue
                try:
                    self._send(tracker, point, run, state, done, metrics if final else None)
                except Exception as exc:  # noqa: BLE001 — a tracker never stops the experiment; records are intact
                    self.echo(f"  [yellow]warning: the {tracker} tracker failed on {run.run_id} ({type(exc).__name__}:"
                              f" {(str(exc).splitlines() or [''])[0][:200]}); rerun to send what is missing[/]")
                finally:  # the stages sent before a failure are not sent again
                    self.out.write_json(self.out.trackers_state_path, self.state)

    def _done_stages(self, point: int, run: Run) -> int:
        """How many of the run's nodes (base first) are done, counted from the base up to the first that is not."""
        for i, node in enumerate(run.nodes):
            if not job_done(self.out, self.plan.jobs[self.plan.job_for(point, node.key)]):
                return i
        return len(run.nodes)

    def _send(self, tracker: str, point: int, run: Run, state: dict[str, Any], done: int,
              metrics: dict[str, Any] | None) -> None:
        handle = self._open(tracker, point, run, state)
        try:
            if state["stages"] == 0:
                overrides = {f"sweep.{k}": v for k, v in self.plan.points[point].overrides.items()}
                handle.params({"experiment": self.experiment, "chain": run.chain, "seed": run.seed,
                               "model": self.plan.points[point].cfg.model or "embedded", **overrides})
            offset = sum(self.out.node(n.dirname).steps for n in run.nodes[1:state["stages"]])
            for index in range(state["stages"], done):
                node = run.nodes[index].dirname
                if index > 0:
                    handle.params(stage_params(self.out, node, index))
                    curve = self.out.train_curve(node)
                    if curve is not None and not curve.empty:
                        handle.log(STEP, curve_rows(curve, offset))
                    offset += self.out.node(node).steps
                handle.log(STAGE, [(index, stage_metrics(self.out, node, run.eval_tasks))])
                state["stages"] = index + 1
            if metrics is not None:
                scalars, tables = final_metrics(metrics)
                handle.log(STAGE, [(len(run.nodes) - 1, scalars)])
                for name, df in tables.items():
                    handle.table(name, df)
                state["final"] = True
        finally:
            handle.close(finished=state["final"])

    def _open(self, tracker: str, point: int, run: Run, state: dict[str, Any]) -> TrackerRun:
        tags = {"chaintune.run_id": run.run_id, "chain": run.chain, "seed": str(run.seed),
                "sweep_point": self.plan.points[point].label}
        folder = self.out.path_for_write(self.out.tracker_dir(tracker))
        folder.mkdir(parents=True, exist_ok=True)
        if tracker == "tensorboard":
            return TensorBoardRun(self.out.path_for_write(folder / run.run_id))
        if tracker == "mlflow":
            handle = MlflowRun(self.cfg.mlflow_tracking_uri or folder.as_uri(), self.experiment, run.run_id, tags,
                               state.get("id"))
            state["id"] = handle.id
            return handle
        return WandbRun(folder, self.cfg.wandb_project or self.experiment, self.cfg.wandb_mode,
                        config_hash([str(self.out.root), run.run_id]), run.run_id, run.display_chain, tags)
