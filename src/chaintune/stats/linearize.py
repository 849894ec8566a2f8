"""Per-question pseudo-values: a run's statistic θ written as the mean over its questions of values y[q].

For a statistic that is not a plain mean over questions (a ratio such as RF or replay recovery, a difference of
group means such as BF_g, a summary over groups such as BF_spread), each run's θ is linearised in its questions:
y[q] = θ + (first-order change of θ when question q's values move), so that mean_q y[q] = θ exactly and the
question-to-question spread of y is the delta-method spread of θ. The crossed interval (`stats.crossed`) of the
seeds × questions matrix of y then has the runs' mean θ as its estimate: the seed part of its variance comes from
the runs' θ themselves, the question part from the linearisation.

Shapes: every function takes per-question arrays with questions on the last axis, (Q,) for one run or (S, Q) for
S seeds (or more leading axes), and returns (θ with the leading shape, y with the input shape). `codes`: (Q,) int
group index of every question, −1 for a question in no group. Units: those of the inputs (pp for forgetting).
"""
from __future__ import annotations

import numpy as np

__all__ = ["ratio_pseudo_values", "group_means", "group_pseudo_values", "bf_g_pseudo_values",
           "bf_summary_pseudo_values", "BF_SUMMARIES"]

BF_SUMMARIES = ("BF_max", "BF_spread", "BF_std")


def ratio_pseudo_values(numerator: np.ndarray, denominator: np.ndarray,
                        scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """θ = scale · mean_q num / mean_q den and y[q] = θ + scale · (num[q] − (θ / scale) · den[q]) / mean_q den.

    RF = 100 · F / R[s][A] is scale 100 with num = per-question forgetting d and den = 100 · correct before
    (both pp); replay recovery is scale 1 with num = c_r − c_{r−1} and den = c_{s_S} − c_{r−1}. A run whose
    denominator mean is 0 gets NaN θ and y."""
    num, den = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    if num.shape != den.shape:
        raise ValueError(f"numerator {num.shape} and denominator {den.shape} differ")
    mean_den = den.mean(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        theta = np.where(mean_den != 0, scale * num.mean(axis=-1) / mean_den, np.nan)
        y = theta[..., None] + scale * (num - (theta / scale)[..., None] * den) / mean_den[..., None]
    return theta, y


def _sizes(codes: np.ndarray, n_groups: int) -> np.ndarray:
    return np.bincount(codes[codes >= 0], minlength=n_groups).astype(float)


def group_means(d: np.ndarray, codes: np.ndarray, n_groups: int | None = None) -> np.ndarray:
    """(..., G) mean of d over each group's questions (NaN for a group without questions)."""
    d, codes = np.asarray(d, dtype=float), np.asarray(codes)
    n_groups = int(codes.max()) + 1 if n_groups is None else n_groups
    onehot = (codes[:, None] == np.arange(n_groups)[None, :]).astype(float)  # (Q, G)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (d @ onehot) / _sizes(codes, n_groups)


def group_pseudo_values(d: np.ndarray, codes: np.ndarray, theta: np.ndarray, grad: np.ndarray,
                        grad_all: np.ndarray | float = 0.0) -> np.ndarray:
    """y[q] = θ + grad[g(q)] · (Q / Q_g(q)) · (d[q] − F_g(q)) + grad_all · (d[q] − F) for θ = h(F_1, …, F_G, F).

    `grad`: (..., G) ∂θ/∂F_g; `grad_all`: ∂θ/∂F, F = mean of d over all Q questions. Questions in no group
    (code −1) enter only through F."""
    d, codes = np.asarray(d, dtype=float), np.asarray(codes)
    grad = np.asarray(grad, dtype=float)
    n_groups = grad.shape[-1]
    sizes = _sizes(codes, n_groups)
    f_g = group_means(d, codes, n_groups)
    member = codes >= 0
    safe = np.where(member, codes, 0)
    weight = np.where(member, d.shape[-1] / np.where(sizes[safe] > 0, sizes[safe], 1), 0.0)  # (Q,)
    g_q = np.where(member, grad[..., safe], 0.0)
    fg_q = np.where(member, np.nan_to_num(f_g)[..., safe], 0.0)
    slope_all = np.asarray(grad_all, dtype=float)
    slope_all = slope_all[..., None] if slope_all.ndim else slope_all
    return (np.asarray(theta, dtype=float)[..., None] + g_q * weight * (d - fg_q)
            + slope_all * (d - d.mean(axis=-1, keepdims=True)))


def bf_g_pseudo_values(d: np.ndarray, codes: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """BF_g = F_g − F (F over all questions) of one group index and its pseudo-values."""
    d, codes = np.asarray(d, dtype=float), np.asarray(codes)
    n_groups = max(int(codes.max()) + 1, group + 1)
    theta = group_means(d, codes, n_groups)[..., group] - d.mean(axis=-1)
    grad = np.zeros(d.shape[:-1] + (n_groups,))
    grad[..., group] = 1.0
    return theta, group_pseudo_values(d, codes, theta, grad, -1.0)


def bf_summary_pseudo_values(d: np.ndarray, codes: np.ndarray, included: np.ndarray,
                             kind: str) -> tuple[np.ndarray, np.ndarray]:
    """A biased-forgetting summary over the `included` groups ((G,) bool) and its pseudo-values (SPEC §5):

        BF_max = max_g |F_g − F|,   BF_spread = max_g F_g − min_g F_g,   BF_std = std_g F_g (ddof 0)

    linearised at the run's own maximising / minimising groups (first one on ties); BF_std at 0 has no slope
    (its pseudo-values are then constant). Needs >= 1 included group (>= 2 for BF_spread to be non-zero)."""
    if kind not in BF_SUMMARIES:
        raise ValueError(f"kind must be one of {BF_SUMMARIES}, got {kind!r}")
    d, codes, included = np.asarray(d, dtype=float), np.asarray(codes), np.asarray(included, dtype=bool)
    if not included.any():
        raise ValueError("no included group")
    n_groups = included.size
    f_g = group_means(d, codes, n_groups)
    f_in = np.where(included, f_g, np.nan)
    grad = np.zeros(f_g.shape)
    grad_all = np.zeros(d.shape[:-1])
    if kind == "BF_max":
        bf = np.abs(f_in - d.mean(axis=-1, keepdims=True))
        top = np.nanargmax(bf, axis=-1)
        theta = np.take_along_axis(bf, top[..., None], -1)[..., 0]
        sign = np.sign(np.take_along_axis(f_in, top[..., None], -1)[..., 0] - d.mean(axis=-1))
        np.put_along_axis(grad, top[..., None], sign[..., None], -1)
        grad_all = -sign
    elif kind == "BF_spread":
        hi, lo = np.nanargmax(f_in, axis=-1), np.nanargmin(f_in, axis=-1)
        theta = np.nanmax(f_in, axis=-1) - np.nanmin(f_in, axis=-1)
        np.put_along_axis(grad, hi[..., None], 1.0, -1)
        low = np.take_along_axis(grad, lo[..., None], -1) - 1.0  # hi == lo (one group): slopes cancel
        np.put_along_axis(grad, lo[..., None], low, -1)
    else:
        theta = np.nanstd(f_in, axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = (f_in - np.nanmean(f_in, axis=-1, keepdims=True)) / (included.sum() * theta[..., None])
        grad = np.where(included & np.isfinite(slope), slope, 0.0)
    return theta, group_pseudo_values(d, codes, theta, grad, grad_all)
