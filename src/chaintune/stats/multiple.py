"""Multiple comparisons: adjusted p-values for a family of statements (e.g. every group of one chain × task)."""
from __future__ import annotations

from typing import Iterable

import numpy as np

__all__ = ["CORRECTIONS", "holm", "benjamini_hochberg", "adjust_p_values", "correction_name"]

CORRECTIONS = ("holm", "bh")


def _prepare(p_values: Iterable[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(all p as floats, positions of the finite ones sorted by p, those sorted p)."""
    p = np.asarray(list(p_values), dtype=float)
    if np.any((p < 0) | (p > 1)):
        raise ValueError("p-values must lie in [0, 1]")
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    return p, order, p[order]


def holm(p_values: Iterable[float]) -> np.ndarray:
    """Holm (1979) step-down adjusted p-values, controlling the family-wise error rate.

    With the m finite p-values sorted, p̃_(i) = max_{j ≤ i} min(1, (m − j + 1) · p_(j)). NaN p-values are not
    tests: they stay NaN and do not count in m. A statement holds at level α when its adjusted p < α."""
    p, order, sorted_p = _prepare(p_values)
    out = np.full(p.shape, np.nan)
    m = sorted_p.size
    out[order] = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * sorted_p))
    return out


def benjamini_hochberg(p_values: Iterable[float]) -> np.ndarray:
    """Benjamini–Hochberg (1995) step-up adjusted p-values (q-values), controlling the false discovery rate.

    With the m finite p-values sorted, p̃_(i) = min_{j ≥ i} min(1, m / j · p_(j)); NaN stays NaN and does not
    count in m."""
    p, order, sorted_p = _prepare(p_values)
    out = np.full(p.shape, np.nan)
    m = sorted_p.size
    scaled = np.minimum(1.0, m / np.arange(1, m + 1) * sorted_p)
    out[order] = np.minimum.accumulate(scaled[::-1])[::-1]
    return out


def adjust_p_values(p_values: Iterable[float], method: str = "holm") -> np.ndarray:
    """`holm` or `bh` (Benjamini–Hochberg) adjusted p-values of one family."""
    if method == "holm":
        return holm(p_values)
    if method == "bh":
        return benjamini_hochberg(p_values)
    raise ValueError(f"correction must be one of {CORRECTIONS}, got {method!r}")


def correction_name(method: str) -> str:
    """The correction's name as written in tables and findings."""
    return {"holm": "Holm", "bh": "Benjamini–Hochberg"}[method]
