"""The golden sweep of the one-engine redesign (issue 18): both orders × 2 seeds × a replay stage × 2 second-stage
learning rates × curvature after stage 1, on the tiny random Llama and the real BBQ / ARC-Easy data.

`python tests/golden/sweep.py make` ran this sweep with the code of a04ca30 (before the redesign; it then called
that release's `run_sweep`, today it calls `chaintune.run`) and wrote
tests/golden/expected/ (results table, summary tables, findings) and tests/fixtures/rundir_v1/ (the whole output
directory without checkpoints: the on-disk format of that release). tests/test_golden.py reruns the same sweep with
today's code and compares.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
EXPECTED = HERE / "expected"
RUNDIR_V1 = HERE.parent / "fixtures" / "rundir_v1"
# columns of the results table that name paths or hashes of this machine (the tiny model's temp folder): not compared
VOLATILE = ["node"]


def golden_config(out: Path, model_dir: Path, data_dir: Path) -> dict:
    lr2 = [1e-2, 3e-3]
    return {
        "name": "golden", "model": str(model_dir), "data_dir": str(data_dir), "output_dir": str(out),
        "seeds": [0, 1], "keep_checkpoints": False, "min_group_size": 2, "eval_max_tokens": 256,
        "tasks": {"bbq": {"train_limit": 16, "eval_limit": 36}, "arc_easy": {"train_limit": 16, "eval_limit": 12}},
        "training": {"lr": 1e-2, "batch_size": 4},
        "curvature": {"after": ["first"], "examples": 4, "micro_batch": 4, "max_iter": 8, "subsets": 1},
        # what a04ca30 did, pinned where later releases changed a default: no held-out validation slice (issue 25)
        "quality_gate": {"validation_size": 0},
        "chains": [
            {"name": "bbq_arc", "stages": [{"task": "bbq"}, {"task": "arc_easy"}]},
            {"name": "arc_bbq", "stages": [{"task": "arc_easy"}, {"task": "bbq"}]},
            {"name": "bbq_arc_replay", "stages": [{"task": "bbq"}, {"task": "arc_easy"},
                                                  {"task": "arc_easy", "replay": {"task": "bbq", "fraction": 0.25}}]},
        ],
        "sweep": {"zip": [{"chains.0.stages.1.lr": lr2, "chains.1.stages.1.lr": lr2, "chains.2.stages.1.lr": lr2}]},
    }


def tables_of(out: Path) -> dict[str, pd.DataFrame]:
    """What is compared: the results table (sorted, volatile columns dropped) and every summary table."""
    from chaintune.analysis import summary_tables

    results = pd.read_parquet(out / "results.parquet").drop(columns=VOLATILE)
    keys = ["run_id", "stage", "eval_task", "group"]
    tables = {"results": results.sort_values(keys).reset_index(drop=True)}
    tables |= {f"summary_{k}": v.reset_index(drop=True) for k, v in summary_tables(out).items()}
    return tables


def make(work: Path) -> None:
    sys.path.insert(0, str(HERE.parent.parent / "src"))
    import chaintune
    from chaintune.analysis import findings, load_runs
    from chaintune.models import tiny_llama
    from chaintune.rundir import RunDir

    model_dir = work / "tiny"
    model, tokenizer = tiny_llama(seed=0)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = work / "out"
    data = (HERE.parent.parent.parent / "shared" / "data").resolve()
    outcome = chaintune.run(golden_config(out, model_dir, data), progress=False)
    assert not outcome.failed and not outcome.incomplete_runs
    shutil.rmtree(EXPECTED, ignore_errors=True)
    EXPECTED.mkdir(parents=True)
    for name, df in tables_of(out).items():
        df.to_json(EXPECTED / f"{name}.json", orient="split", double_precision=15, index=False)
    (EXPECTED / "findings.json").write_text(json.dumps(findings(load_runs(RunDir(out))), indent=1, ensure_ascii=False) + "\n")
    shutil.rmtree(RUNDIR_V1, ignore_errors=True)
    shutil.copytree(out, RUNDIR_V1, ignore=shutil.ignore_patterns("checkpoint", ".locks", "summary"))


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["make"]:
        sys.exit("usage: python tests/golden/sweep.py make")
    with tempfile.TemporaryDirectory() as tmp:
        make(Path(tmp))
