"""Deterministic, leak-free splitting and subsampling."""
from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from typing import Callable, Hashable, Sequence, TypeVar

T = TypeVar("T")


def stable_seed(*parts: object) -> int:
    """A seed derived from `parts` that is identical across processes and Python versions."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def drop_duplicates(items: Sequence[T], key: Callable[[T], Hashable]) -> list[T]:
    """Keep the first item of each key (exact duplicates are removed before splitting)."""
    seen: set[Hashable] = set()
    kept = []
    for item in items:
        k = key(item)
        if k not in seen:
            seen.add(k)
            kept.append(item)
    return kept


def n_test(n: int, test_fraction: float) -> int:
    """round(n × test_fraction), but at least 1 test and 1 train item when n > 1."""
    return min(n - 1, max(1, round(n * test_fraction))) if n > 1 else 0


def stratified_split(items: Sequence[T], stratum: Callable[[T], Hashable], test_fraction: float,
                     seed: int, salt: str) -> tuple[list[T], list[T]]:
    """Split items into (train, test), taking `test_fraction` of every stratum; original order is kept."""
    by_stratum: dict[Hashable, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        by_stratum[stratum(item)].append(i)
    test_idx: set[int] = set()
    for key in sorted(by_stratum, key=str):
        idx = by_stratum[key]
        rng = random.Random(stable_seed(salt, seed, key))
        test_idx.update(rng.sample(idx, n_test(len(idx), test_fraction)))
    train = [x for i, x in enumerate(items) if i not in test_idx]
    test = [x for i, x in enumerate(items) if i in test_idx]
    return train, test


def grouped_split(items: Sequence[T], unit: Callable[[T], Hashable], stratum: Callable[[T], Hashable],
                  test_fraction: float, seed: int, salt: str) -> tuple[list[T], list[T]]:
    """Split by whole units (e.g. templates) so no unit straddles train and test; units are drawn per stratum."""
    units_by_stratum: dict[Hashable, set[Hashable]] = defaultdict(set)
    for item in items:
        units_by_stratum[stratum(item)].add(unit(item))
    test_units: set[Hashable] = set()
    for key in sorted(units_by_stratum, key=str):
        units = sorted(units_by_stratum[key], key=str)
        rng = random.Random(stable_seed(salt, seed, key))
        test_units.update(rng.sample(units, n_test(len(units), test_fraction)))
    train = [x for x in items if unit(x) not in test_units]
    test = [x for x in items if unit(x) in test_units]
    return train, test


def subsample(items: Sequence[T], limit: int | None, seed: int, group: Callable[[T], Hashable] | None = None,
              salt: str = "limit") -> list[T]:
    """At most `limit` items, drawn seeded and stratified by `group` (largest-remainder allocation); order kept."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit <= 0:
        return []
    by_group: dict[Hashable, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        by_group[group(item) if group else None].append(i)
    keys = sorted(by_group, key=str)
    exact = {k: limit * len(by_group[k]) / len(items) for k in keys}
    quota = {k: int(exact[k]) for k in keys}
    leftover = limit - sum(quota.values())
    for k in sorted(keys, key=lambda k: (-(exact[k] - quota[k]), str(k)))[:leftover]:
        quota[k] += 1
    chosen: list[int] = []
    for k in keys:
        rng = random.Random(stable_seed(salt, seed, k))
        chosen.extend(rng.sample(by_group[k], quota[k]))
    return [items[i] for i in sorted(chosen)]
