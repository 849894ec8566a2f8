"""`chaintune verify RUN_DIR`: rebuild every stored stage's weights from its checkpoint(s), re-evaluate, and compare
with the stored accuracies.

An evaluation must be reproduced exactly (accuracies, per-group accuracies and every prediction) when it runs in the
environment it recorded — device type and name, dtype, torch version; elsewhere its accuracies must agree within
`tolerance` percentage points. Nothing is written to the run directory.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from chaintune.config import ExperimentConfig, validate_config
from chaintune.errors import ChaintuneError
from chaintune.evaluate import evaluate
from chaintune.plan import Node, build_tree, eval_spec
from chaintune.provenance import data_file_hashes, eval_environment
from chaintune.rundir import EvalRecord, RunDir
from chaintune.tasks import canonical_task_name, load_task, register_user_tasks, resolve_data_dir
from chaintune.weights import WeightCache, checkpoint_problem

EXIT_OK, EXIT_MISMATCH, EXIT_UNVERIFIABLE = 0, 1, 3
DEFAULT_TOLERANCE = 1.0  # pp, when the evaluation environment differs from the recorded one


def run_configs(out: RunDir, overrides: dict[str, Any]) -> list[tuple[str, ExperimentConfig]]:
    """(sweep point label, config) of every point stored in the run directory, pointed at it."""
    return [(label, validate_config(data | {"output_dir": str(out.root)} | overrides, str(out.root)))
            for label, data in out.point_configs()]


def _recorded_environment(stored: EvalRecord, run_env: dict[str, Any]) -> dict[str, str]:
    """The evaluation's recorded environment; runs older than the per-evaluation record fall back to
    environment.json (chaintune evaluated in float32)."""
    if stored.env is not None:
        return stored.env
    return {"device": str(run_env.get("device", "")).split(":")[0], "device_name": run_env.get("device_name"),
            "dtype": "float32", "torch": run_env.get("packages", {}).get("torch")}


def verify_evaluation(cache: WeightCache, cfg: ExperimentConfig, node: Node, stored: EvalRecord,
                      run_env: dict[str, Any], tolerance: float, progress: bool) -> dict[str, Any]:
    """Re-evaluate one stored evaluation of `node` (its weights must be loadable); one row of the verify table."""
    task = stored.task
    spec = stored.spec or eval_spec(cfg, task)
    examples = load_task(task, "test", resolve_data_dir(cfg.data_dir), limit=spec["eval_limit"],
                         seed=spec["data_seed"], split_seed=spec["split_seed"])
    model = cache.materialize(node)
    result = evaluate(model, cache.tokenizer, examples, task, progress=progress, max_tokens=cfg.eval_max_tokens)
    exact = _recorded_environment(stored, run_env) == eval_environment(model)
    old = cache.out.predictions(node.dirname, task).set_index("id")
    new = pd.DataFrame(result.predictions).set_index("id")
    same_questions = len(old) == len(new) and old.index.sort_values().equals(new.index.sort_values())
    changed = int((old.loc[new.index, ["pred", "pred_norm"]] != new[["pred", "pred_norm"]]).any(axis=1).sum()
                  ) if same_questions else None
    if not same_questions:
        ok = False
    elif exact:
        ok = changed == 0 and (result.acc, result.acc_norm, result.per_group) == (
            stored.acc, stored.acc_norm, stored.per_group)
    else:
        ok = abs(result.acc - stored.acc) <= tolerance and abs(result.acc_norm - stored.acc_norm) <= tolerance
    return {"stage": node.dirname, "task": task, "n": stored.n, "stored_acc": stored.acc, "acc": result.acc,
            "stored_acc_norm": stored.acc_norm, "acc_norm": result.acc_norm,
            "changed": changed if same_questions else "other questions",
            "check": "exact" if exact else f"±{tolerance:g} pp", "status": "ok" if ok else "MISMATCH"}


def verify_run(run_dir: str | Path, *, device: str | None = None, data_dir: str | None = None,
               tolerance: float = DEFAULT_TOLERANCE, trust_remote_code: bool = False,
               progress: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """Re-derive every stored evaluation of a run (all sweep points): the verify table and notes to print.

    A run directory may come from someone else: its config's trust_remote_code is ignored, only the argument counts.
    """
    from chaintune.models import pick_device

    if device is not None:
        pick_device(device)  # an unknown or absent device fails before anything is read
    resolve_data_dir(data_dir)
    out = RunDir(run_dir)
    overrides = {k: v for k, v in {"device": device, "data_dir": data_dir}.items() if v is not None}
    overrides["trust_remote_code"] = trust_remote_code
    register_user_tasks(out.custom_tasks())
    run_env = out.environment()
    rows: list[dict[str, Any]] = []
    changed_files: set[str] = set()
    seen: set[str] = set()
    cache: WeightCache | None = None
    for label, cfg in run_configs(out, overrides):
        if cache is None or cache.identity() != (str(out.root), cfg.model, cfg.device, cfg.trust_remote_code):
            cache = WeightCache(out, cfg.model, cfg.device, cfg.trust_remote_code)
        now = data_file_hashes(resolve_data_dir(cfg.data_dir), [canonical_task_name(t) for t in cfg.all_tasks()])
        stored = run_env.get("data_files", {})
        changed_files |= {f for f in stored.keys() & now.keys() if stored[f] != now[f]}
        for node in build_tree(cfg, label)[1]:
            if node.key in seen:
                continue
            seen.add(node.key)
            problem = checkpoint_problem(out, node, cfg.keep_checkpoints)
            for record in out.evaluations(node.dirname):
                if problem is None:
                    rows.append(verify_evaluation(cache, cfg, node, record, run_env, tolerance, progress))
                    continue
                rows.append({"stage": node.dirname, "task": record.task, "n": record.n, "stored_acc": record.acc,
                             "acc": math.nan, "stored_acc_norm": record.acc_norm, "acc_norm": math.nan,
                             "changed": "—", "check": "", "status": problem})
    if not rows:
        raise ChaintuneError(f"'{out.root}' holds no stored evaluations", "run the experiment first")
    return pd.DataFrame(rows), [f"data file {f} changed since the run (SHA-256 differs)" for f in sorted(changed_files)]


def verdict(table: pd.DataFrame) -> tuple[int, str]:
    """Exit code and one summary line: 0 all reproduced, 1 a mismatch or a corrupt/missing checkpoint, 3 some
    evaluations not checkable because their checkpoints were released (keep_checkpoints: false)."""
    failed = table[(table.status != "ok") & ~table.status.str.startswith("released")]
    released = table[table.status.str.startswith("released")]
    ok = len(table) - len(failed) - len(released)
    if len(failed):
        return EXIT_MISMATCH, (f"FAILED: {len(failed)} of {len(table)} stored evaluations were not reproduced "
                               f"({', '.join(sorted(set(failed.status)))}); {ok} reproduced")
    if len(released):
        return EXIT_UNVERIFIABLE, (f"{ok} stored evaluations reproduced; {len(released)} cannot be checked because "
                                   "their stage checkpoints were released (keep_checkpoints: false) — run with "
                                   "keep_checkpoints: true to make every stage verifiable")
    return EXIT_OK, f"verified: all {ok} stored evaluations reproduced"
