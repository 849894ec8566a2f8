"""The one driver: `run(experiment)` schedules a plan's jobs on an executor — dependencies, retries, failures,
checkpoint release — then writes every complete run's folder and the results table. A config without `sweep:` is a
one-point sweep; the CLI, the Python API, verify and the tests all come through here.
"""
from __future__ import annotations

import functools
import shutil
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd
from rich.markup import escape

from chaintune.analysis.records import export_run
from chaintune.config import ExperimentConfig
from chaintune.errors import ChaintuneError
from chaintune.plan import Job, JobId, Plan, Point, Settings, as_points, eval_spec, make_plan, run_identity
from chaintune.provenance import data_file_hashes, environment
from chaintune.io import probe_writable
from chaintune.rundir import RunDir, RunRecord, check_outside_data
from chaintune.stage import execute, job_done, stage_examples
from chaintune.tasks import canonical_task_name, get_task, load_eval_set, register_user_tasks, resolve_data_dir
from chaintune.trackers import Trackers, check_installed
from chaintune.weights import checkpoint_ok


@dataclass
class Outcome:
    results: pd.DataFrame
    completed_runs: list[str]
    failed: dict[str, dict[str, Any]]  # job id → {node, point, attempts, error}
    incomplete_runs: list[str]
    jobs_run: int
    plan: Plan = field(repr=False)


def register_tasks(points: list[Point]) -> None:
    """Register every point's user tasks (configs validate without touching the registry)."""
    for point in points:
        register_user_tasks(point.cfg.custom_tasks)


def check_models(points: list[Point]) -> None:
    """Every point's device exists here and its model can be found (a local folder with a config, a .gguf file, or a
    hub id that is cached or reachable): a wrong path or device fails before any job, and is never retried."""
    from chaintune.models import pick_device, resolve_model_path

    for model, device in dict.fromkeys((p.cfg.model, p.cfg.device) for p in points):
        pick_device(device)
        resolve_model_path(model)


def preflight(point: Point) -> None:
    """Load every stage's training data and every evaluation set: missing splits fail before any training."""
    cfg = point.cfg
    settings = Settings.of(cfg)
    for stage in {s.model_dump_json(): s for c in cfg.chains for s in c.stages}.values():
        stage_examples(settings, stage, cfg.seeds[0], group_forgetting={})  # data only: any weights
    for task in cfg.evaluation_tasks():
        load_eval_set(eval_spec(cfg, task), cfg.data_dir)


def prepare_output(points: list[Point]) -> RunDir:
    """Check the output directory, the models and devices, load all data (nothing is written if that fails), then
    record the experiment and the data hashes that later resumes must match.

    The data hashes bind a directory only once it holds a result (a trained stage or an evaluation): a start that
    failed before any job finished — a malformed record, an empty split, a wrong model path — leaves nothing that a
    rerun on corrected data must match."""
    cfg = points[0].cfg
    out = RunDir(cfg.output_dir)
    data_dir = resolve_data_dir(cfg.data_dir)
    tasks = [canonical_task_name(t) for p in points for t in p.cfg.all_tasks()]
    check_outside_data(out.root, data_dir, [f for t in tasks for f in get_task(t).data_files])
    probe_writable(out.root, "output_dir", "choose a writable output_dir (--set output_dir=...)")
    hashes = data_file_hashes(data_dir, list(dict.fromkeys(tasks)))
    before = out.environment().get("data_files", {}) if out.has_results() else {}
    changed = sorted(f for f in before.keys() & hashes.keys() if before[f] != hashes[f])
    if changed:
        raise ChaintuneError(f"data file(s) {', '.join(changed)} changed since {out.root} was started",
                             "use a new output_dir (resuming would mix results of both versions), or restore them")
    check_models(points)
    check_installed(cfg.logging)
    for point in points:
        preflight(point)
    from chaintune.models import pick_device

    out.write_experiment(cfg.model_dump(mode="json"))
    out.write_json(out.environment_path, environment(pick_device(cfg.device)) | {
        "data_dir": str(data_dir) if data_dir else None, "data_files": hashes})
    out.write_json(out.points_path, [{"label": p.label, "overrides": p.overrides, "config": p.cfg.model_dump(mode="json")}
                                     for p in points])
    return out


def pending_jobs(plan: Plan, out: RunDir) -> set[JobId]:
    """Jobs not done yet, plus trained nodes whose checkpoint fails its checksum (or was released) while a child
    still needs it — and so on up the lineage: children come after their parents in `plan.jobs`, so one pass in
    reverse adds a parent whose child was added for the same reason."""
    pending = {k for k, j in plan.jobs.items() if not job_done(out, j)}
    for key, job in reversed(plan.jobs.items()):
        if key in pending or job.node.stage is None or key.point is not None:
            continue
        if any(JobId(c) in pending for c in plan.children.get(job.node.key, ())) and not checkpoint_ok(out, job.node):
            pending.add(key)  # training retrains a corrupt or missing checkpoint
    return pending


def _error_line(exc: BaseException) -> str:
    """One line naming the error; a worker process that died without a Python error (SIGKILL: most often the
    kernel's out-of-memory killer) says so and what lowers the memory."""
    if isinstance(exc, BrokenProcessPool):
        return ("a worker process died without an error (killed: most often out of memory, see `dmesg`); use fewer "
                "--workers, or lower curvature.micro_batch / curvature.graph_budget / training.batch_size")
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def permanent(exc: BaseException) -> bool:
    """An error caused by the input (a ChaintuneError: bad data, model, device, diverging loss...) fails the same
    way again: it is not retried. Crashes, out-of-memory and killed workers are."""
    return isinstance(exc, ChaintuneError)


def run(experiment: ExperimentConfig | dict[str, Any] | list[Point], executor=None, echo: Callable[[str], None] = print,
        progress: bool = True) -> Outcome:
    """Run (or resume) an experiment: every pending job on `executor` (default: from the config's `executor:`),
    retrying a failed job up to `executor.retries` times; then write every complete run and the results table."""
    from chaintune.executors import make_executor

    points = as_points(experiment)
    register_tasks(points)
    plan = make_plan(points)
    out = prepare_output(points)
    own = executor is None
    executor = make_executor(points[0].cfg.executor, points[0].cfg.ranks_per_job()) if own else executor
    trackers = Trackers(points[0].cfg.logging, out, plan, echo) if points[0].cfg.logging.trackers else None
    try:
        failed, jobs_run = _schedule(plan, out, executor, echo, progress, trackers)
    finally:
        if own:
            executor.shutdown()
    outcome = _write_outcome(plan, out, failed, jobs_run)
    if trackers is not None:
        trackers.sync()  # the complete runs' forgetting tables, and whatever an earlier run did not send
    return outcome


def _schedule(plan: Plan, out: RunDir, executor, echo: Callable[[str], None], progress: bool,
              trackers: Trackers | None = None) -> tuple[dict[str, dict[str, Any]], int]:
    failed: dict[str, dict[str, Any]] = {}
    stored_failures = out.failures()
    pending = pending_jobs(plan, out)
    order = {k: i for i, k in enumerate(plan.jobs)}
    attempts = {k: 0 for k in pending}
    running: dict[Future, JobId] = {}
    jobs_run, total = 0, len(pending)
    work = functools.partial(execute, progress=progress and executor.inline)  # bars only in this process
    echo(f"{len(plan.runs)} runs, {len(plan.jobs)} stage jobs ({len(pending)} to do) on {executor.describe()}")

    def fail(key: JobId, error: str) -> None:
        job = plan.jobs[key]
        failed[str(key)] = {"node": job.node.dirname, "point": plan.points[job.point].label,
                            "attempts": attempts.get(key, 0), "error": error}
        stored_failures[str(key)] = failed[str(key)]
        out.write_json(out.failures_path, stored_failures)

    while pending or running:
        busy = set(running.values())
        for key in sorted(pending, key=order.__getitem__):
            job = plan.jobs[key]
            if any(str(d) in failed for d in job.deps):
                pending.discard(key)
                fail(key, f"not run: a stage it depends on failed ({', '.join(str(d) for d in job.deps if str(d) in failed)})")
            elif not any(d in pending or d in busy for d in job.deps) and executor.has_capacity(len(running)):
                pending.discard(key)
                stopped = gate_stop(out, job)
                if stopped:
                    fail(key, stopped)
                    echo(f"  [yellow]{escape(stopped)}[/]")
                    continue
                running[executor.submit(work, job)] = key
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
                    out.write_text(out.traceback_path(job.node.dirname), "".join(traceback.format_exception(exc)))
                if attempts[key] <= executor.retries and not permanent(exc):
                    echo(f"  job {job.node.dirname} failed ({escape(error)}); retry {attempts[key]}/{executor.retries}")
                    executor.recover()
                    pending.add(key)
                else:
                    fail(key, error)
                    echo(f"  [red]job {job.node.dirname} failed after {attempts[key]} attempt(s)[/]: {escape(error)}")
                continue
            jobs_run += 1
            if stored_failures.pop(str(key), None) is not None:
                out.write_json(out.failures_path, stored_failures)
            label = plan.points[job.point].label
            echo(f"  ({jobs_run}/{total}) {job.node.dirname}{' (' + label + ')' if label else ''}"
                 f" done in {info['seconds']:.0f}s")
            if trackers is not None:
                trackers.sync(job.node.key)
            release_checkpoints(plan, out, job, pending | set(running.values()))
    return failed, jobs_run


def gate_stop(out: RunDir, job: Job) -> str | None:
    """Why `job` must not run: an earlier stage of its lineage failed its quality gate under `on_failed_stage:
    stop`; None if nothing stops it."""
    for node in job.node.lineage()[1:-1]:
        record = out.node(node.dirname)
        if record is not None and record.gate is not None and record.gate.failed and record.gate.policy == "stop":
            return (f"not run: stage {node.dirname} failed its quality gate ({'; '.join(record.gate.final.reasons)})"
                    " and on_failed_stage is stop")
    return None


def release_checkpoints(plan: Plan, out: RunDir, job: Job, unfinished: set[JobId]) -> None:
    """With keep_checkpoints: false, delete a node's checkpoint once it and every job below it are done (the nodes
    below a LoRA stage read its adapter, not only its children)."""
    def finished(node_key: str) -> bool:
        return not (set(plan.jobs_on(node_key)) & unfinished) and all(finished(c) for c in plan.children.get(node_key, ()))

    for node in job.node.lineage():  # every ancestor: a grandparent is finished only when its last grandchild is
        if node.stage is None or plan.points[job.point].cfg.keep_checkpoints:
            continue
        if finished(node.key):
            shutil.rmtree(out.path_for_write(out.checkpoint_dir(node.dirname)), ignore_errors=True)


def _write_outcome(plan: Plan, out: RunDir, failed: dict[str, dict[str, Any]], jobs_run: int) -> Outcome:
    rows, complete, incomplete = [], [], []
    for i, run_ in plan.runs:
        if not all(job_done(out, plan.jobs[k]) for k in plan.run_jobs(i, run_)):
            incomplete.append(run_.run_id)
            out.withdraw_run(run_.run_id)  # e.g. a stage of it is being retrained: its stored results no longer stand
            continue
        cfg = plan.points[i].cfg
        record = RunRecord(run_id=run_.run_id, id=run_identity(cfg, run_), chain=run_.display_chain,
                           base_chain=run_.chain, variant=run_.variant, seed=run_.seed,
                           stages=[n.dirname for n in run_.nodes], eval_tasks=list(run_.eval_tasks))
        declared = {t: list(get_task(t).metrics) for t in run_.eval_tasks}
        rows += [r | dict(plan.points[i].overrides)
                 for r in export_run(out, record, cfg.name, cfg.data_seed, cfg.min_group_size, declared)]
        complete.append(run_.run_id)
    results = pd.DataFrame(rows)
    if not results.empty:
        out.write_table(out.results_path, results)
        out.write_table(out.root / "results.csv", results)
    return Outcome(results, complete, failed, incomplete, jobs_run, plan)


