"""Sweeps: grid expansion over config keys, one plan of stage jobs across every sweep point (a shared prefix —
same model, task, data, hyper-parameters and seed — is trained once), scheduling on an executor with retries,
and one results table.

A job is one node of the stage tree: train it (unless it is the base model), evaluate it, measure its curvature
if asked. A job starts when its parent's job is done, so different chains branch from one checkpoint. A config
without `sweep:` is a sweep of one point; its layout is the same (see chaintune.chain).

Extra files in `output_dir`:
    sweep/points.json      every sweep point: label and the overrides that define it
    sweep/failures.json    jobs that failed after all retries (error, attempts); cleared when they later succeed
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import itertools
import json
import math
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
from rich.markup import escape

from chaintune.chain import (ChainRunner, Node, Run, build_plan, eval_spec, node_complete, node_trained, run_identity,
                             write_run)
from chaintune.config import ExperimentConfig, config_hash, read_config, set_path, validate_config
from chaintune.errors import ChaintuneError
from chaintune.io import read_json, write_json, write_table, write_text


@dataclass(frozen=True)
class Point:
    label: str  # e.g. "lr=1e-05,fraction=0.05"; "" without a sweep
    overrides: dict[str, Any]
    cfg: ExperimentConfig


def _short_names(keys: list[str]) -> dict[str, str]:
    """Shortest unique dotted suffix of each key: training.lr → lr, chains.0.stages.1.lr vs training.lr → both longer."""
    for depth in range(1, max((k.count(".") + 1 for k in keys), default=1) + 1):
        names = {k: ".".join(k.split(".")[-depth:]) for k in keys}
        if len(set(names.values())) == len(keys):
            return names
    return {k: k for k in keys}


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), sort_keys=True)


def expand_sweep(data: dict[str, Any], source: str = "config") -> list[Point]:
    """Every point of the config's `sweep:` grid as a validated config (one point, label "", without a sweep)."""
    top = validate_config(data, source)
    if top.sweep is None:
        return [Point("", {}, top)]
    axes = [[{key: v} for v in values] for key, values in top.sweep.product.items()]
    axes += [[{key: values[i] for key, values in group.items()} for i in range(len(next(iter(group.values()))))]
             for group in top.sweep.zip]
    # a zip group whose lists are all equal (e.g. the same lr for two chains) is labelled by its first key only
    shown = list(top.sweep.product) + [k for g in top.sweep.zip
                                       for k in (list(g)[:1] if all(v == next(iter(g.values())) for v in g.values())
                                                 else list(g))]
    names = _short_names(shown)
    base = {k: v for k, v in data.items() if k != "sweep"}
    points = []
    for combo in itertools.product(*axes):
        assignment = {k: v for part in combo for k, v in part.items()}
        point = copy.deepcopy(base)
        for key, value in assignment.items():
            set_path(point, key.split("."), copy.deepcopy(value), f"sweep key '{key}'")
        label = ",".join(f"{names[k]}={_fmt_value(v)}" for k, v in assignment.items() if k in names)
        points.append(Point(label, assignment, validate_config(point, f"{source} [sweep point {label}]")))
    return points


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> list[Point]:
    """Read an experiment YAML (with `--set` overrides) and expand its sweep."""
    return expand_sweep(read_config(path, overrides), str(path))


# ------------------------------------------------------------------------------------------------------- plan
@dataclass
class Job:
    """Train (unless base), evaluate and measure one node for one sweep point's settings."""

    key: str  # the node key; `<node key>@<point>` for a second job on a node another point also evaluates
    node: Node
    point: int
    deps: list[str]


@dataclass
class SweepPlan:
    points: list[Point]
    out: Path
    runs: list[tuple[int, Run]]  # (point index, run)
    jobs: dict[str, Job]  # in an order where every job comes after its dependencies
    children: dict[str, set[str]] = field(default_factory=dict)  # node key → child node keys (all points)

    @property
    def trained_nodes(self) -> list[Node]:
        return [j.node for j in self.jobs.values() if j.node.stage is not None and "@" not in j.key]

    @property
    def stages_without_reuse(self) -> int:
        return sum(len(run.nodes) - 1 for _, run in self.runs)

    def node_dir(self, node: Node) -> Path:
        return self.out / "stages" / node.dirname

    def run_jobs(self, point: int, run: Run) -> list[str]:
        """The jobs whose completion makes this run's results complete."""
        return [self.job_for(point, n.key) for n in run.nodes]

    def job_for(self, point: int, node_key: str) -> str:
        own = f"{node_key}@{point}"
        return own if own in self.jobs else node_key


def _job_signature(cfg: ExperimentConfig, node: Node) -> str:
    curv = cfg.curvature is not None and node.stage is not None and cfg.curvature.wants(node.index, node.stage)
    return config_hash({"eval": [eval_spec(cfg, t) for t in node.eval_tasks],
                        "curvature": cfg.curvature.model_dump() if curv else None})


def plan_sweep(points: list[Point]) -> SweepPlan:
    """Merge every point's stage tree: nodes with equal keys become one job; a point that evaluates a shared node
    differently (other eval tasks or limits, curvature) gets an extra job on it that runs after the node is trained."""
    out = Path(points[0].cfg.output_dir)
    runs: list[tuple[int, Run]] = []
    jobs: dict[str, Job] = {}
    signatures: dict[str, set[str]] = {}
    children: dict[str, set[str]] = {}
    for i, point in enumerate(points):
        base, point_runs, nodes = build_plan(point.cfg, point.label)
        runs += [(i, r) for r in point_runs]
        for node in [base, *nodes]:
            sig = _job_signature(point.cfg, node)
            if node.key not in jobs:
                deps = [node.parent.key] if node.parent is not None and node.parent.stage is not None else []
                jobs[node.key] = Job(node.key, node, i, deps)
                signatures[node.key] = {sig}
            elif sig not in signatures[node.key]:
                signatures[node.key].add(sig)
                jobs[f"{node.key}@{i}"] = Job(f"{node.key}@{i}", node, i, [node.key])
            if node.parent is not None:
                children.setdefault(node.parent.key, set()).add(node.key)
    return SweepPlan(points, out, runs, jobs, children)


def job_done(plan: SweepPlan, job: Job) -> bool:
    """Cheap check from the files (see chaintune.chain.node_complete); raises if a stored evaluation used other
    settings."""
    return node_complete(plan.points[job.point].cfg, plan.node_dir(job.node), job.node)


def pending_jobs(plan: SweepPlan) -> set[str]:
    """Jobs not done yet, plus trained nodes whose checkpoint fails its checksum while a child still needs it."""
    pending = {k for k, j in plan.jobs.items() if not job_done(plan, j)}
    runner_by_point: dict[int, ChainRunner] = {}
    for key, job in plan.jobs.items():
        if key in pending or job.node.stage is None or "@" in key:
            continue
        if any(c in pending for c in plan.children.get(job.node.key, ())):
            runner = runner_by_point.setdefault(job.point, ChainRunner(plan.points[job.point].cfg, progress=False))
            if not runner.checkpoint_ok(job.node):
                pending.add(key)  # train_node retrains a corrupt or missing checkpoint
    return pending


# ------------------------------------------------------------------------------------------------------- jobs
_WORKER: dict[str, Any] = {}  # per process: the last ChainRunner, so consecutive jobs reuse the loaded model


@contextlib.contextmanager
def node_lock(out: Path, node: Node) -> Iterator[None]:
    """An exclusive lock per node (released by the OS if the holder dies): a stale worker of a killed driver and
    a new one never train the same node at once."""
    folder = out / "stages" / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{node.dirname}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def execute_job(cfg_data: dict[str, Any], label: str, node_key: str, progress: bool = False) -> dict[str, Any]:
    """Run one job (in any process): train the node if needed, evaluate it, measure its curvature if asked."""
    ident = config_hash(cfg_data) + label
    previous: ChainRunner | None = _WORKER.get("runner")
    if previous is None or _WORKER.get("ident") != ident:
        cfg = validate_config(cfg_data)
        runner = ChainRunner(cfg, progress=progress, echo=functools.partial(print, flush=True), variant=label)
        # keep the loaded weights and tokenizer; node keys name weights only within one output_dir
        if previous is not None and previous.cfg.model == cfg.model and previous.out == runner.out:
            runner.model, runner.tokenizer, runner.loaded_key = previous.model, previous.tokenizer, previous.loaded_key
        _WORKER.update(runner=runner, ident=ident)
    runner = _WORKER["runner"]
    runner.progress = progress
    node = runner.node_by_key[node_key]
    started = time.perf_counter()
    with node_lock(runner.out, node):
        if node.stage is not None:
            runner.train_node(node)
        runner.evaluate_node(node)
        runner.curvature_node(node)
    return {"seconds": time.perf_counter() - started}


# ------------------------------------------------------------------------------------------------------ driver
@dataclass
class SweepOutcome:
    results: pd.DataFrame
    completed_runs: list[str]
    failed: dict[str, dict[str, Any]]  # job key → {node, point, attempts, error}
    incomplete_runs: list[str]
    jobs_run: int


def _error_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


def failures_path(out: Path) -> Path:
    return out / "sweep" / "failures.json"


def run_sweep(points: list[Point], executor, echo: Callable[[str], None] = print, progress: bool = True) -> SweepOutcome:
    """Run every pending job of the sweep on `executor` (see chaintune.executors), retrying failed jobs up to
    `executor.retries` times; then write every complete run's folder and the sweep's results table."""
    plan = plan_sweep(points)
    first = ChainRunner(points[0].cfg, progress=False, echo=echo)
    first.prepare_output()
    for point in points:
        (first if point is points[0] else ChainRunner(point.cfg, progress=False)).preflight()
    write_json(plan.out / "sweep" / "points.json",
               [{"label": p.label, "overrides": p.overrides, "config": p.cfg.model_dump(mode="json")} for p in points])
    failed: dict[str, dict[str, Any]] = {}
    stored_failures = read_json(failures_path(plan.out)) if failures_path(plan.out).is_file() else {}
    pending = pending_jobs(plan)
    attempts = {k: 0 for k in pending}
    running: dict[Future, str] = {}
    jobs_run = 0
    total = len(pending)
    echo(f"{len(plan.runs)} runs, {len(plan.jobs)} stage jobs ({len(pending)} to do) on {executor.describe()}")

    def fail(key: str, error: str) -> None:
        job = plan.jobs[key]
        failed[key] = {"node": job.node.dirname, "point": plan.points[job.point].label, "attempts": attempts.get(key, 0),
                       "error": error}
        stored_failures[key] = failed[key]
        write_json(failures_path(plan.out), stored_failures)

    while pending or running:
        busy = set(running.values())
        for key in sorted(pending, key=list(plan.jobs).index):
            job = plan.jobs[key]
            if any(d in failed for d in job.deps):
                pending.discard(key)
                fail(key, f"not run: a stage it depends on failed ({', '.join(d for d in job.deps if d in failed)})")
            elif not any(d in pending or d in busy for d in job.deps) and executor.has_capacity(len(running)):
                pending.discard(key)
                cfg = plan.points[job.point].cfg
                running[executor.submit(cfg.model_dump(mode="json"), plan.points[job.point].label, job.node.key,
                                        progress and executor.inline)] = key
                busy.add(key)
        if not running:
            if pending:  # cannot happen with a well-formed plan; never spin
                raise ChaintuneError(f"{len(pending)} jobs have unmet dependencies", "report this as a bug")
            break
        done, _ = wait(list(running), return_when=FIRST_COMPLETED)
        for future in done:
            key = running.pop(future)
            job = plan.jobs[key]
            try:
                info = future.result()
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 — a crashed job (error, OOM, killed worker) is retried
                attempts[key] = attempts.get(key, 0) + 1
                error = _error_line(exc)
                if not isinstance(exc, ChaintuneError):
                    write_text(plan.out / "sweep" / "tracebacks" / f"{job.node.dirname}.txt",
                               "".join(traceback.format_exception(exc)))
                if attempts[key] <= executor.retries:
                    echo(f"  job {job.node.dirname} failed ({escape(error)}); retry {attempts[key]}/{executor.retries}")
                    executor.recover()
                    pending.add(key)
                else:
                    fail(key, error)
                    echo(f"  [red]job {job.node.dirname} failed after {attempts[key]} attempt(s)[/]: {escape(error)}")
                continue
            jobs_run += 1
            if stored_failures.pop(key, None) is not None:
                write_json(failures_path(plan.out), stored_failures)
            echo(f"  ({jobs_run}/{total}) {job.node.dirname}"
                 f"{' (' + plan.points[job.point].label + ')' if plan.points[job.point].label else ''}"
                 f" done in {info['seconds']:.0f}s")
            release_checkpoints(plan, job, pending | set(running.values()))
    return _write_outcome(plan, failed, jobs_run)


def release_checkpoints(plan: SweepPlan, job: Job, unfinished: set[str]) -> None:
    """With keep_checkpoints: false, delete a node's checkpoint once it and every job below it are done."""
    import shutil

    def finished(node_key: str) -> bool:
        own = [k for k in plan.jobs if k == node_key or k.startswith(node_key + "@")]
        return not (set(own) & unfinished) and all(finished(c) for c in plan.children.get(node_key, ()))

    for node in job.node.lineage():  # every ancestor: a grandparent is finished only when its last grandchild is
        if node.stage is None or plan.points[job.point].cfg.keep_checkpoints:
            continue
        if finished(node.key):
            shutil.rmtree(plan.node_dir(node) / "checkpoint", ignore_errors=True)


def _write_outcome(plan: SweepPlan, failed: dict[str, dict[str, Any]], jobs_run: int) -> SweepOutcome:
    rows, complete, incomplete = [], [], []
    for i, run in plan.runs:
        if all(job_done(plan, plan.jobs[k]) for k in plan.run_jobs(i, run)):
            rows += [r | dict(plan.points[i].overrides) for r in
                     write_run(plan.points[i].cfg, plan.out, run, plan.node_dir)]
            complete.append(run.run_id)
        else:
            incomplete.append(run.run_id)
    results = pd.DataFrame(rows)
    if not results.empty:
        write_table(plan.out / "results.parquet", results)
        write_table(plan.out / "results.csv", results)
    return SweepOutcome(results, complete, failed, incomplete, jobs_run)


# ------------------------------------------------------------------------------------------------------- status
def plan_status(points: list[Point], tokens_per_second: float | None = None) -> dict[str, Any]:
    """What `chaintune plan` prints: every run with its state, stage counts with and without prefix reuse, failed
    jobs with their errors, and a time estimate from the throughput measured on this sweep's finished stages."""
    plan = plan_sweep(points)
    failures = read_json(failures_path(plan.out)) if failures_path(plan.out).is_file() else {}
    pending = {k for k, j in plan.jobs.items() if not job_done(plan, j)}
    rows = []
    for i, run in plan.runs:
        keys = plan.run_jobs(i, run)
        done = sum(k not in pending for k in keys)
        errors = [failures[k]["error"] for k in keys if k in failures and k in pending]
        state = "done" if done == len(keys) else ("failed" if errors else ("partial" if done else "pending"))
        rows.append({"run": run.run_id, "variant": run.variant, "stages": " → ".join(n.stage.label for n in run.nodes[1:]),
                     "jobs_done": f"{done}/{len(keys)}", "state": state, "error": errors[0] if errors else "",
                     "id": run_identity(plan.points[i].cfg, run)})
    trained = plan.trained_nodes
    estimate = estimate_seconds(plan, pending, tokens_per_second)
    return {"runs": pd.DataFrame(rows), "n_runs": len(plan.runs), "n_points": len(points),
            "stages_planned": len(trained), "stages_without_reuse": plan.stages_without_reuse,
            "stages_done": sum(node_trained(plan.node_dir(n), n) for n in trained), "jobs": len(plan.jobs),
            "jobs_pending": len(pending), "failed": {k: v for k, v in failures.items() if k in pending},
            "estimate_seconds": estimate}


def estimate_seconds(plan: SweepPlan, pending: set[str], tokens_per_second: float | None) -> float | None:
    """Remaining seconds: training tokens / measured tokens·s⁻¹ plus questions × measured seconds per question.
    Tokens per example come from finished stages of the same task (else the mean over tasks). None if nothing
    was measured yet and no `tokens_per_second` was given."""
    from chaintune.chain import stage_examples
    from chaintune.tasks import load_task, resolve_data_dir

    tok_per_ex: dict[str, list[float]] = {}
    rates: list[float] = []
    eval_rate: list[tuple[float, int]] = []
    for job in plan.jobs.values():
        folder = plan.node_dir(job.node)
        if job.node.stage is not None and (folder / "node.json").is_file():
            meta = read_json(folder / "node.json")
            if meta.get("status") == "done" and meta.get("tokens"):
                seen = meta["steps"] * meta["training"]["batch_size"] * meta["training"]["grad_accum"]
                tok_per_ex.setdefault(meta["task"], []).append(meta["tokens"] / max(seen, 1))
                rates.append(meta["tokens_per_second"])
        for path in (folder / "eval").glob("*.json") if (folder / "eval").is_dir() else []:
            summary = read_json(path)
            eval_rate.append((float(summary.get("seconds", 0.0)), int(summary.get("n", 0))))
    rate = tokens_per_second or (sum(rates) / len(rates) if rates else None)
    if rate is None:
        return None
    fallback = [v for vs in tok_per_ex.values() for v in vs]
    mean_tok = sum(fallback) / len(fallback) if fallback else 100.0
    seconds_per_question = (sum(s for s, _ in eval_rate) / max(sum(n for _, n in eval_rate), 1)) if eval_rate else 0.0
    total = 0.0
    for key in pending:
        job = plan.jobs[key]
        cfg = plan.points[job.point].cfg
        if job.node.stage is not None and "@" not in key:
            t = job.node.training
            n = len(stage_examples(cfg, job.node.stage, job.node.seed, group_forgetting={}))  # the count only
            examples = t.max_steps * t.batch_size * t.grad_accum if t.max_steps else math.ceil(n * t.epochs)
            per_ex = tok_per_ex.get(job.node.stage.task)
            total += examples * (sum(per_ex) / len(per_ex) if per_ex else mean_tok) / rate
        for task in job.node.eval_tasks:
            if not (plan.node_dir(job.node) / "eval" / f"{task}.json").is_file():
                total += len(load_task(task, "test", resolve_data_dir(cfg.data_dir),
                                       limit=cfg.task_settings(task).eval_limit, seed=cfg.data_seed,
                                       split_seed=cfg.split_seed)) * seconds_per_question
    return total
