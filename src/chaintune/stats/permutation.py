"""Permutation test of a difference in means between two labelled sets of runs (e.g. the two orders of a pair)."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

__all__ = ["PermutationTest", "permutation_test"]


@dataclass(frozen=True)
class PermutationTest:
    """Observed difference of means (first − second, the values' unit), two-sided p-value, how many label
    assignments were evaluated and whether that was all of them (`exact`)."""

    difference: float
    p_value: float
    n_permutations: int
    exact: bool
    note: str = ""


def _assignments(sizes: Sequence[tuple[int, int]], max_exact: int, n_resamples: int,
                 rng: np.random.Generator) -> tuple[list[np.ndarray], bool]:
    """Per stratum, a (P, n1 + n2) bool array: True = labelled 'first' in permutation p (every one when few)."""
    total = math.prod(math.comb(n1 + n2, n1) for n1, n2 in sizes)
    if total <= max_exact:
        per = []
        for n1, n2 in sizes:
            rows = [np.isin(np.arange(n1 + n2), c) for c in itertools.combinations(range(n1 + n2), n1)]
            per.append(np.array(rows, dtype=bool))
        grids = np.meshgrid(*[np.arange(len(p)) for p in per], indexing="ij")
        return [p[g.ravel()] for p, g in zip(per, grids)], True
    out = []
    for n1, n2 in sizes:
        keys = rng.random((n_resamples, n1 + n2))
        out.append(np.argsort(keys, axis=1) < n1)
    return out, False


def permutation_test(strata: Iterable[tuple[Iterable[float], Iterable[float]]], max_exact: int = 20_000,
                     n_resamples: int = 10_000, seed: int = 0) -> PermutationTest:
    """Two-sided permutation test of mean(first) − mean(second), pooled over strata.

    `strata`: (first values, second values) per stratum, e.g. per task pair (RF of each run in the S→C chain, RF of
    each run in the C→S chain); labels are permuted within each stratum only. Exact (every assignment, the observed
    one included) when the number of assignments is at most `max_exact`, else `n_resamples` random ones (seeded)
    with p = (1 + #{|diff*| ≥ |diff|}) / (1 + n_resamples). Non-finite values are dropped; a stratum needs a value
    on each side."""
    pairs = []
    for first, second in strata:
        a, b = np.asarray(list(first), dtype=float), np.asarray(list(second), dtype=float)
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        if a.size and b.size:
            pairs.append((a, b))
    if not pairs:
        return PermutationTest(math.nan, math.nan, 0, False, "no stratum has values on both sides")
    values = [np.concatenate([a, b]) for a, b in pairs]
    n_first = sum(a.size for a, _ in pairs)
    n_second = sum(b.size for _, b in pairs)
    observed = float(np.concatenate([a for a, _ in pairs]).mean() - np.concatenate([b for _, b in pairs]).mean())
    labels, exact = _assignments([(a.size, b.size) for a, b in pairs], max_exact, n_resamples,
                                 np.random.default_rng(seed))
    sum_first = sum((lab * v[None, :]).sum(axis=1) for lab, v in zip(labels, values))
    total = sum(v.sum() for v in values)
    diffs = sum_first / n_first - (total - sum_first) / n_second
    extreme = int(np.sum(np.abs(diffs) >= abs(observed) - 1e-12 * max(1.0, abs(observed))))
    p = extreme / diffs.size if exact else (1 + extreme) / (1 + diffs.size)
    return PermutationTest(observed, float(min(1.0, p)), int(diffs.size), exact)
