"""The run directory: every path and every record of an experiment's `output_dir`, read and written here only.

Layout (schema_version 2; directories written by schema 1, which had no `schema_version` field, still read):
    experiment.yaml, environment.json       resolved config (first sweep point); versions, device, data hashes
    sweep/points.json                       every sweep point: label, overrides, resolved config
    sweep/failures.json, sweep/tracebacks/  jobs that failed after all retries; cleared when they later succeed
    stages/<node>/node.json                 NodeRecord: what the node is; `status: done` once checkpointed
    stages/<node>/checkpoint/               safetensors weights (full) or LoRA adapter
    stages/<node>/train_curve.csv           step, loss, lr, grad_norm, tokens, seconds (val_loss with select_best)
    stages/<node>/attempts.json             quality-gate attempts finished while the stage is still in training
    stages/<node>/eval/<task>.json          EvalRecord: acc, acc_norm, per group, the task's kind and metrics
    stages/<node>/eval/<task>.predictions.parquet   one row per question
    stages/<node>/curvature.json            CurvatureRecord
    stages/.locks/<node>.lock               per-node lock of the worker training it
    runs/<run>/run.json                     RunRecord: which nodes make the run
    runs/<run>/accuracy_matrix.csv, group_accuracy.csv, predictions.parquet, train_curves.csv, metrics.json
    results.parquet / results.csv           one tidy table of every run's accuracies
    summary/, report/                       written by `chaintune summarize` / `chaintune report`
    summary/by_<cols>/, report/by_<cols>/   the same, regrouped by metadata columns (`--group-by`)
    trackers/<tracker>/                     `logging.trackers`: TensorBoard event files (one folder per run), the
                                            MLflow file store, W&B offline runs; trackers/state.json: what each
                                            tracker has been sent (stages per run, final tables)

Every write goes through `Folder.path_for_write`, which refuses a path that leaves the resolved output directory
through a symlinked folder (`RunDir` is a `Folder`; so is a report's folder). Every read goes through a reader that
turns a malformed file into a one-line error naming it and the fix.
"""
from __future__ import annotations

import contextlib
import fcntl
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from chaintune.errors import ChaintuneError, validation_problems
from chaintune.io import atomic_path, read_json, write_json, write_table, write_text

SCHEMA_VERSION = 2


class Record(BaseModel):
    """A JSON record of the run directory; unknown keys are kept (a newer release may add some)."""

    model_config = ConfigDict(extra="allow")
    schema_version: int = 1  # records without the field were written by schema 1


class GateAttempt(BaseModel):
    """One training attempt of a stage under the quality gate (chaintune.gate); accuracies in pp."""

    model_config = ConfigDict(extra="allow")
    attempt: int  # 0-based
    train_seed: int
    val_acc: float
    val_acc_before: float  # the parent's accuracy on the same slice
    loss_first: float | None = None  # mean training loss of the first / last tenth of the steps (nats)
    loss_last: float | None = None
    diverged: bool = False
    reasons: list[str] = []  # why it failed; empty: passed

    @property
    def gain(self) -> float:
        return self.val_acc - self.val_acc_before

    @property
    def failed(self) -> bool:
        return bool(self.reasons)


class GateRecord(BaseModel):
    """The quality gate of one stage: its validation slice, the task's baselines, every attempt, the verdict."""

    model_config = ConfigDict(extra="allow")
    n_validation: int
    majority_baseline: float
    majority_rule: str  # e.g. "position 0" or "answer 'no'"
    chance_baseline: float
    min_gain: float | None  # the gain (pp) this stage had to reach (None: none, its task was trained before)
    policy: str  # flag | retry | stop
    attempts: list[GateAttempt]

    @property
    def final(self) -> GateAttempt:
        """The attempt whose weights the stage kept (the last one)."""
        return self.attempts[-1]

    @property
    def failed(self) -> bool:
        return self.final.failed


class NodeRecord(Record):
    status: str
    key: str
    index: int
    task: str
    stage: dict[str, Any]
    training: dict[str, Any]
    seed: int
    parent: str | None
    n_train_examples: int
    replayed_per_group: dict[str, int] | None = None
    steps: int
    tokens: int
    train_seconds: float
    tokens_per_second: float
    checkpoint_sha256: dict[str, str]
    gate: GateRecord | None = None  # None: trained without the quality gate (validation_size 0, or schema 1)
    best_step: int | None = None  # select_best: the step whose weights were kept
    compile_seconds: float = 0.0  # compile: true: time of the compiling warm-up pass (not in train_seconds)


class EvalRecord(Record):
    task: str
    n: int
    acc: float
    acc_norm: float
    per_group: dict[str, dict[str, Any]]
    seconds: float = 0.0
    spec: dict[str, Any] | None = None
    env: dict[str, Any] | None = None
    kind: str | None = None  # safety | capability | other (schema 1: looked up from the task registry)
    metrics: list[str] | None = None  # extra metrics the task declares, e.g. ["bbq_bias"]


class CurvatureRecord(Record):
    stage: int
    task: str
    lambda_max: float  # of the pooled subsets' Hessian (settings["estimator"] "pooled"; "split": the mean of that and
    # the held-out subsets' quotient; earlier records: the subsets' mean)
    unstable: bool = False  # λ_max's interval spans 0 or its ends differ by more than curvature.disagreement
    settings: dict[str, Any] | None = None  # CurvatureConfig.identity() that measured it (None: older records)


class RunRecord(Record):
    run_id: str
    id: str
    chain: str
    base_chain: str
    variant: str = ""
    seed: int
    stages: list[str]  # node folder names, base first
    eval_tasks: list[str] = []  # tasks scored after every stage, in order (schema 1: not recorded)


class PointRecord(Record):
    label: str
    overrides: dict[str, Any] = {}
    config: dict[str, Any]


def _by(group_by: Sequence[str]) -> str:
    """The folder name of a regrouping: by_<col>+<col>, characters unsafe in a folder name replaced by '_'."""
    return "by_" + "+".join(re.sub(r"[^A-Za-z0-9_.-]", "_", c) for c in group_by)


_FIX = "restore it from a copy, or delete it (a stage's file: that stage's folder) and rerun to recompute it"


def _readable(path: Path, read: Callable[[Path], Any]) -> Any:
    """`read(path)`; a file that cannot be read or parsed is a one-line ChaintuneError naming it."""
    try:
        return read(path)
    except (OSError, ValueError, yaml.YAMLError) as exc:  # parse errors of json, pyarrow, pandas and yaml
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ChaintuneError(f"'{path}' cannot be read ({reason[:300]})", _FIX) from None


def _parse(model: type[Record], path: Path) -> Any:
    data = _readable(path, read_json)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        loc, msg = validation_problems(exc)[0]
        raise ChaintuneError(f"'{path}' is not a valid {model.__name__} ({loc}: {msg})", _FIX) from None


def read_table(path: Path) -> pd.DataFrame:
    """A Parquet (`.parquet`) or CSV table of a run directory, or a one-line error naming the file."""
    return _readable(Path(path), pd.read_parquet if Path(path).suffix == ".parquet" else pd.read_csv)


class Folder:
    """A folder chaintune writes: `root` is resolved once, and no write leaves it (see `path_for_write`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def path_for_write(self, path: Path) -> Path:
        """`path` if writing it stays inside the folder; a symlinked folder on the way is refused."""
        path = Path(path)
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            raise ChaintuneError(f"'{path}' is outside the output directory '{self.root}'",
                                 "report this as a bug") from None
        folder = self.root
        for part in rel.parts[:-1]:
            folder = folder / part
            if folder.is_symlink():
                raise ChaintuneError(f"'{folder}' is a symlink: chaintune writes only inside '{self.root}'",
                                     "replace the link by a real folder (or write elsewhere)")
        if path.is_symlink():
            raise ChaintuneError(f"'{path}' is a symlink: chaintune writes only inside '{self.root}'",
                                 "delete the link (or write elsewhere)")
        return path

    def write_json(self, path: Path, obj: Any) -> None:
        write_json(self.path_for_write(path), obj)

    def write_table(self, path: Path, df: pd.DataFrame) -> None:
        write_table(self.path_for_write(path), df)

    def write_text(self, path: Path, text: str) -> None:
        write_text(self.path_for_write(path), text)

    def atomic(self, path: Path) -> contextlib.AbstractContextManager[Path]:
        """A temporary file that becomes `path` when the block succeeds (chaintune.io.atomic_path), inside the folder."""
        return atomic_path(self.path_for_write(path))


class RunDir(Folder):
    """One experiment's output directory. `root` is resolved once; nothing is written outside it."""

    # ------------------------------------------------------------------------------------------------ paths
    def stage_dir(self, node: str) -> Path:
        return self.root / "stages" / node

    def node_path(self, node: str) -> Path:
        return self.stage_dir(node) / "node.json"

    def checkpoint_dir(self, node: str) -> Path:
        return self.stage_dir(node) / "checkpoint"

    def eval_path(self, node: str, task: str) -> Path:
        return self.stage_dir(node) / "eval" / f"{task}.json"

    def predictions_path(self, node: str, task: str) -> Path:
        return self.stage_dir(node) / "eval" / f"{task}.predictions.parquet"

    def attempts_path(self, node: str) -> Path:
        """Gate attempts of a stage still in training (a kill between attempts resumes at the next one)."""
        return self.stage_dir(node) / "attempts.json"

    def curvature_path(self, node: str) -> Path:
        return self.stage_dir(node) / "curvature.json"

    def train_curve_path(self, node: str) -> Path:
        return self.stage_dir(node) / "train_curve.csv"

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    @property
    def results_path(self) -> Path:
        return self.root / "results.parquet"

    @property
    def environment_path(self) -> Path:
        return self.root / "environment.json"

    @property
    def experiment_path(self) -> Path:
        return self.root / "experiment.yaml"

    @property
    def points_path(self) -> Path:
        return self.root / "sweep" / "points.json"

    @property
    def failures_path(self) -> Path:
        return self.root / "sweep" / "failures.json"

    def traceback_path(self, node: str) -> Path:
        return self.root / "sweep" / "tracebacks" / f"{node}.txt"

    @property
    def summary_dir(self) -> Path:
        return self.root / "summary"

    def summary_folder(self, group_by: Sequence[str] = ()) -> Path:
        """summary/, or summary/by_<col>[+<col>…]/ for the tables regrouped by metadata columns."""
        return self.summary_dir / _by(group_by) if group_by else self.summary_dir

    def report_folder(self, group_by: Sequence[str] = ()) -> Path:
        """report/, or report/by_<col>[+<col>…]/ for the report regrouped by metadata columns."""
        return self.root / "report" / _by(group_by) if group_by else self.root / "report"

    def metrics_path(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "metrics.json"

    def tracker_dir(self, tracker: str) -> Path:
        """Where a tracker writes (TensorBoard: one folder per run below it; MLflow: the file store; W&B: its runs)."""
        return self.root / "trackers" / tracker

    @property
    def trackers_state_path(self) -> Path:
        return self.root / "trackers" / "state.json"

    # ------------------------------------------------------------------------------------------------ writers
    def write_record(self, path: Path, record: Record) -> None:
        self.write_json(path, record.model_dump() | {"schema_version": SCHEMA_VERSION})

    def write_experiment(self, config: dict[str, Any]) -> None:
        self.write_text(self.experiment_path, yaml.safe_dump(config, sort_keys=False))

    # ------------------------------------------------------------------------------------------------ readers
    def node(self, node: str) -> NodeRecord | None:
        path = self.node_path(node)
        return _parse(NodeRecord, path) if path.is_file() else None

    def node_done(self, node: str) -> bool:
        record = self.node(node)
        return record is not None and record.status == "done"

    def evaluation(self, node: str, task: str) -> EvalRecord | None:
        path = self.eval_path(node, task)
        return _parse(EvalRecord, path) if path.is_file() else None

    def predictions(self, node: str, task: str) -> pd.DataFrame:
        return read_table(self.predictions_path(node, task))

    def train_curve(self, node: str) -> pd.DataFrame | None:
        path = self.train_curve_path(node)
        return read_table(path) if path.is_file() else None

    def evaluations(self, node: str) -> list[EvalRecord]:
        """Every stored evaluation of a node, by task name."""
        return [_parse(EvalRecord, p) for p in sorted((self.stage_dir(node) / "eval").glob("*.json"))]

    def node_names(self) -> list[str]:
        """Every stage folder under stages/ (trained or not, the base model's too), sorted."""
        folder = self.root / "stages"
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if folder.is_dir() else []

    def curvature(self, node: str) -> dict[str, Any] | None:
        path = self.curvature_path(node)
        return _parse(CurvatureRecord, path).model_dump(exclude={"schema_version"}) if path.is_file() else None

    def run(self, run_id: str) -> RunRecord:
        return _parse(RunRecord, self.run_dir(run_id) / "run.json")

    def run_metrics(self, run_id: str) -> dict[str, Any] | None:
        """runs/<run>/metrics.json (written when the run completed), or None before that."""
        path = self.metrics_path(run_id)
        return self._mapping(path, read_json) if path.is_file() else None

    def trackers_state(self) -> dict[str, Any]:
        path = self.trackers_state_path
        return self._mapping(path, read_json) if path.is_file() else {}

    def run_ids(self) -> list[str]:
        """Every run with a run.json, sorted."""
        return sorted(p.parent.name for p in (self.root / "runs").glob("*/run.json"))

    def withdraw_run(self, run_id: str) -> None:
        """Mark a run not complete (its run.json goes; the tables beside it are rewritten when it completes again):
        a stage of it is being retrained, so its stored results no longer stand."""
        path = self.run_dir(run_id) / "run.json"
        if path.is_file():
            self.path_for_write(path).unlink()

    def has_results(self) -> bool:
        """True once a job has stored a result here: a trained stage (node.json) or an evaluation."""
        stages = self.root / "stages"
        return stages.is_dir() and (any(stages.glob("*/node.json")) or any(stages.glob("*/eval/*.json")))

    def _mapping(self, path: Path, read: Callable[[Path], Any]) -> dict[str, Any]:
        data = _readable(path, read)
        if not isinstance(data, dict):
            raise ChaintuneError(f"'{path}' does not hold a mapping", _FIX)
        return data

    def environment(self) -> dict[str, Any]:
        return self._mapping(self.environment_path, read_json) if self.environment_path.is_file() else {}

    def experiment(self) -> dict[str, Any]:
        """The stored experiment config (experiment.yaml), as a mapping."""
        if not self.experiment_path.is_file():
            raise ChaintuneError(f"'{self.root}' is not a chaintune run directory (no experiment.yaml)",
                                 "pass the output_dir of a `chaintune run`")
        return self._mapping(self.experiment_path, lambda p: yaml.safe_load(p.read_text(encoding="utf-8")))

    def point_configs(self) -> list[tuple[str, dict[str, Any]]]:
        """(sweep point label, config mapping) of every point of the stored experiment."""
        if not self.points_path.is_file():
            return [("", self.experiment())]
        points = _readable(self.points_path, read_json)
        try:
            return [(p.label, p.config) for p in map(PointRecord.model_validate, points)]
        except (TypeError, ValidationError):
            raise ChaintuneError(f"'{self.points_path}' is not a list of sweep points", _FIX) from None

    def custom_tasks(self) -> list[dict[str, Any]]:
        """Every user task spec the experiment used (over all sweep points, first definition of a name wins)."""
        specs: dict[str, dict[str, Any]] = {}
        for _, data in self.point_configs() if self.experiment_path.is_file() else []:
            for spec in data.get("custom_tasks") or []:
                specs.setdefault(str(spec.get("name")), spec)
        return list(specs.values())

    def failures(self) -> dict[str, dict[str, Any]]:
        return self._mapping(self.failures_path, read_json) if self.failures_path.is_file() else {}

    def results(self) -> pd.DataFrame:
        """results.parquet (or, where only that was kept, results.csv)."""
        for path in (self.results_path, self.root / "results.csv"):
            if path.is_file():
                return read_table(path)
        raise ChaintuneError(f"'{self.root}' has no results table (results.parquet)",
                             "run the experiment to completion first")

    # ------------------------------------------------------------------------------------------------ locks
    @contextlib.contextmanager
    def node_lock(self, node: str) -> Iterator[None]:
        """An exclusive lock per node (released by the OS if the holder dies): a stale worker of a killed driver
        and a new one never train the same node at once."""
        path = self.path_for_write(self.root / "stages" / ".locks" / f"{node}.lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def check_outside_data(target: str | Path, data_dir: Path | None, data_files: Sequence[str] = (), *,
                       what: str = "output_dir", folder: bool = True) -> None:
    """Data is never written: an output folder may not equal, contain or sit inside the data directory, nor hold a
    user data file; an output file may not lie in the data directory nor be a user data file."""
    path = Path(target).expanduser().resolve()
    if data_dir is not None:
        data = data_dir.resolve()
        if path == data or data in path.parents or (folder and path in data.parents):
            raise ChaintuneError(f"{what} '{path}' overlaps the data directory '{data}'",
                                 f"choose a {what} outside the data directory (data is never written)")
    for name in data_files:
        file = Path(name)
        if file.is_absolute() and (path in file.resolve().parents if folder else path == file.resolve()):
            raise ChaintuneError(f"{what} '{path}' {'holds' if folder else 'is'} the user data file '{file}'",
                                 f"choose a {what} that does not {'contain' if folder else 'overwrite'} your data files")
