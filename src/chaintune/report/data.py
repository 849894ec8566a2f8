"""The report's data: reading an experiment directory, and preparing the frames its figures and sections need
from the tidy results table, experiment.yaml, runs/*/ and stages/*/."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from chaintune.analysis import RunData, load_runs, summary_tables
from chaintune.analysis.records import runs_from_results
from chaintune.analysis.tables import overall_rows
from chaintune.errors import ChaintuneError
from chaintune.rundir import RunDir, read_table


# -------------------------------------------------------------------------------------------- reading a run directory
def _experiment_dirs(run_dir: Path) -> list[Path]:
    if not run_dir.is_dir():
        raise ChaintuneError(f"run directory '{run_dir}' does not exist", "pass the output_dir of a `chaintune run`")
    if (run_dir / "results.parquet").is_file() or (run_dir / "results.csv").is_file():
        return [run_dir]
    subs = sorted({p.parent for pat in ("*/results.parquet", "*/results.csv") for p in run_dir.glob(pat)})
    if not subs:
        raise ChaintuneError(f"'{run_dir}' holds no results (no results.parquet, nor sub-folders with one)",
                             "pass the output_dir of a finished `chaintune run`, or a folder of several")
    return subs




@dataclass
class _Experiment:
    path: Path
    name: str
    results: pd.DataFrame
    config: dict[str, Any]
    environment: dict[str, Any]
    tables: dict[str, pd.DataFrame]
    runs: list[RunData]


def _run_chains(out: RunDir, runs: list[RunData]) -> list[dict[str, Any]]:
    """Each chain as it appears in the results (with its sweep point), its stages read back from the trained nodes:
    task, replay and the resolved lr. This also covers sweeps, where experiment.yaml holds only the first point."""
    chains: dict[str, dict[str, Any]] = {}
    for run in runs:
        records = [out.node(n) for n in run.record.stages[1:]]
        if run.chain in chains or not records or any(r is None for r in records):
            continue
        chains[run.chain] = {"name": run.chain, "stages": [r.stage | {"lr": r.training["lr"]} for r in records]}
    return list(chains.values())


def _load(exp_dir: Path) -> _Experiment:
    out = RunDir(exp_dir)
    config = out.experiment() if out.experiment_path.is_file() else {}
    results = out.results()
    if out.run_ids():  # analysed from the records, as `chaintune summarize` does (a corrupt record is an error)
        runs = load_runs(out)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tables = summary_tables(runs)
    else:  # results without run records: only the sections computed from accuracies
        runs, tables = runs_from_results(results, config), {}
    config["chains"] = _run_chains(out, runs) or config.get("chains", [])
    return _Experiment(exp_dir, str(config.get("name") or exp_dir.name), results, config, out.environment(), tables,
                       runs)


def training_curves(run_dir: str | Path) -> pd.DataFrame:
    """All runs' training curves (runs/*/train_curves.csv) with chain and seed columns added."""
    out, frames = RunDir(run_dir), []
    for run_id in out.run_ids():
        path = out.run_dir(run_id) / "train_curves.csv"
        if path.is_file():
            run = out.run(run_id)
            frames.append(read_table(path).assign(chain=run.chain, seed=run.seed))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _eval_seconds(out: RunDir, node: str) -> float:
    return sum(ev.seconds for ev in out.evaluations(node))


def _node_table(exp_dir: Path) -> pd.DataFrame:
    """One row per trained stage (and the base model): examples, steps, tokens, and train/eval/curvature seconds."""
    out, rows = RunDir(exp_dir), []
    folders = out.node_names()
    for name in folders:
        meta = out.node(name)
        if meta is None:
            continue
        curvature = out.curvature(name)
        rows.append({"node": name, "task": meta.task, "seed": meta.seed, "method": meta.training.get("method"),
                     "lr": meta.training.get("lr"), "examples": meta.n_train_examples, "steps": meta.steps,
                     "tokens": meta.tokens, "train_s": meta.train_seconds, "tokens_per_s": meta.tokens_per_second,
                     "eval_s": _eval_seconds(out, name), "curvature_s": curvature.get("seconds") if curvature else None})
    base_eval = sum(_eval_seconds(out, n) for n in folders if n.startswith("base"))
    if rows or base_eval:
        rows.insert(0, {"node": "base", "task": None, "seed": None, "eval_s": base_eval})
    return pd.DataFrame(rows)


# -------------------------------------------------------------------------------------------- frames from the results
def chain_tasks(results: pd.DataFrame) -> dict[str, list[str]]:
    """Each chain's trained task per stage (stage 1 first), from the tidy results table."""
    trained = overall_rows(results)
    trained = trained[trained["stage"] > 0].drop_duplicates(["chain", "stage"]).sort_values("stage", kind="stable")
    out: dict[str, list[str]] = {c: [] for c in dict.fromkeys(results["chain"])}
    for chain, part in trained.groupby("chain", sort=False):
        out[chain] = [str(t) for t in part["trained_task"]]
    return out


def accuracy_matrices(results: pd.DataFrame, value: str = "acc") -> dict[str, pd.DataFrame]:
    """Per chain, R[s][t] averaged over seeds: index 'stage: stage name' (0 = base), columns evaluated tasks (pp)."""
    overall = overall_rows(results)
    out = {}
    for chain in dict.fromkeys(overall["chain"]):
        part = overall[overall["chain"] == chain]
        R = part.pivot_table(index=["stage", "stage_name"], columns="eval_task", values=value, aggfunc="mean")
        R = R.sort_index(level="stage")[list(dict.fromkeys(part["eval_task"]))]
        R.index = [f"{s}: {name}" for s, name in R.index]
        R.index.name = "stage"
        R.columns.name = None
        out[str(chain)] = R
    return out
