"""Seed × question intervals for the summary tables, from the runs' stored per-question predictions.

Every statistic of a run is written as per-question pseudo-values (`chaintune.stats.linearize`) over that run's
test questions; the runs of a table row become a seeds × questions matrix, and `chaintune.stats.crossed` gives the
interval. Runs with the same seed label are one seed (chains that share a trained first stage are not independent).
Where that cannot be done (one seed, no stored predictions, seeds that answered different questions) the row keeps a
fallback, and its `ci_method` says which.
"""
from __future__ import annotations

import math
from typing import Callable, Hashable, Iterable, Sequence

import numpy as np
import pandas as pd

from chaintune import stats as st
from chaintune.analysis.records import RunData

CROSSED = "seed×question t (Satterthwaite)"
BOOTSTRAP = "paired bootstrap over questions (1 seed)"
T_OVER_SEEDS = "t over seeds"
WELCH = "Welch t over seeds"
NO_INTERVAL = "none (fewer than 2 seeds)"
SIGNIFICANCE = 0.05  # level of the corrected "interval excludes 0" flags


class Questions:
    """Per-question correctness of runs: (run, task, stage) → Series indexed by question id (0/1 floats), read
    once from each run's predictions."""

    def __init__(self) -> None:
        self._cache: dict[int, dict[tuple[str, int], pd.DataFrame]] = {}
        self._aligned: dict[tuple, tuple[tuple, list[np.ndarray]] | None] = {}
        self._codes: dict[tuple, tuple[np.ndarray, list]] = {}

    def _frames(self, run: RunData) -> dict[tuple[str, int], pd.DataFrame]:
        key = id(run)
        if key not in self._cache:
            p = run.predictions
            frames = {}
            if not p.empty and {"id", "correct", "stage", "eval_task"} <= set(p.columns):
                for (task, stage), part in p.groupby(["eval_task", "stage"], sort=False):
                    frames[(str(task), int(stage))] = part.set_index("id")
            self._cache[key] = frames
        return self._cache[key]

    def correct(self, run: RunData, task: str, stage: int) -> pd.Series | None:
        frame = self._frames(run).get((task, int(stage)))
        return None if frame is None else frame["correct"].astype(float)

    def codes(self, run: RunData, task: str, stage: int, ids: tuple) -> tuple[np.ndarray, list]:
        """(group index of each question in `ids`, −1 for none; the group labels, sorted) as scored at `stage`."""
        key = (id(run), task, int(stage), ids)
        if key not in self._codes:
            frame = self._frames(run).get((task, int(stage)))
            if frame is None or "group" not in frame.columns:
                self._codes[key] = np.full(len(ids), -1), []
            else:
                codes, uniques = pd.factorize(frame["group"].reindex(list(ids)), sort=True)
                self._codes[key] = codes, list(uniques)
        return self._codes[key]

    def stages(self, run: RunData, task: str, stages: Sequence[int]) -> tuple[tuple, list[np.ndarray]] | None:
        """(question ids, correctness of each stage in that order) of the questions every stage scored; None when
        a stage has no predictions or the stages scored different questions."""
        key = (id(run), task, tuple(int(s) for s in stages))
        if key not in self._aligned:
            series = [self.correct(run, task, s) for s in stages]
            ids = None if any(s is None for s in series) else series[0].index
            if ids is None or ids.has_duplicates or any(set(s.index) != set(ids) for s in series[1:]):
                self._aligned[key] = None
            else:
                self._aligned[key] = tuple(ids), [s.reindex(ids).to_numpy() for s in series]
        return self._aligned[key]


def _difference(q: Questions, run: RunData, task: str, first: int,
                second: int) -> tuple[tuple, np.ndarray, np.ndarray] | None:
    """(question ids, correctness at `first`, d = 100 · (correct at `first` − at `second`) in pp) of `task`."""
    got = q.stages(run, task, [first, second])
    if got is None:
        return None
    ids, (a, b) = got
    return ids, a, 100.0 * (a - b)


def forgetting_values(q: Questions, run: RunData, task: str, trained: int, after: int,
                      statistic: str) -> st.RunValues | None:
    """The run's per-question values of F (pp) or RF (%) of `task` between stages `trained` and `after`."""
    got = _difference(q, run, task, trained, after)
    if got is None:
        return None
    ids, before, d = got
    values = d if statistic == "F" else st.ratio_pseudo_values(d, 100.0 * before, 100.0)[1]
    return st.RunValues(run.seed, task, ids, values)


def difference_values(q: Questions, run: RunData, task: str, first: int, second: int) -> st.RunValues | None:
    """100 · (correct at `first` − correct at `second`) per question (pp): a learning gain or a capability cost."""
    got = _difference(q, run, task, first, second)
    return None if got is None else st.RunValues(run.seed, task, got[0], got[2])




def _grouped(q: Questions, run: RunData, task: str, trained: int,
             after: int) -> tuple[tuple, np.ndarray, np.ndarray, list] | None:
    """(question ids, forgetting d in pp, group codes, group labels) of `task` between the two stages."""
    got = _difference(q, run, task, trained, after)
    return None if got is None else (got[0], got[2], *q.codes(run, task, trained, got[0]))


def group_values(q: Questions, run: RunData, task: str, trained: int, after: int, group: Hashable,
                 statistic: str) -> st.RunValues | None:
    """The run's per-question values of F_g (its group's questions) or BF_g = F_g − F (all questions), pp."""
    got = _grouped(q, run, task, trained, after)
    if got is None or group not in got[3]:
        return None
    ids, d, codes, labels = got
    k = labels.index(group)
    if statistic == "F_g":
        return st.RunValues(run.seed, (task, group), tuple(np.asarray(ids, dtype=object)[codes == k]), d[codes == k])
    return st.RunValues(run.seed, task, ids, st.bf_g_pseudo_values(d, codes, k)[1])


def summary_values(q: Questions, run: RunData, task: str, trained: int, after: int, included: Iterable,
                   kind: str) -> st.RunValues | None:
    """The run's per-question values of BF_max, BF_spread or BF_std over the `included` groups (pp)."""
    got = _grouped(q, run, task, trained, after)
    if got is None:
        return None
    ids, d, codes, labels = got
    mask = np.isin(np.asarray(labels, dtype=object), list(included))
    if not mask.any():
        return None
    return st.RunValues(run.seed, task, ids, st.bf_summary_pseudo_values(d, codes, mask, kind)[1])


def recovery_values(q: Questions, run: RunData, task: str, trained: int, stage: int,
                    group: Hashable | None = None) -> st.RunValues | None:
    """Replay recovery (R[r][S] − R[r−1][S]) / (R[s_S][S] − R[r−1][S]) per question of `task` (S; fraction), over
    the group's questions when `group` is given."""
    got = q.stages(run, task, [trained, stage - 1, stage])
    if got is None:
        return None
    ids, (c1, c2, c3) = got
    if group is not None:
        codes, labels = q.codes(run, task, trained, ids)
        if group not in labels:
            return None
        keep = codes == labels.index(group)
        ids, c1, c2, c3 = tuple(np.asarray(ids, dtype=object)[keep]), c1[keep], c2[keep], c3[keep]
    return st.RunValues(run.seed, (task, group), ids, st.ratio_pseudo_values(c3 - c2, c1 - c2)[1])


def crossed(values: Sequence[st.RunValues | None], seed_group: Hashable = 0,
            sign: float = 1.0) -> list[st.Block] | str:
    """The blocks of the mean over runs of their statistic, or the reason there are none."""
    if any(v is None for v in values):
        return "no per-question predictions"
    finite = [v for v in values if np.isfinite(v.values).all()]
    if len({v.seed for v in finite}) < 2:
        return "fewer than 2 seeds with a defined value"
    try:
        return st.blocks_from_runs(finite, seed_group, sign)
    except ValueError as exc:
        return str(exc)


def interval(values: Sequence[st.RunValues | None], floor: bool = True) -> st.CrossedInterval | str:
    """The crossed interval of the mean over runs (`floor`: see `stats.crossed_estimate`), or the reason there is
    none."""
    blocks = crossed(values)
    return blocks if isinstance(blocks, str) else st.crossed_estimate(blocks, floor=floor)


def fill(table: pd.DataFrame, names: Sequence[str], compute: Callable[[dict, str], st.CrossedInterval | str],
         p_values: bool = False) -> pd.DataFrame:
    """Each row with >= 2 seeds gets, for each statistic in `names`, the crossed interval `compute(row, name)` in
    `{name}_ci_low` / `{name}_ci_high` (and `{name}_p_value` with `p_values`); `ci_method` says how every row's
    interval was computed (rows where the crossed interval fails keep the t interval over seeds, with the reason)."""
    table = table.copy()
    methods = []
    for i, row in table.iterrows():
        if row["seeds"] < 2:
            methods.append(NO_INTERVAL)
            continue
        reasons = []
        for name in names:
            result = compute(row.to_dict(), name)
            if isinstance(result, str):
                reasons.append(f"{name}: {result}")
                continue
            table.loc[i, [f"{name}_ci_low", f"{name}_ci_high"]] = result.ci_low, result.ci_high
            if p_values:
                table.loc[i, f"{name}_p_value"] = result.p_value
        methods.append(CROSSED if not reasons else f"{T_OVER_SEEDS} ({'; '.join(reasons)})")
    table["ci_method"] = methods
    return table


def adjust(table: pd.DataFrame, family: list[str], names: Sequence[str], correction: str,
           eligible: pd.Series | None = None) -> pd.DataFrame:
    """Adjusted p-values `{name}_adj_p` (Holm or Benjamini–Hochberg within each `family` of rows, over the
    `eligible` rows only) and `{name}_significant` (adjusted p < 0.05); `correction` names the method used."""
    table = table.copy()
    eligible = pd.Series(True, index=table.index) if eligible is None else eligible.astype(bool)
    for name in names:
        adjusted = pd.Series(math.nan, index=table.index)
        for _, part in table[eligible].groupby(family, sort=False):
            adjusted.loc[part.index] = st.adjust_p_values(part[f"{name}_p_value"].to_numpy(dtype=float), correction)
        table[f"{name}_adj_p"] = adjusted
        table[f"{name}_significant"] = adjusted < SIGNIFICANCE
    table["correction"] = st.correction_name(correction)
    return table
