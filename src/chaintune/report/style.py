"""The report's figure style: the Okabe–Ito palette, the rcParams, figure sizes, and the small drawing helpers the
`plot_*` functions share (colour by task kind, error bars from CI bounds, a zero line)."""
from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable, Iterable

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

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
