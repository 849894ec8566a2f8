"""Stage quality gates in analysis: one row per gated stage, and which runs the summaries leave out because a stage
of theirs failed its gate (chaintune.gate). Failed stages are shown, never hidden: `plan`, `summarize` and `report`
list them, and every summary says how many runs it excludes and why."""
from __future__ import annotations

from typing import Any, Iterable

import pandas as pd

from chaintune.rundir import NodeRecord

GATE_COLUMNS = ["node", "stage", "task", "seed", "n_validation", "val_acc_before", "val_acc", "gain",
                "majority_baseline", "chance_baseline", "attempts", "passed", "reasons"]


def gate_row(node: str, record: NodeRecord) -> dict[str, Any] | None:
    """The gate of one trained stage as a table row (accuracies in pp); None if it was trained without the gate."""
    gate = record.gate
    if gate is None:
        return None
    final = gate.final
    return {"node": node, "stage": record.index, "task": record.task, "seed": record.seed,
            "n_validation": gate.n_validation, "val_acc_before": final.val_acc_before, "val_acc": final.val_acc,
            "gain": final.gain, "majority_baseline": gate.majority_baseline, "chance_baseline": gate.chance_baseline,
            "attempts": len(gate.attempts), "passed": not final.failed, "reasons": "; ".join(final.reasons)}


def gate_frame(rows: Iterable[dict[str, Any] | None]) -> pd.DataFrame:
    """Gate rows (Nones dropped, one row per node) as a table sorted by stage, task and seed."""
    kept = {r["node"]: r for r in rows if r is not None}
    return pd.DataFrame(list(kept.values()), columns=GATE_COLUMNS).sort_values(["stage", "task", "seed", "node"],
                                                                              ignore_index=True)


def failure_text(row: dict[str, Any]) -> str:
    """'stage 1 (bbq, seed 2): <reasons>' for a failed gate row."""
    return f"stage {row['stage']} ({row['task']}, seed {row['seed']}): {row['reasons']}"
