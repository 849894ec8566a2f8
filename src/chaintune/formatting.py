"""Number and table formatting for display, shared by the report (HTML/Markdown tables) and the CLI (terminal tables).

`format_number` renders one cell, `display_frame` a whole table (confidence intervals folded into their value's
column), `format_seconds` a duration. Raw values are never changed: these only build the strings that are shown.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd


def format_number(value: Any, column: str = "") -> str:
    """One table cell as text: None/NaN → '—', bools and integers as they are, floats with 2 decimals, except
    p-values (a `column` ending in '_p' or containing 'p_value': 2 significant digits) and magnitudes >= 1000 or
    below 0.01 (4 significant digits); anything else via `str`."""
    if value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if column.endswith("_p") or "p_value" in column:
            return f"{value:.2g}"
        return f"{value:.4g}" if abs(value) >= 1000 or (value != 0 and abs(value) < 0.01) else f"{value:.2f}"
    return str(value)


def display_frame(df: pd.DataFrame, std: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """A compact all-string copy of `df` for display, and the names of its numeric columns (to right-align).

    `X` with `X_ci_low` / `X_ci_high` becomes one column 'X [low, high]' (likewise `difference` with `ci_low` /
    `ci_high`; just 'X' where the low bound is NaN), or 'X ± sd [low, high]' with `std=True` where `X_std` is
    finite; `X_std` is dropped where `X` is shown so (but a metric such as `BF_std` is kept); every other cell goes
    through `format_number` with its column name.
    """
    out, numeric, drop = {}, [], set()
    for col in df.columns:
        if col in drop:
            continue
        lo, hi = f"{col}_ci_low", f"{col}_ci_high"
        if col == "difference" and {"ci_low", "ci_high"} <= set(df.columns):
            lo, hi = "ci_low", "ci_high"
        if lo in df.columns and hi in df.columns:
            sds = df[f"{col}_std"] if std and f"{col}_std" in df.columns else [None] * len(df)
            out[col] = [format_number(v) + ("" if format_number(sd) == "—" else f" ± {format_number(sd)}")
                        + ("" if format_number(a) == "—" else f" [{format_number(a)}, {format_number(b)}]")
                        for v, sd, a, b in zip(df[col], sds, df[lo], df[hi])]
            drop |= {lo, hi, f"{col}_std"}
        else:
            out[col] = [format_number(v, str(col)) for v in df[col]]
        if df[col].dtype.kind in "fiub":
            numeric.append(col)
    kept = [c for c in df.columns if c not in drop]
    shown = pd.DataFrame({c: out[c] for c in kept}, columns=kept)
    return shown, [c for c in numeric if c in kept]


def format_seconds(seconds: float) -> str:
    """A duration: whole seconds below 2 minutes, minutes (1 decimal) below 2 hours, else hours (1 decimal)."""
    v = float(seconds)
    return f"{v:.0f} s" if v < 120 else f"{v / 60:.1f} min" if v < 7200 else f"{v / 3600:.1f} h"
