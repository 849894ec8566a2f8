"""The stage quality gate: a held-out validation slice of each stage's train split, the task's baselines on it, and
the verdict. A stage **failed** when its training loss diverged, when its validation accuracy is below the
majority-class baseline, or when it gained less than `min_gain` pp on the slice (accuracy after − before the stage;
`min_gain_repeated` when an earlier stage of its chain trained the same task).

A finding measured after a stage that did not learn its own task is no finding: analysis excludes runs with a failed
stage from its summaries and says which and why (chaintune.analysis), `chaintune plan` lists them.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

from chaintune.tasks import Example
from chaintune.tasks.splits import stable_seed, subsample

MAX_VALIDATION_SHARE = 5  # the slice takes at most 1/5 of a train split: the stage keeps ≥ 80 % to train on


def validation_count(pool_size: int, size: int) -> int:
    """Examples held out of a train split of `pool_size`: `size`, capped at a fifth of the split."""
    return min(size, pool_size // MAX_VALIDATION_SHARE)


def split_validation(pool: Sequence[Example], size: int, data_seed: int, task: str
                     ) -> tuple[list[Example], list[Example]]:
    """(rest, validation) of a task's train split: the validation slice is drawn seeded by `data_seed` and
    stratified by group, so every run seed and every stage on the task holds out the same examples; `rest` keeps the
    split's order. size 0 → (pool, [])."""
    n = validation_count(len(pool), size)
    if n == 0:
        return list(pool), []
    validation = subsample(list(pool), n, data_seed, group=lambda e: e.group, salt=f"{task}/validation")
    held = {id(e) for e in validation}
    return [e for e in pool if id(e) not in held], validation


def train_seed(seed: int, attempt: int) -> int:
    """The training seed of attempt `attempt` (0-based) of a stage of run seed `seed`: the seed itself first, then
    a new seed derived from both (retries draw fresh data order, dropout and LoRA init)."""
    return seed if attempt == 0 else stable_seed("gate-retry", seed, attempt) % 2**31


def _answer(example: Example) -> str:
    return example.choices[example.gold].strip().lower()


def majority_baseline(train: Sequence[Example], validation: Sequence[Example]) -> tuple[float, str]:
    """Accuracy (pp) on `validation` of the best constant answer learned from `train`, and the rule.

    Two constant answers are tried on `train`: the most frequent gold position ("position 2") and the most frequent
    gold answer text ("answer 'no'", for tasks whose choices repeat, such as yes/no). The one more accurate on
    `train` is scored on `validation` (choosing on the validation slice itself would flatter the baseline).
    Ties go to the lower position / alphabetically first text."""
    if not train or not validation:
        return math.nan, "no examples"
    positions = Counter(e.gold for e in train)
    position = min(positions, key=lambda p: (-positions[p], p))
    texts = Counter(_answer(e) for e in train)
    text = min(texts, key=lambda t: (-texts[t], t))
    if texts[text] > positions[position]:
        hits = sum(_answer(e) == text for e in validation)
        return 100.0 * hits / len(validation), f"answer '{text}'"
    return 100.0 * sum(e.gold == position for e in validation) / len(validation), f"position {position}"


def chance_baseline(validation: Sequence[Example]) -> float:
    """Expected accuracy (pp) of a uniform random guess over each question's choices."""
    return 100.0 * sum(1 / len(e.choices) for e in validation) / len(validation) if validation else math.nan


def loss_ends(losses: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean training loss (nats) of the first and of the last tenth of the steps (at least one step each)."""
    if not losses:
        return None, None
    k = max(1, len(losses) // 10)
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


def diverged(losses: Sequence[float], factor: float) -> bool:
    """True if a loss is not finite, or the last tenth's mean loss exceeds `factor` × the first tenth's."""
    if any(not math.isfinite(x) for x in losses):
        return True
    first, last = loss_ends(losses)
    return first is not None and last > factor * first


def failure_reasons(*, is_diverged: bool, val_acc: float, val_acc_before: float, majority: float,
                    min_gain: float | None) -> list[str]:
    """Why a stage failed its gate (empty: it passed). Accuracies in pp; `min_gain` None: no gain requirement."""
    reasons = []
    if is_diverged:
        reasons.append("training loss diverged")
    if val_acc < majority:
        reasons.append(f"validation accuracy {val_acc:.1f} % below the majority baseline {majority:.1f} %")
    gain = val_acc - val_acc_before
    if min_gain is not None and gain < min_gain:
        reasons.append(f"gained {gain:+.1f} pp on its validation slice (< {min_gain:g} pp)")
    return reasons
