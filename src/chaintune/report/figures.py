"""The report's figures, one public `plot_*` function each: tables in, a `matplotlib.figure.Figure` out.

Figures are created without pyplot (no GUI backend, no global figure state) and built under the report's rcParams
(`chaintune.report.style.RC`) without touching the caller's settings.
"""
from __future__ import annotations

import math
import textwrap
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from chaintune.analysis.tables import seed_ci
from chaintune.report.style import (
    DOUBLE, GREY, HEATMAP, KIND_COLOURS, MARKERS, PALETTE, SINGLE, _col, _colour_of_kind, _figure, _finite, _kind,
    _pretty, _styled, _yerr, _zero_line,
)
from chaintune.analysis import OVERALL


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
        agg = seed_ci(part.dropna(subset=[y]), [x], y).sort_values(x)
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
