"""What `chaintune plan` prints: every run's state, stage counts with and without prefix reuse, failed jobs, the
stages that failed their quality gate, and a time estimate from the throughput measured on the experiment's finished stages."""
from __future__ import annotations

import math
from typing import Any

import pandas as pd

from chaintune.analysis.quality import gate_frame, gate_row
from chaintune.plan import JobId, Plan, Point, make_plan, run_identity
from chaintune.rundir import RunDir
from chaintune.stage import job_done, stage_examples
from chaintune.engine import register_tasks
from chaintune.tasks import load_eval_set


def plan_status(points: list[Point], tokens_per_second: float | None = None) -> dict[str, Any]:
    """Every run with its state (done / partial / pending / failed), the job counts and the time estimate."""
    register_tasks(points)
    plan = make_plan(points)
    out = RunDir(plan.out)
    failures = out.failures()
    pending = {k for k, j in plan.jobs.items() if not job_done(out, j)}
    rows = []
    for i, run in plan.runs:
        keys = plan.run_jobs(i, run)
        done = sum(k not in pending for k in keys)
        errors = [failures[str(k)]["error"] for k in keys if str(k) in failures and k in pending]
        state = "done" if done == len(keys) else ("failed" if errors else ("partial" if done else "pending"))
        rows.append({"run": run.run_id, "variant": run.variant, "stages": " → ".join(n.stage.label for n in run.nodes[1:]),
                     "jobs_done": f"{done}/{len(keys)}", "state": state, "error": errors[0] if errors else "",
                     "id": run_identity(plan.points[i].cfg, run)})
    trained = plan.trained_nodes
    records = {n.dirname: out.node(n.dirname) for n in trained}
    gates = gate_frame(gate_row(name, r) for name, r in records.items() if r is not None and r.status == "done")
    return {"stage_gate": gates, "runs": pd.DataFrame(rows), "n_runs": len(plan.runs), "n_points": len(points),
            "stages_planned": len(trained), "stages_without_reuse": plan.stages_without_reuse,
            "stages_done": sum(out.node_done(n.dirname) for n in trained), "jobs": len(plan.jobs),
            "jobs_pending": len(pending), "failed": {k: v for k, v in failures.items() if JobId(*_parse_id(k)) in pending},
            "estimate_seconds": estimate_seconds(plan, out, pending, tokens_per_second)}


def _parse_id(key: str) -> tuple[str, int | None]:
    """The inverse of str(JobId) for keys of sweep/failures.json."""
    node, _, point = key.partition("@")
    return node, int(point) if point else None


def estimate_seconds(plan: Plan, out: RunDir, pending: set[JobId], tokens_per_second: float | None) -> float | None:
    """Remaining seconds: training tokens / measured tokens·s⁻¹ plus questions × measured seconds per question.
    Tokens per example come from finished stages of the same task (else the mean over tasks). None if nothing
    was measured yet and no `tokens_per_second` was given."""
    tok_per_ex: dict[str, list[float]] = {}
    rates: list[float] = []
    eval_rate: list[tuple[float, int]] = []
    for job in plan.jobs.values():
        name = job.node.dirname
        record = out.node(name) if job.node.stage is not None else None
        if record is not None and record.status == "done" and record.tokens:
            seen = record.steps * record.training["batch_size"] * record.training["grad_accum"]
            tok_per_ex.setdefault(record.task, []).append(record.tokens / max(seen, 1))
            rates.append(record.tokens_per_second)
        for ev in out.evaluations(name):
            eval_rate.append((ev.seconds, ev.n))
    rate = tokens_per_second or (sum(rates) / len(rates) if rates else None)
    if rate is None:
        return None
    fallback = [v for vs in tok_per_ex.values() for v in vs]
    mean_tok = sum(fallback) / len(fallback) if fallback else 100.0
    seconds_per_question = (sum(s for s, _ in eval_rate) / max(sum(n for _, n in eval_rate), 1)) if eval_rate else 0.0
    total = 0.0
    for key in pending:
        job = plan.jobs[key]
        if job.node.stage is not None and key.point is None:
            t = job.node.training
            n = len(stage_examples(job.settings, job.node.stage, job.node.seed, group_forgetting={}))  # the count only
            examples = t.max_steps * t.batch_size * t.grad_accum if t.max_steps else math.ceil(n * t.epochs)
            per_ex = tok_per_ex.get(job.node.stage.task)
            total += examples * (sum(per_ex) / len(per_ex) if per_ex else mean_tok) / rate
        for spec in job.evals:
            if not out.eval_path(job.node.dirname, spec["task"]).is_file():
                total += len(load_eval_set(spec, job.settings.data_dir)) * seconds_per_question
    return total
