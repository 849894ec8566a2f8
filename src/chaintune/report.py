"""Reports: the figures and tables of a finished experiment (or a sweep of experiments) in one self-contained file.

`write_report(run_dir)` reads what `chaintune run` wrote (results.parquet, runs/*/metrics.json via
`chaintune.summary.summary_tables`, runs/*/train_curves.csv, stages/*/node.json, experiment.yaml, environment.json)
and writes, under `<out_dir>` (default `<run_dir>/report/`):

    report.html  (or report.md)   self-contained HTML: figures embedded as base64 PNG, tables inline
    figures/<name>.png, .pdf      every figure, paper-sized (3.3–7 in wide, 8–9 pt fonts)
    tables/<name>.csv, .md        every table: raw CSV (all columns) and compact Markdown ("x [ci_low, ci_high]")

Sections whose data is absent are skipped. A *sweep directory* (no results.parquet of its own, but sub-folders that
each hold a finished experiment) gives one report: sections 1–4 and 6 per experiment, section 5 (learning-rate and
replay sweeps) over all of them together.

The plotting functions are public and work on their own (each returns a `matplotlib.figure.Figure`, created without
pyplot, so no GUI backend and no global figure state is involved; PNG output goes through Agg).
"""
from __future__ import annotations

import base64
import functools
import html
import io
import math
import re
import textwrap
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import matplotlib as mpl
import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from chaintune.errors import ChaintuneError
from chaintune.io import atomic_path, read_json, write_text
from chaintune.summary import OVERALL

__all__ = [
    "OKABE_ITO", "PALETTE", "KIND_COLOURS", "RC", "write_report", "accuracy_matrices", "chain_tasks",
    "lr_sweep_points", "replay_points", "training_curves", "plot_accuracy_matrix", "plot_accuracy_matrices",
    "plot_forgetting", "plot_group_forgetting", "plot_bbq_bias", "plot_curvature", "plot_curvature_vs_forgetting",
    "plot_lr_forgetting", "plot_replay", "plot_training_curves",
]


# ---------------------------------------------------------------------------------------------------------- style
# Okabe & Ito (2008), "Color Universal Design": distinguishable with every common colour-vision deficiency.
OKABE_ITO = {"black": "#000000", "orange": "#E69F00", "sky_blue": "#56B4E9", "bluish_green": "#009E73",
             "yellow": "#F0E442", "blue": "#0072B2", "vermillion": "#D55E00", "reddish_purple": "#CC79A7"}
PALETTE = [OKABE_ITO[c] for c in ("blue", "orange", "bluish_green", "vermillion", "sky_blue", "reddish_purple",
                                  "black", "yellow")]
KIND_COLOURS = {"safety": OKABE_ITO["vermillion"], "capability": OKABE_ITO["blue"], "other": OKABE_ITO["bluish_green"]}
GREY = "#9a9a9a"
HEATMAP = "cividis"  # sequential, perceptually uniform, colour-blind safe
SINGLE, DOUBLE = 3.3, 7.0  # column / page width in inches
DPI = 200
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]

RC = {
    "font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "xtick.labelsize": 7.5, "ytick.labelsize": 7.5,
    "legend.fontsize": 7, "legend.title_fontsize": 7.5, "figure.titlesize": 9, "axes.spines.top": False,
    "axes.spines.right": False, "axes.prop_cycle": mpl.cycler(color=PALETTE), "axes.linewidth": 0.7,
    "lines.linewidth": 1.2, "lines.markersize": 4, "patch.linewidth": 0.6, "errorbar.capsize": 2,
    "xtick.major.width": 0.7, "ytick.major.width": 0.7, "legend.frameon": False, "hatch.linewidth": 0.6,
    "pdf.fonttype": 42, "ps.fonttype": 42, "savefig.dpi": DPI, "image.cmap": HEATMAP,
}


def _styled(fn: Callable[..., Figure]) -> Callable[..., Figure]:
    """Build the figure under the report's rcParams (without touching the caller's global settings)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with mpl.rc_context(RC), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)

    return wrapper


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _kind(task: str) -> str:
    try:
        from chaintune.tasks import get_task

        return get_task(task).kind
    except Exception:  # unknown / user task that is not registered in this process
        return "other"


def _colour_of_kind(task: str) -> str:
    return KIND_COLOURS.get(_kind(task), KIND_COLOURS["other"])


def _yerr(mean: Iterable[float], lo: Iterable[float] | None, hi: Iterable[float] | None) -> np.ndarray | None:
    """Asymmetric error bars from CI bounds; NaN bounds (e.g. one seed) draw no bar."""
    if lo is None or hi is None:
        return None
    m, lo_, hi_ = (np.asarray(list(v), dtype=float) for v in (mean, lo, hi))
    err = np.vstack([m - lo_, hi_ - m])
    return np.clip(np.nan_to_num(err, nan=0.0), 0, None)


def _col(df: pd.DataFrame, name: str) -> pd.Series | None:
    return df[name] if name in df.columns else None


def _finite(v: Any) -> bool:
    return v is not None and isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(float(v))


def _pretty(label: Any) -> str:
    return str(label).replace("_", " ")


def _zero_line(ax, min_span: float = 1.0) -> None:
    """A line at y = 0, and at least ±`min_span` of y range so that all-zero data does not show as ±0.04."""
    ax.axhline(0, color="black", linewidth=0.6, zorder=1)
    lo, hi = ax.get_ylim()
    if hi - lo < 2 * min_span:
        mid = (lo + hi) / 2 if abs((lo + hi) / 2) > min_span else 0.0
        ax.set_ylim(mid - min_span, mid + min_span)


# ------------------------------------------------------------------------------------------------- data helpers
def _overall(results: pd.DataFrame) -> pd.DataFrame:
    return results[results["group"] == OVERALL] if "group" in results.columns else results


def chain_tasks(results: pd.DataFrame) -> dict[str, list[str]]:
    """Each chain's trained task per stage (stage 1 first), from the tidy results table."""
    trained = _overall(results)
    trained = trained[trained["stage"] > 0].drop_duplicates(["chain", "stage"]).sort_values("stage", kind="stable")
    out: dict[str, list[str]] = {c: [] for c in dict.fromkeys(results["chain"])}
    for chain, part in trained.groupby("chain", sort=False):
        out[chain] = [str(t) for t in part["trained_task"]]
    return out


def accuracy_matrices(results: pd.DataFrame, value: str = "acc") -> dict[str, pd.DataFrame]:
    """Per chain, R[s][t] averaged over seeds: index 'stage: stage name' (0 = base), columns evaluated tasks (pp)."""
    overall = _overall(results)
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


def _stage_lr(stage: Mapping[str, Any], training: Mapping[str, Any]) -> float:
    from chaintune.config import TrainingConfig

    return float(stage.get("lr", training.get("lr", TrainingConfig.model_fields["lr"].default)))


def _matrices_by_run(results: pd.DataFrame) -> dict[tuple[str, int], pd.DataFrame]:
    """(chain, seed) → R (index stage int, columns task) of that run."""
    overall = _overall(results)
    return {(str(c), int(s)): part.pivot_table(index="stage", columns="eval_task", values="acc", aggfunc="mean")
            for (c, s), part in overall.groupby(["chain", "seed"], sort=False)}


def lr_sweep_points(results: pd.DataFrame, experiment: Mapping[str, Any]) -> pd.DataFrame:
    """One row per run of a chain with >= 2 stages: its first-stage task and learning rate, and the forgetting of
    that task after the last stage, `F = R[1][t1] − R[K][t1]` (pp) and `RF = 100·F/R[1][t1]` (%).

    `experiment`: the experiment config as a dict (experiment.yaml); a stage's lr is its own `lr` key, else
    `training.lr`. Columns: chain, seed, route ('A→B'), task, lr, F, RF.
    """
    training = experiment.get("training") or {}
    chains = {c["name"]: c["stages"] for c in experiment.get("chains", [])}
    rows = []
    for (chain, seed), R in _matrices_by_run(results).items():
        stages = chains.get(chain)
        if not stages or len(stages) < 2:
            continue
        task, K = stages[0]["task"], int(R.index.max())
        if task not in R.columns or 1 not in R.index:
            continue
        r1, rk = float(R.at[1, task]), float(R.at[K, task])
        rows.append({"chain": chain, "seed": seed, "route": "→".join(s["task"] for s in stages), "task": task,
                     "lr": _stage_lr(stages[0], training), "F": r1 - rk,
                     "RF": 100 * (r1 - rk) / r1 if r1 else math.nan})
    return pd.DataFrame(rows, columns=["chain", "seed", "route", "task", "lr", "F", "RF"])


def replay_points(results: pd.DataFrame, experiment: Mapping[str, Any]) -> pd.DataFrame:
    """One row per run × replay stage (SPEC.md §7): a stage r >= 2 that trains capability task C mixed with a
    fraction f of replayed safety task S, where S was trained at an earlier stage s_S:

        recovery        = (R[r][S] − R[r−1][S]) / (R[s_S][S] − R[r−1][S])   (fraction; 1 = all forgotten won back)
        capability_cost = R[r−1][C] − R[r][C]                               (pp)

    A chain whose stages match a replay chain's but whose stage r has no replay counts as f = 0. Columns: chain,
    seed, stage, safety_task, capability_task, fraction, recovery, capability_cost, forgotten (R[s_S][S] −
    R[r−1][S], pp).
    """
    from chaintune.metrics import capability_cost, replay_recovery

    chains = {c["name"]: c["stages"] for c in experiment.get("chains", [])}
    plans: dict[str, tuple[int, str, float]] = {}  # chain → (replay stage, replayed task, fraction)
    for name, stages in chains.items():
        for r, st in enumerate(stages, start=1):
            if r >= 2 and st.get("replay"):
                plans[name] = (r, st["replay"]["task"], float(st["replay"]["fraction"]))
    for name, stages in chains.items():  # f = 0 twins: same tasks through stage r, no replay at r
        if name in plans:
            continue
        tasks = [s["task"] for s in stages]
        for other, (r, s_task, _) in list(plans.items()):
            same_tasks = len(tasks) >= r and tasks[:r] == [s["task"] for s in chains[other][:r]]
            if same_tasks and not stages[r - 1].get("replay"):
                plans[name] = (r, s_task, 0.0)
                break
    rows = []
    matrices = _matrices_by_run(results)
    for (chain, seed), R in matrices.items():
        if chain not in plans:
            continue
        r, s_task, f = plans[chain]
        tasks = [s["task"] for s in chains[chain]]
        c_task = tasks[r - 1]
        s_stages = [i for i, t in enumerate(tasks[:r - 1], start=1) if t == s_task]
        if not s_stages or s_task not in R.columns or c_task not in R.columns or r not in R.index:
            continue
        s_s = s_stages[-1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rec = replay_recovery(float(R.at[s_s, s_task]), float(R.at[r - 1, s_task]), float(R.at[r, s_task]))
        rows.append({"chain": chain, "seed": seed, "stage": r, "safety_task": s_task, "capability_task": c_task,
                     "fraction": f, "recovery": rec,
                     "capability_cost": capability_cost(float(R.at[r - 1, c_task]), float(R.at[r, c_task])),
                     "forgotten": float(R.at[s_s, s_task] - R.at[r - 1, s_task])})
    return pd.DataFrame(rows, columns=["chain", "seed", "stage", "safety_task", "capability_task", "fraction",
                                       "recovery", "capability_cost", "forgotten"])


def training_curves(run_dir: str | Path) -> pd.DataFrame:
    """All runs' training curves (runs/*/train_curves.csv) with chain and seed columns added."""
    frames = []
    for path in sorted(Path(run_dir).glob("runs/*/train_curves.csv")):
        meta_path = path.parent / "run.json"
        meta = read_json(meta_path) if meta_path.is_file() else {}
        chain = meta.get("chain", path.parent.name.rsplit("-seed", 1)[0])
        seed = meta.get("seed", path.parent.name.rsplit("-seed", 1)[-1])
        frames.append(pd.read_csv(path).assign(chain=chain, seed=seed))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _mean_ci(df: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame:
    from chaintune.metrics import aggregate_over_seeds

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return aggregate_over_seeds(df, by, value)


# ---------------------------------------------------------------------------------------------------- figures
@_styled
def plot_accuracy_matrix(R: pd.DataFrame, ax=None, title: str | None = None, colorbar: bool = True,
                         vmin: float = 0, vmax: float = 100) -> Figure:
    """Heat-map of an accuracy matrix (rows = stages, columns = evaluated tasks, values in pp, annotated).

    `R`: DataFrame (e.g. from `accuracy_matrices` or `chaintune.metrics.accuracy_matrix`); a MultiIndex is joined
    with ': '. Draws into `ax` when given (and returns its figure), else into a new figure.
    """
    if ax is None:
        fig = _figure(min(DOUBLE, max(SINGLE, 0.8 * R.shape[1] + 1.6)), max(1.5, 0.32 * R.shape[0] + 1.1))
        ax = fig.add_subplot()
    values = R.to_numpy(dtype=float)
    im = ax.imshow(values, cmap=HEATMAP, vmin=vmin, vmax=vmax, aspect="auto")
    cmap = im.get_cmap()
    for (i, j), v in np.ndenumerate(values):
        if math.isnan(v):
            ax.text(j, i, "–", ha="center", va="center", fontsize=7)
            continue
        r, g, b, _ = cmap(im.norm(v))
        dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.55
        ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
    rows = [": ".join(map(str, i)) if isinstance(i, tuple) else str(i) for i in R.index]
    ax.set_xticks(range(R.shape[1]), [_pretty(c) for c in R.columns], rotation=25, ha="right",
                  rotation_mode="anchor")
    ax.set_yticks(range(R.shape[0]), rows)
    ax.tick_params(length=0)
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after stage")
    if title:
        ax.set_title(textwrap.fill(title, 34), loc="left")
    if colorbar:
        ax.figure.colorbar(im, ax=ax, label="accuracy (pp)", shrink=0.9, pad=0.02)
    return ax.figure


@_styled
def plot_accuracy_matrices(matrices: Mapping[str, pd.DataFrame], ncols: int = 2) -> Figure:
    """One heat-map panel per chain (as `accuracy_matrices` returns them), sharing one colour bar; `ncols` panels
    per row (at least 3 when there are more than 4 chains)."""
    n = len(matrices)
    ncols = max(1, min(ncols if n <= 4 else max(ncols, 3), n))
    nrows = math.ceil(n / ncols)
    n_stages = max(R.shape[0] for R in matrices.values())
    fig = _figure(DOUBLE if ncols > 1 else 3.6, nrows * (0.3 * n_stages + 1.35))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for i, (ax, (chain, R)) in enumerate(zip(axes, matrices.items())):
        plot_accuracy_matrix(R, ax=ax, title=chain, colorbar=False)
        if i % ncols:
            ax.set_ylabel("")
        if i + ncols < n:
            ax.set_xlabel("")
    for ax in axes[n:]:
        ax.set_visible(False)
    mappable = axes[0].images[0]
    fig.colorbar(mappable, ax=list(axes[:n]), label="accuracy (pp)", shrink=0.9 if nrows == 1 else 0.5, aspect=25)
    return fig


def _pair_order(df: pd.DataFrame, routes: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """Sort forgetting rows so that the two orders of each task pair sit side by side, safety-first first."""
    def key(row):
        tasks = list(routes.get(row["chain"], [])) or [row["task"]]
        pair = tuple(sorted(set(tasks), key=lambda t: (_kind(t) != "safety", t)))
        return (pair, _kind(tasks[0]) != "safety", row["chain"], row["task"])

    return df.assign(_key=df.apply(key, axis=1)).sort_values("_key", kind="stable").drop(columns="_key")


@_styled
def plot_forgetting(df: pd.DataFrame, routes: Mapping[str, Sequence[str]] | None = None) -> Figure:
    """Forgetting F (pp) and relative forgetting RF (%) of each chain's earlier task(s) after the last stage.

    `df`: the `forgetting` table of `summary_tables` (chain, task, F, F_ci_low, F_ci_high, RF, RF_ci_low,
    RF_ci_high; mean over seeds with 95% t-intervals). `routes`: chain → its stage tasks (see `chain_tasks`), used to
    label bars 'A→B' and to put both orders of a task pair next to each other. Bar colour = kind of the forgotten
    task (safety vs capability); error bars = the 95% CI over seeds (none with one seed).
    """
    routes = dict(routes or {})
    df = _pair_order(df.reset_index(drop=True), routes)
    per_chain = df.groupby("chain")["task"].transform("count")
    labels = []
    for (_, row), n in zip(df.iterrows(), per_chain):
        route = "→".join(routes[row["chain"]]) if routes.get(row["chain"]) else str(row["chain"])
        labels.append(route if n == 1 else f"{route}\n(F of {row['task']})")
    # a gap between task pairs
    x, pos, prev = [], -1.0, None
    for _, row in df.iterrows():
        pair = tuple(sorted(set(routes.get(row["chain"], [row["task"]]))))
        pos += 1.0 if prev in (None, pair) else 1.6
        prev = pair
        x.append(pos)
    x = np.asarray(x)
    metrics = [("F", "forgetting F (pp)")] + ([("RF", "relative forgetting RF (%)")] if "RF" in df.columns else [])
    wide = len(df) <= 6
    fig = _figure(DOUBLE, 2.5 if wide else 2.4 * len(metrics) + 0.4)
    axes = fig.subplots(1, len(metrics)) if wide else fig.subplots(len(metrics), 1, sharex=True)
    axes = np.atleast_1d(axes)
    colours = [_colour_of_kind(t) for t in df["task"]]
    for ax, (col, label) in zip(axes, metrics):
        ax.bar(x, df[col], width=0.7, color=colours, edgecolor="black", linewidth=0.5,
               yerr=_yerr(df[col], _col(df, f"{col}_ci_low"), _col(df, f"{col}_ci_high")),
               error_kw={"elinewidth": 0.8, "ecolor": "black"}, zorder=2)
        _zero_line(ax)
        ax.set_ylabel(label)
        ax.set_xticks(x, labels, rotation=30 if len(df) > 2 else 0, ha="right" if len(df) > 2 else "center",
                      rotation_mode="anchor")
    if not wide:
        for ax in axes[:-1]:
            ax.tick_params(labelbottom=False)
    kinds = list(dict.fromkeys(_kind(t) for t in df["task"]))
    names = {"safety": "safety task forgotten (safety first)", "capability": "capability task forgotten "
             "(capability first)", "other": "other task forgotten"}
    handles = [Patch(facecolor=KIND_COLOURS.get(k, KIND_COLOURS["other"]), edgecolor="black", label=names.get(k, k))
               for k in kinds]
    fig.legend(handles=handles, loc="outside upper center", ncols=len(handles))
    return fig


@_styled
def plot_group_forgetting(df: pd.DataFrame, min_group_size: int | None = None) -> Figure:
    """The paper's per-group figure: F_g (pp) per group with 95% CI error bars over seeds, one panel per
    (chain, task), and the task-average forgetting F as a dashed line (F = F_g − BF_g).

    `df`: the `group_forgetting` table of `summary_tables` (chain, task, group, F_g, F_g_ci_low, F_g_ci_high, BF_g,
    n, included). Groups with `included == False` (fewer than `min_group_size` test questions, or F_g undefined)
    are drawn hatched in grey, their tick label shows n, and they are left out of the biased-forgetting summaries.
    """
    keys = list(dict.fromkeys(zip(df["chain"], df["task"])))
    n_groups = max(len(df[(df.chain == c) & (df.task == t)]) for c, t in keys)
    fig = _figure(DOUBLE if n_groups > 5 else SINGLE + 0.7, 2.5 * len(keys))
    axes = np.atleast_1d(fig.subplots(len(keys), 1, squeeze=False)).ravel()
    for ax, (chain, task) in zip(axes, keys):
        part = df[(df.chain == chain) & (df.task == task)].reset_index(drop=True)
        included = part["included"].astype(bool) if "included" in part.columns else pd.Series(True, part.index)
        x = np.arange(len(part))
        colour = _colour_of_kind(task)
        yerr = _yerr(part["F_g"], _col(part, "F_g_ci_low"), _col(part, "F_g_ci_high"))
        ax.bar(x, part["F_g"], width=0.7, color=[colour if inc else "#dddddd" for inc in included],
               edgecolor=["black" if inc else GREY for inc in included], linewidth=0.5,
               hatch=None, zorder=2)
        for xi, inc, v in zip(x, included, part["F_g"]):  # hatch only the excluded bars
            if not inc:
                ax.bar(xi, 0 if pd.isna(v) else v, width=0.7, color="none", edgecolor=GREY, hatch="////",
                       linewidth=0.5, zorder=3)
        if yerr is not None:
            ax.errorbar(x, part["F_g"], yerr=yerr, fmt="none", ecolor="black", elinewidth=0.8, zorder=4)
        handles = []
        if "BF_g" in part.columns:
            avg = (part["F_g"] - part["BF_g"]).dropna()
            if len(avg):
                f = float(avg.median())
                handles.append(ax.axhline(f, color="black", linestyle="--", linewidth=1.0, zorder=5,
                                          label=f"task average F = {f:.1f} pp"))
        _zero_line(ax)
        labels = [_pretty(g) if inc else f"{_pretty(g)} (n={int(n)})"
                  for g, inc, n in zip(part["group"], included, part.get("n", pd.Series(0, part.index)))]
        ax.set_xticks(x, labels, rotation=35 if len(part) > 4 else 0, ha="right" if len(part) > 4 else "center",
                      rotation_mode="anchor")
        for tick, inc in zip(ax.get_xticklabels(), included):
            if not inc:
                tick.set_color("#666666")
        ax.set_ylabel(r"group forgetting $F_g$ (pp)")
        ax.set_title(textwrap.fill(f"{chain}: {task}", 40), loc="left")
        if not included.all():
            size = f"n < {min_group_size}" if min_group_size else "too few questions"
            handles.append(Patch(facecolor="#dddddd", edgecolor=GREY, hatch="////",
                                 label=f"{size}: excluded from BF summaries"))
        if handles:
            ax.legend(handles=handles, loc="lower right", bbox_to_anchor=(1, 1), ncols=len(handles),
                      borderaxespad=0.2)
    return fig


@_styled
def plot_bbq_bias(df: pd.DataFrame, stage_names: Mapping[int, str] | None = None) -> Figure:
    """BBQ bias scores s_DIS and s_AMB (Parrish et al. 2022; −100…100, 0 = unbiased) per category and stage.

    `df`: the `bbq_bias` table of `summary_tables` (chain, task, stage, category, s_dis, s_amb with _ci_low /
    _ci_high). One row of panels per (chain, task); bars grouped by category ('overall' last), one colour per
    stage, 95% CI error bars over seeds.
    """
    keys = list(dict.fromkeys(zip(df["chain"], df["task"])))
    fig = _figure(DOUBLE, 2.6 * len(keys) + 0.3)
    axes = fig.subplots(len(keys), 2, squeeze=False)
    stages = sorted(df["stage"].unique())
    width = 0.8 / max(len(stages), 1)
    for (chain, task), row in zip(keys, axes):
        part = df[(df.chain == chain) & (df.task == task)]
        cats = sorted(c for c in part["category"].unique() if c != "overall")
        cats += ["overall"] if (part["category"] == "overall").any() else []
        scores = [("s_dis", r"disambiguated $s_{\mathrm{DIS}}$"), ("s_amb", r"ambiguous $s_{\mathrm{AMB}}$")]
        for ax, (col, label) in zip(row, scores):
            for k, s in enumerate(stages):
                sub = part[part.stage == s].set_index("category").reindex(cats)
                x = np.arange(len(cats)) + (k - (len(stages) - 1) / 2) * width
                name = stage_names.get(int(s)) if stage_names else None
                ax.bar(x, sub[col].fillna(0), width=width, color=PALETTE[k % len(PALETTE)], edgecolor="black",
                       linewidth=0.4, label=f"stage {s}" + (f": {name}" if name else ""), zorder=2,
                       yerr=_yerr(sub[col], _col(sub, f"{col}_ci_low"), _col(sub, f"{col}_ci_high")),
                       error_kw={"elinewidth": 0.6, "ecolor": "black", "capsize": 1})
                for xi in x[sub[col].isna().to_numpy()]:  # undefined (e.g. every answer 'unknown'): say so
                    ax.text(xi, 0, "n/a", rotation=90, ha="center", va="bottom", fontsize=5.5, color="#555555")
            _zero_line(ax)
            ax.set_xticks(range(len(cats)), [_pretty(c) for c in cats], rotation=35, ha="right",
                          rotation_mode="anchor")
            ax.set_ylabel(f"{label} (bias score)")
            ax.set_ylim(min(-10, ax.get_ylim()[0]), max(10, ax.get_ylim()[1]))
            ax.set_title(textwrap.fill(f"{chain}: {task}", 40), loc="left")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=min(len(stages), 4), title="model after")
    return fig


@_styled
def plot_curvature(df: pd.DataFrame, points: pd.DataFrame | None = None) -> Figure:
    """λ_max of the training-loss Hessian after a stage, per (chain, stage task): mean over seeds with the 95% CI,
    seed values as dots when `points` (the `curvature_points` table) is given.

    `df`: the `curvature` table of `summary_tables` (chain, stage, task, lambda_max, lambda_max_ci_low/high).
    """
    df = df.reset_index(drop=True)
    x = np.arange(len(df))
    fig = _figure(min(DOUBLE, max(SINGLE, 0.7 * len(df) + 1.2)), 2.6)
    ax = fig.add_subplot()
    ax.bar(x, df["lambda_max"], width=0.6, color=[_colour_of_kind(t) for t in df["task"]], edgecolor="black",
           linewidth=0.5, alpha=0.85, zorder=2,
           yerr=_yerr(df["lambda_max"], _col(df, "lambda_max_ci_low"), _col(df, "lambda_max_ci_high")),
           error_kw={"elinewidth": 0.8, "ecolor": "black"})
    if points is not None and not points.empty:
        for xi, (_, row) in zip(x, df.iterrows()):
            pts = points[(points.chain == row["chain"]) & (points.stage == row["stage"])]["lambda_max"]
            jitter = np.linspace(-0.12, 0.12, len(pts)) if len(pts) > 1 else np.zeros(len(pts))
            ax.scatter(xi + jitter, pts, s=10, color="black", zorder=4, linewidths=0)
    labels = [f"{_pretty(r.task)}\n({r.chain}, stage {r.stage})" for r in df.itertuples()]
    ax.set_xticks(x, labels, rotation=20 if len(df) > 3 else 0, ha="right" if len(df) > 3 else "center",
                  rotation_mode="anchor")
    ax.set_ylabel(r"Hessian $\lambda_{\max}$ after the stage")
    _zero_line(ax)
    return fig


def _corr_row(corr: pd.DataFrame | None, target: str) -> dict[str, Any]:
    if corr is None or corr.empty:
        return {}
    sel = corr[(corr["target"] == target) & (corr.get("group", OVERALL) == OVERALL) & (corr.get("task", OVERALL) == OVERALL)]
    return sel.iloc[0].to_dict() if len(sel) else {}


@_styled
def plot_curvature_vs_forgetting(points: pd.DataFrame, corr: pd.DataFrame | None = None) -> Figure:
    """Does first-stage curvature predict later forgetting? One point per run (λ_max after the stage vs F in pp,
    and vs RF in % when present), coloured by task, marker by chain; the least-squares line over all runs with
    Pearson r and its p-value in the legend (from the `curvature_vs_forgetting` table when given, else computed).
    """
    from chaintune.metrics import correlation

    targets = [("F", "forgetting F (pp)")] + ([("RF", "relative forgetting RF (%)")] if "RF" in points.columns else [])
    fig = _figure(DOUBLE if len(targets) > 1 else SINGLE + 0.4, 2.8)
    axes = np.atleast_1d(fig.subplots(1, len(targets)))
    tasks = list(dict.fromkeys(points["task"]))
    chains = list(dict.fromkeys(points["chain"])) if "chain" in points.columns else [None]
    for ax, (target, label) in zip(axes, targets):
        for i, task in enumerate(tasks):
            for j, chain in enumerate(chains):
                sel = points[(points.task == task) & ((points.chain == chain) if chain is not None else True)]
                if sel.empty:
                    continue
                ax.scatter(sel["lambda_max"], sel[target], s=18, marker=MARKERS[j % len(MARKERS)],
                           color=_colour_of_kind(task) if len(tasks) <= 2 else PALETTE[i % len(PALETTE)],
                           edgecolor="black", linewidths=0.4, zorder=3,
                           label=f"{_pretty(task)}" + (f" ({chain})" if chain is not None and len(chains) > 1 else ""))
        row = _corr_row(corr, target)
        if not row:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row = vars(correlation(points["lambda_max"], points[target]))
        xs = np.linspace(points["lambda_max"].min(), points["lambda_max"].max(), 50)
        if _finite(row.get("slope")) and _finite(row.get("intercept")):
            ax.plot(xs, row["slope"] * xs + row["intercept"], color="black", linewidth=1.0, zorder=2,
                    label=f"least squares: r = {row['pearson_r']:.2f}, p = {row['pearson_p']:.2g} "
                          f"(n = {int(row['n'])})")
        else:
            note = str(row.get("note") or "undefined").removeprefix("undefined: ")
            ax.plot([], [], color="black", linewidth=1.0, label=f"r undefined ({note}; n = {int(row.get('n', 0))})")
        ax.set_xlabel(r"Hessian $\lambda_{\max}$ after the first stage")
        ax.set_ylabel(label)
        ax.axhline(0, color=GREY, linewidth=0.5, zorder=1)
        ax.legend(loc="upper left", bbox_to_anchor=(0, -0.22), ncols=1, borderaxespad=0)
    return fig


def _line_with_seeds(ax, df: pd.DataFrame, x: str, y: str, by: str, colours: Mapping[str, str],
                     xscale: Callable[[np.ndarray], np.ndarray] = lambda v: v) -> None:
    """Mean over seeds ± 95% CI as a line per `by` value, seed values as small dots."""
    for i, (key, part) in enumerate(df.groupby(by, sort=False)):
        agg = _mean_ci(part.dropna(subset=[y]), [x], y).sort_values(x)
        colour = colours.get(key, PALETTE[i % len(PALETTE)])
        ax.errorbar(xscale(agg[x].to_numpy()), agg["mean"], yerr=_yerr(agg["mean"], agg["ci_low"], agg["ci_high"]),
                    color=colour, marker=MARKERS[i % len(MARKERS)], markersize=4, label=str(key), zorder=3)
        ax.scatter(xscale(part[x].to_numpy()), part[y], s=8, color=colour, alpha=0.5, linewidths=0, zorder=2)


@_styled
def plot_lr_forgetting(df: pd.DataFrame) -> Figure:
    """Forgetting of the first task vs the first stage's learning rate (`lr_sweep_points` rows): mean over seeds
    with 95% CI per route (A→B), seed values as dots; log-scaled x when every rate is positive."""
    targets = [("F", "forgetting F of the first task (pp)"), ("RF", "relative forgetting RF (%)")]
    fig = _figure(DOUBLE, 2.6)
    axes = fig.subplots(1, 2)
    routes = list(dict.fromkeys(df["route"]))
    colours = {r: _colour_of_kind(r.split("→")[0]) for r in routes} if len(routes) <= 2 else {}
    for ax, (col, label) in zip(axes, targets):
        _line_with_seeds(ax, df, "lr", col, "route", colours)
        if (df["lr"] > 0).all():
            ax.set_xscale("log")
        ax.set_xlabel("first-stage learning rate")
        ax.set_ylabel(label)
        _zero_line(ax)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=min(len(routes), 4), title="chain (stage tasks)")
    return fig


@_styled
def plot_replay(df: pd.DataFrame, threshold: float = 0.9) -> Figure:
    """Replay sweep (`replay_points` rows): recovery (% of the forgotten safety accuracy won back) and capability
    cost (pp) vs the replay fraction f (%), mean over seeds with 95% CI per (safety, capability) pair, seed dots;
    the dashed line marks the recovery `threshold` (SPEC.md §7, smallest recovering fraction)."""
    df = df.assign(recovery_pct=100 * df["recovery"], fraction_pct=100 * df["fraction"],
                   pair=df["safety_task"] + " / " + df["capability_task"])
    fig = _figure(DOUBLE, 2.6)
    axes = fig.subplots(1, 2)
    pairs = list(dict.fromkeys(df["pair"]))
    for ax, (col, label) in zip(axes, [("recovery_pct", "recovery (% of forgetting undone)"),
                                       ("capability_cost", "capability cost (pp)")]):
        _line_with_seeds(ax, df, "fraction_pct", col, "pair", {})
        ax.set_xlabel("replay fraction f (% of stage examples)")
        ax.set_ylabel(label)
        _zero_line(ax)
    axes[0].axhline(100 * threshold, color=GREY, linestyle="--", linewidth=0.8,
                    label=f"{100 * threshold:.0f}% recovery")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=min(len(pairs) + 1, 4),
               title="replayed safety task / capability task of the stage")
    return fig


@_styled
def plot_training_curves(df: pd.DataFrame, ncols: int = 2) -> Figure:
    """Training loss per optimizer step, stages laid end to end, one panel per chain, one colour per stage, one line
    per seed; dotted lines mark stage boundaries.

    `df`: rows of train_curve.csv (step, loss, stage, task) with `chain` and `seed` columns (`training_curves`).
    """
    df = df.copy()
    if "chain" not in df.columns:
        df["chain"] = ""
    if "seed" not in df.columns:
        df["seed"] = 0
    chains = list(dict.fromkeys(df["chain"]))
    ncols = max(1, min(ncols, len(chains)))
    nrows = math.ceil(len(chains) / ncols)
    fig = _figure(DOUBLE if ncols > 1 else SINGLE + 0.7, 2.3 * nrows + 0.3)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    stages = sorted(df["stage"].unique())
    for ax, chain in zip(axes, chains):
        part = df[df.chain == chain]
        boundaries: dict[int, float] = {}
        for _, run in part.groupby("seed", sort=True):
            offset = 0.0
            for s in stages:
                cur = run[run.stage == s].sort_values("step")
                if cur.empty:
                    continue
                task = cur["task"].iloc[0] if "task" in cur.columns else ""
                ax.plot(cur["step"] + offset, cur["loss"], color=PALETTE[stages.index(s) % len(PALETTE)],
                        linewidth=0.9, alpha=0.85, label=f"stage {s}: {task}")
                offset += float(cur["step"].max())
                boundaries[s] = max(boundaries.get(s, 0.0), offset)
        for s, b in list(boundaries.items())[:-1]:
            ax.axvline(b + 0.5, color=GREY, linestyle=":", linewidth=0.8)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), loc="upper right")
        ax.set_title(textwrap.fill(str(chain), 40), loc="left")
        ax.set_xlabel("optimizer step (stages end to end)")
        ax.set_ylabel("training loss (nats / answer token)")
    for ax in axes[len(chains):]:
        ax.set_visible(False)
    return fig


# ---------------------------------------------------------------------------------------------------- tables
def _number(v: Any, col: str = "") -> str:
    if v is None or (isinstance(v, (float, np.floating)) and math.isnan(v)):
        return "—"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if col.endswith("_p") or "p_value" in col:
            return f"{v:.2g}"
        return f"{v:.4g}" if abs(v) >= 1000 or (v != 0 and abs(v) < 0.01) else f"{v:.2f}"
    return str(v)


def _display(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """A compact, rounded copy for Markdown/HTML, and the names of its numeric columns (right-aligned).

    `X` with `X_ci_low` / `X_ci_high` becomes one column 'X [low, high]' (likewise `difference` with `ci_low` /
    `ci_high`); `X_std` is dropped where `X` is shown (but a metric such as `BF_std` is kept); floats get 2 decimals
    (p-values 2 significant digits); NaN shows as '—'.
    """
    out, numeric, drop = {}, [], set()
    for col in df.columns:
        if col in drop:
            continue
        lo, hi = f"{col}_ci_low", f"{col}_ci_high"
        if col == "difference" and {"ci_low", "ci_high"} <= set(df.columns):
            lo, hi = "ci_low", "ci_high"
        if lo in df.columns and hi in df.columns:
            out[col] = [_number(v) if _number(a) == "—" else f"{_number(v)} [{_number(a)}, {_number(b)}]"
                        for v, a, b in zip(df[col], df[lo], df[hi])]
            drop |= {lo, hi, f"{col}_std"}
        else:
            out[col] = [_number(v, str(col)) for v in df[col]]
        if df[col].dtype.kind in "fiub":
            numeric.append(col)
    kept = [c for c in df.columns if c not in drop]
    shown = pd.DataFrame({c: out[c] for c in kept}, columns=kept)
    return shown, [c for c in numeric if c in kept]


def _md_table(df: pd.DataFrame, numeric: Sequence[str]) -> str:
    return df.to_markdown(index=False, disable_numparse=True,
                          colalign=["right" if c in numeric else "left" for c in df.columns])


def _html_table(df: pd.DataFrame, numeric: Sequence[str]) -> str:
    esc = html.escape
    cls = {c: ' class="n"' if c in numeric else "" for c in df.columns}
    head = "".join(f"<th{cls[c]}>{esc(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td{cls[c]}>{esc(str(v))}</td>" for c, v in zip(df.columns, row)) + "</tr>"
                   for row in df.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass
class _Item:
    kind: str  # "figure" | "table" | "text"
    name: str = ""
    caption: str = ""
    png: bytes = b""
    width_in: float = 0.0
    table: pd.DataFrame | None = None
    numeric: list[str] = field(default_factory=list)
    text: str = ""


@dataclass
class _Section:
    title: str
    items: list[_Item] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")


class _Builder:
    """Collects sections; saves every figure (PNG + PDF) and table (CSV + Markdown) as it is added."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.sections: list[_Section] = []
        self.names: dict[str, set[str]] = {"figure": set(), "table": set()}

    def section(self, title: str) -> _Section:
        self.sections.append(_Section(title))
        return self.sections[-1]

    def _name(self, name: str, kind: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or kind
        name, k = base, 2
        while name in self.names[kind]:
            name, k = f"{base}_{k}", k + 1
        self.names[kind].add(name)
        return name

    def figure(self, section: _Section, name: str, fig: Figure, caption: str) -> None:
        name = self._name(name, "figure")
        buf = io.BytesIO()
        with mpl.rc_context(RC):
            fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
            with atomic_path(self.out_dir / "figures" / f"{name}.pdf") as tmp:
                fig.savefig(tmp, format="pdf", facecolor="white", metadata={"CreationDate": None})
        with atomic_path(self.out_dir / "figures" / f"{name}.png") as tmp:
            tmp.write_bytes(buf.getvalue())
        section.items.append(_Item("figure", name, caption, buf.getvalue(), float(fig.get_figwidth())))

    def table(self, section: _Section, name: str, df: pd.DataFrame, caption: str) -> None:
        name = self._name(name, "table")
        shown, numeric = _display(df)
        write_text(self.out_dir / "tables" / f"{name}.csv", df.to_csv(index=False))
        write_text(self.out_dir / "tables" / f"{name}.md", f"{caption}\n\n{_md_table(shown, numeric)}\n")
        section.items.append(_Item("table", name, caption, table=shown, numeric=numeric))

    def text(self, section: _Section, text: str) -> None:
        section.items.append(_Item("text", text=text))


# ---------------------------------------------------------------------------------------------------- loading
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


def _read_results(exp_dir: Path) -> pd.DataFrame:
    if (exp_dir / "results.parquet").is_file():
        return pd.read_parquet(exp_dir / "results.parquet")
    return pd.read_csv(exp_dir / "results.csv")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


@dataclass
class _Experiment:
    path: Path
    name: str
    results: pd.DataFrame
    config: dict[str, Any]
    environment: dict[str, Any]
    tables: dict[str, pd.DataFrame]


def _run_chains(exp_dir: Path) -> list[dict[str, Any]]:
    """Each chain as it appears in the results (with its sweep point), its stages read back from the trained nodes:
    task, replay and the resolved lr. This also covers sweeps, where experiment.yaml holds only the first point."""
    chains: dict[str, dict[str, Any]] = {}
    for path in sorted((exp_dir / "runs").glob("*/run.json")):
        run = read_json(path)
        metas = [exp_dir / "stages" / d / "node.json" for d in run.get("stages", [])[1:]]
        if run.get("chain") in chains or not metas or not all(m.is_file() for m in metas):
            continue
        stages = [read_json(m)["stage"] | {"lr": read_json(m)["training"]["lr"]} for m in metas]
        chains[run["chain"]] = {"name": run["chain"], "stages": stages}
    return list(chains.values())


def _load(exp_dir: Path) -> _Experiment:
    from chaintune.summary import summary_tables

    config = _read_yaml(exp_dir / "experiment.yaml")
    config["chains"] = _run_chains(exp_dir) or config.get("chains", [])
    env = read_json(exp_dir / "environment.json") if (exp_dir / "environment.json").is_file() else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tables = summary_tables(exp_dir)
    except ChaintuneError:  # results without per-run metrics: the sections that need them are skipped
        tables = {}
    return _Experiment(exp_dir, str(config.get("name") or exp_dir.name), _read_results(exp_dir), config, env, tables)


# ---------------------------------------------------------------------------------------------------- sections
def _findings(b: _Builder, exp: _Experiment, tag: str, prefix: str) -> None:
    from chaintune.summary import findings

    if not exp.tables:
        return
    answers = findings(exp.path, exp.tables)
    if not answers:
        return
    sec = b.section(f"Findings{tag}")
    for question, lines in answers.items():
        items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
        b.text(sec, f"<p><b>{html.escape(question)}</b></p><ul>{items}</ul>")


def _ci_note(tables: Mapping[str, pd.DataFrame], key: str) -> str:
    df = tables.get(key)
    seeds = int(df["seeds"].max()) if df is not None and "seeds" in df.columns and len(df) else 0
    return ("Error bars: 95% t-interval over seeds." if seeds > 1 else
            "One seed: no interval over seeds (run more seeds for error bars).")


def _overview(b: _Builder, exp: _Experiment, tag: str, prefix: str) -> None:
    sec = b.section(f"Overview{tag}")
    t, res = exp.tables, exp.results
    routes = chain_tasks(res)
    chains = ", ".join(f"{c} ({' → '.join(ts)})" for c, ts in routes.items())
    seeds = sorted({int(s) for s in res["seed"].unique()})
    b.text(sec, f"Experiment <b>{html.escape(exp.name)}</b>: chains {html.escape(chains)}; seeds {seeds}; "
                f"evaluated tasks {html.escape(', '.join(map(str, dict.fromkeys(res['eval_task']))))}. "
                "Accuracies are in percentage points (pp); F = R[s][A] − R[K][A] (positive = forgotten), "
                "RF = 100·F / R[s][A] (%).")
    mats = accuracy_matrices(res)
    if mats:
        b.figure(sec, f"{prefix}accuracy_matrix", plot_accuracy_matrices(mats),
                 "Accuracy matrix R[s][t] per chain (mean over seeds, pp): rows = the model after each stage "
                 "(0 = base), columns = evaluated tasks.")
        long = pd.concat([R.reset_index().assign(chain=c) for c, R in mats.items()], ignore_index=True)
        b.table(sec, f"{prefix}accuracy_matrix", long[["chain"] + [c for c in long.columns if c != "chain"]],
                "Accuracy matrix (mean over seeds, pp).")
    if "learning_gain" in t:
        b.table(sec, f"{prefix}learning_gain", t["learning_gain"],
                "Learning gain G = R[s][t_s] − R[s−1][t_s] of each stage on its own task (pp; should be > 1).")
    if "forgetting" in t:
        b.figure(sec, f"{prefix}forgetting", plot_forgetting(t["forgetting"], routes),
                 "Forgetting F (pp) and relative forgetting RF (%) of the earlier task after the last stage, both "
                 f"orders of every task pair side by side. {_ci_note(t, 'forgetting')}")
        b.table(sec, f"{prefix}forgetting", t["forgetting"], "Forgetting F (pp) and relative forgetting RF (%), mean "
                "over seeds [95% CI].")
    if "order_asymmetry" in t and not t["order_asymmetry"].empty:
        b.table(sec, f"{prefix}order_asymmetry", t["order_asymmetry"],
                "Order asymmetry: RF(A→B) vs RF(B→A), difference [95% Welch CI] and Welch t-test p.")
    notes = []
    for path in sorted(exp.path.glob("runs/*/metrics.json")):
        for w in read_json(path).get("warnings", []):
            notes.append(f"{path.parent.name}: {w}")
    if notes:
        shown = notes[:12] + ([f"… and {len(notes) - 12} more"] if len(notes) > 12 else [])
        b.text(sec, "Warnings from the metrics:<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in shown) + "</ul>")


def _groups(b: _Builder, exp: _Experiment, tag: str, prefix: str) -> None:
    t = exp.tables
    if "group_forgetting" not in t and "biased_forgetting" not in t:
        return
    sec = b.section(f"Per-group (biased) forgetting{tag}")
    min_size = exp.config.get("min_group_size")
    if "group_forgetting" in t:
        g = t["group_forgetting"]
        for (chain, task), part in g.groupby(["chain", "task"], sort=False):
            b.figure(sec, f"{prefix}group_forgetting_{chain}_{task}", plot_group_forgetting(part, min_size),
                     f"{chain}: forgetting F_g (pp) of every {task} group; dashed = task-average F, so a bar above "
                     f"it is forgotten more than the task (BF_g = F_g − F > 0). Hatched grey = fewer than "
                     f"{min_size or 'min_group_size'} test questions: shown, but left out of the BF summaries. "
                     f"{_ci_note(t, 'group_forgetting')}")
        b.table(sec, f"{prefix}group_forgetting", g, "Per-group forgetting F_g and biased forgetting BF_g = F_g − F "
                "(pp), mean over seeds [95% CI]; included = counted in the summaries.")
    if "biased_forgetting" in t:
        b.table(sec, f"{prefix}biased_forgetting", t["biased_forgetting"],
                "Biased-forgetting summaries over included groups: BF_max = max |BF_g|, BF_spread = max F_g − "
                "min F_g, BF_std (pp); '—' when no group is large enough.")


def _bbq(b: _Builder, exp: _Experiment, tag: str, prefix: str) -> None:
    df = exp.tables.get("bbq_bias")
    if df is None or df.empty:
        return
    sec = b.section(f"BBQ bias scores{tag}")
    overall = _overall(exp.results)
    for (chain, task), part in df.groupby(["chain", "task"], sort=False):
        names = dict(overall[overall.chain == chain].drop_duplicates("stage")[["stage", "stage_name"]].values)
        b.figure(sec, f"{prefix}bbq_bias_{chain}_{task}", plot_bbq_bias(part, {int(k): v for k, v in names.items()}),
                 f"{chain}: {task} bias scores per category after each stage (−100…100; 0 = unbiased, > 0 = "
                 f"answers follow the stereotype). {_ci_note(exp.tables, 'bbq_bias')}")
    b.table(sec, f"{prefix}bbq_bias", df, "BBQ bias scores s_DIS and s_AMB per stage and category, mean over seeds "
            "[95% CI].")


def _curvature(b: _Builder, exp: _Experiment, tag: str, prefix: str) -> None:
    t = exp.tables
    if "curvature" not in t:
        return
    sec = b.section(f"Curvature{tag}")
    points = t.get("curvature_points")
    b.figure(sec, f"{prefix}curvature", plot_curvature(t["curvature"], points),
             f"Largest Hessian eigenvalue λ_max of the stage's training loss after the stage (dots: seeds). "
             f"{_ci_note(t, 'curvature')}")
    b.table(sec, f"{prefix}curvature", t["curvature"], "λ_max after the stage, mean over seeds [95% CI].")
    if points is not None and not points.empty:
        corr = t.get("curvature_vs_forgetting")
        b.figure(sec, f"{prefix}curvature_vs_forgetting", plot_curvature_vs_forgetting(points, corr),
                 "Curvature after the first stage vs later forgetting of that stage's task, one point per run, with "
                 "the least-squares line over all runs (Pearson r, p in the legend).")
        if corr is not None and not corr.empty:
            b.table(sec, f"{prefix}curvature_vs_forgetting", corr, "Correlation of λ_max with forgetting after the next stage "
                    "over runs: pooled (task ALL), per first-stage task and per group (Pearson r, Spearman ρ, R² of the "
                    "least-squares line, p-values; `first_stages`: distinct λ_max measurements behind the row).")


def _sweeps(b: _Builder, exps: Sequence[_Experiment]) -> None:
    many = len(exps) > 1
    lr_parts, rp_parts = [], []
    for e in exps:
        lr_parts.append(lr_sweep_points(e.results, e.config).assign(experiment=e.name))
        rp_parts.append(replay_points(e.results, e.config).assign(experiment=e.name))
    lr = pd.concat(lr_parts, ignore_index=True)
    rp = pd.concat(rp_parts, ignore_index=True)
    lr = lr[lr.groupby("route")["lr"].transform("nunique") > 1] if not lr.empty else lr
    if lr.empty and rp.empty:
        return
    sec = b.section("Learning-rate and replay sweeps")
    if not lr.empty:
        cols = (["experiment"] if many else []) + ["chain", "seed", "route", "task", "lr", "F", "RF"]
        b.figure(sec, "lr_forgetting", plot_lr_forgetting(lr),
                 "Forgetting of the first task vs the first stage's learning rate (mean over seeds, 95% CI; dots: "
                 "seeds).")
        b.table(sec, "lr_sweep", lr[cols], "Per run: first-stage learning rate and forgetting of the first task "
                "after the last stage (F in pp, RF in %).")
    if not rp.empty:
        cols = (["experiment"] if many else []) + list(rp.columns.drop("experiment"))
        b.figure(sec, "replay", plot_replay(rp),
                 "Replay: recovery = (R[r][S] − R[r−1][S]) / (R[s_S][S] − R[r−1][S]) (% of the forgetting undone) "
                 "and capability cost = R[r−1][C] − R[r][C] (pp) vs the replay fraction f (mean over seeds, 95% CI).")
        from chaintune.metrics import smallest_recovering_fraction

        rows = []
        for (s, c), part in rp.groupby(["safety_task", "capability_task"], sort=False):
            rec = _mean_ci(part, ["fraction"], "recovery").rename(columns={
                "mean": "recovery", "ci_low": "recovery_ci_low", "ci_high": "recovery_ci_high"})
            cost = _mean_ci(part, ["fraction"], "capability_cost").rename(columns={
                "mean": "capability_cost", "ci_low": "capability_cost_ci_low", "ci_high": "capability_cost_ci_high"})
            merged = rec.drop(columns=["note", "std"]).merge(cost.drop(columns=["note", "std", "n"]), on="fraction")
            smallest = smallest_recovering_fraction(part)
            rows.append(merged.assign(safety_task=s, capability_task=c,
                                      smallest_recovering_fraction=smallest if smallest is not None else math.nan))
        summary = pd.concat(rows, ignore_index=True).rename(columns={"n": "seeds"})
        front = ["safety_task", "capability_task", "fraction"]
        b.table(sec, "replay_summary", summary[front + [c for c in summary.columns if c not in front]],
                "Replay per fraction f: recovery (fraction, 1 = all forgetting undone) and capability cost (pp), "
                "mean over seeds [95% CI]; smallest f with mean recovery ≥ 0.9.")
        b.table(sec, "replay_runs", rp[cols], "Replay per run.")


def _node_table(exp_dir: Path) -> pd.DataFrame:
    rows = []
    for meta_path in sorted(exp_dir.glob("stages/*/node.json")):
        meta = read_json(meta_path)
        folder = meta_path.parent
        eval_s = sum(float(read_json(p).get("seconds", 0) or 0) for p in folder.glob("eval/*.json"))
        curv = read_json(folder / "curvature.json").get("seconds") if (folder / "curvature.json").is_file() else None
        rows.append({"node": folder.name, "task": meta.get("task"), "seed": meta.get("seed"),
                     "method": (meta.get("training") or {}).get("method"), "lr": (meta.get("training") or {}).get("lr"),
                     "examples": meta.get("n_train_examples"), "steps": meta.get("steps"), "tokens": meta.get("tokens"),
                     "train_s": meta.get("train_seconds"), "tokens_per_s": meta.get("tokens_per_second"),
                     "eval_s": eval_s, "curvature_s": curv})
    base_eval = sum(float(read_json(p).get("seconds", 0) or 0) for p in exp_dir.glob("stages/base*/eval/*.json"))
    if rows or base_eval:
        rows.insert(0, {"node": "base", "task": None, "seed": None, "eval_s": base_eval})
    return pd.DataFrame(rows)


def _seconds(v: float) -> str:
    v = float(v)
    return f"{v:.0f} s" if v < 120 else f"{v / 60:.1f} min" if v < 7200 else f"{v / 3600:.1f} h"


def _training(b: _Builder, exp: _Experiment, tag: str, prefix: str) -> None:
    sec = b.section(f"Training and run metadata{tag}")
    curves = training_curves(exp.path)
    if not curves.empty:
        b.figure(sec, f"{prefix}training_curves", plot_training_curves(curves),
                 "Training loss per optimizer step (mean cross-entropy over answer tokens); stages end to end, one "
                 "line per seed.")
    cfg, env = exp.config, exp.environment
    nodes = _node_table(exp.path)
    packages = env.get("packages") or {}
    meta = {"experiment": exp.name, "run directory": str(exp.path),
            "model": cfg.get("model") or "embedded SmolLM2-135M-Instruct",
            "data dir": env.get("data_dir") or cfg.get("data_dir") or "—",
            "seeds": ", ".join(map(str, cfg.get("seeds", sorted(exp.results["seed"].unique())))),
            "training": ", ".join(f"{k}={v}" for k, v in (cfg.get("training") or {}).items()
                                  if k in ("method", "lr", "batch_size", "grad_accum", "epochs", "scheduler")),
            "git sha": env.get("git_sha") or "—", "started (UTC)": env.get("time_utc") or "—",
            "device": f"{env.get('device', '—')} ({env.get('device_name', '—')})",
            "python": env.get("python") or "—", "platform": env.get("platform") or "—",
            "versions": ", ".join(f"{k} {v}" for k, v in packages.items()) or "—"}
    if not nodes.empty:
        total = {c: float(pd.to_numeric(nodes[c], errors="coerce").sum()) for c in ("train_s", "eval_s", "curvature_s")
                 if c in nodes.columns}
        meta["wall time"] = (f"{_seconds(sum(total.values()))} (training {_seconds(total.get('train_s', 0))}, "
                             f"evaluation {_seconds(total.get('eval_s', 0))}, curvature "
                             f"{_seconds(total.get('curvature_s', 0))}; each shared stage counted once)")
    b.table(sec, f"{prefix}run_metadata", pd.DataFrame({"key": list(meta), "value": [str(v) for v in meta.values()]}),
            "Run metadata (experiment.yaml, environment.json, stages/*/node.json).")
    if not nodes.empty:
        b.table(sec, f"{prefix}stages", nodes, "Trained stages (shared prefixes trained once): examples, steps, "
                "tokens, seconds spent training, evaluating and measuring curvature.")


# ---------------------------------------------------------------------------------------------------- rendering
PX_PER_INCH = 130  # on-screen size of the figures: 7 in → 910 px, 8 pt text → ~14 px

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;font-size:15px;line-height:1.45;
color:#222;max-width:1040px;margin:0 auto;padding:24px 28px 60px;background:#fff}
h1{font-size:1.6em;margin:0 0 .2em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:2.2em}.meta{color:#555;font-size:.9em}nav{background:#f6f7f9;border:1px solid #e3e5e8;padding:8px 16px;
border-radius:4px;font-size:.92em}nav ol{margin:.3em 0;padding-left:1.4em}figure{margin:1.4em 0}
figure img{max-width:100%;height:auto;display:block;border:1px solid #eee}figcaption,.caption{font-size:.88em;
color:#444;margin-top:.35em}table{border-collapse:collapse;font-size:.8em;margin:.4em 0 1.2em;display:block;
overflow-x:auto;max-width:100%}th,td{border:1px solid #ddd;padding:2px 7px;text-align:left;white-space:nowrap}
th{background:#f2f3f5}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafbfc}
details{margin:.4em 0 1.2em}summary{cursor:pointer;font-size:.88em;color:#333}
"""


def _html(b: _Builder, title: str, subtitle: str) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><p class=\"meta\">{html.escape(subtitle)}</p>", "<nav><ol>"]
    parts += [f'<li><a href="#{s.anchor}">{html.escape(s.title)}</a></li>' for s in b.sections]
    parts.append("</ol></nav>")
    for s in b.sections:
        parts.append(f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>')
        for it in s.items:
            if it.kind == "text":
                parts.append(f"<p>{it.text}</p>")  # built here from escaped pieces
            elif it.kind == "figure":
                data = base64.b64encode(it.png).decode("ascii")
                parts.append(f'<figure id="fig-{it.name}"><img src="data:image/png;base64,{data}" '
                             f'alt="{html.escape(it.name)}" style="width:{it.width_in * PX_PER_INCH:.0f}px">'
                             f"<figcaption><b>{html.escape(it.name)}</b>: {html.escape(it.caption)}</figcaption>"
                             "</figure>")
            else:
                assert it.table is not None
                table = _html_table(it.table, it.numeric)
                caption = f'<p class="caption"><b>{html.escape(it.name)}</b>: {html.escape(it.caption)}</p>'
                if len(it.table) > 25:
                    table = (f"<details><summary>{len(it.table)} rows (click to show; also "
                             f"tables/{html.escape(it.name)}.csv)</summary>{table}</details>")
                parts.append(caption + table)
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _markdown(b: _Builder, title: str, subtitle: str) -> str:
    lines = [f"# {title}", "", subtitle, ""]
    lines += [f"{i}. [{s.title}](#{s.anchor})" for i, s in enumerate(b.sections, start=1)] + [""]
    for s in b.sections:
        lines += [f"## {s.title}", ""]
        for it in s.items:
            if it.kind == "text":
                text = re.sub(r"</?b>", "**", re.sub(r"<li>", "\n- ", it.text))
                lines += [html.unescape(re.sub(r"<[^>]+>", "", text)), ""]
            elif it.kind == "figure":
                lines += [f"![{it.name}](figures/{it.name}.png)", "", f"*{it.name}*: {it.caption}", ""]
            else:
                assert it.table is not None
                lines += [f"*{it.name}*: {it.caption}", "", _md_table(it.table, it.numeric), ""]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path, out: str | Path | None = None, fmt: str = "html") -> Path:
    """Write the report of a finished experiment (or of a sweep folder holding several) and return its path.

    `out`: the report file, or a folder for `report.html` / `report.md` (default `<run_dir>/report/`); figures go to
    `<out's folder>/figures/` (PNG + PDF) and tables to `<out's folder>/tables/` (CSV + Markdown). `fmt="html"`
    embeds every figure as a base64 PNG (one self-contained file, no external resources); `fmt="md"` writes
    Markdown that references the PNG files. Every file is written atomically.
    """
    if fmt not in ("html", "md"):
        raise ChaintuneError(f"unknown report format '{fmt}'", "use --format html or --format md")
    run_dir = Path(run_dir)
    dirs = _experiment_dirs(run_dir)
    out = Path(out) if out is not None else run_dir / "report"
    if out.is_dir() or not out.suffix:  # a folder: the report goes inside it
        out = out / f"report.{fmt}"
    out_dir = out.parent
    exps = [_load(d) for d in dirs]
    b = _Builder(out_dir)
    def tags(e: _Experiment) -> tuple[str, str]:  # in a sweep, titles and file names carry the experiment folder
        return (f" — {e.path.name}", f"{e.path.name}_") if len(exps) > 1 else ("", "")

    for e in exps:
        for build in (_findings, _overview, _groups, _bbq, _curvature):
            build(b, e, *tags(e))
    _sweeps(b, exps)
    for e in exps:
        _training(b, e, *tags(e))
    title = f"chaintune report: {exps[0].name if len(exps) == 1 else run_dir.name}"
    subtitle = (f"{run_dir.resolve()} · {len(exps)} experiment(s) · generated "
                f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} · {len(b.names['figure'])} figures "
                f"(PNG + PDF in figures/), {len(b.names['table'])} tables (CSV + Markdown in tables/)")
    text = _html(b, title, subtitle) if fmt == "html" else _markdown(b, title, subtitle)
    write_text(out, text)
    return out
