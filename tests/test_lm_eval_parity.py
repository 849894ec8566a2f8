"""chaintune's multiple-choice log-likelihoods equal lm-evaluation-harness HFLM's (SPEC.md §3)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from lm_eval_parity import TOLERANCE, compare  # noqa: E402

from chaintune.errors import DataError  # noqa: E402
from chaintune.tasks import default_data_dir, load_task  # noqa: E402


def _examples(spec: list[tuple[str, int]]) -> list:
    """Real test questions, or a skip when the evaluation data is not available here."""
    try:
        if default_data_dir() is None:
            pytest.skip("no evaluation data directory (../shared/data or CHAINTUNE_DATA_DIR)")
        return [ex for task, n in spec for ex in load_task(task, "test", limit=n)]
    except DataError as exc:
        pytest.skip(f"evaluation data not available: {exc}")


def _check(result: dict) -> None:
    assert result["max_abs_delta"] < TOLERANCE, result["max_abs_delta"]
    assert result["argmax_differs"] == 0
    assert result["argmax_norm_differs"] == 0
    assert result["chaintune_acc"] == result["lm_eval_acc"]
    assert result["chaintune_acc_norm"] == result["lm_eval_acc_norm"]


def test_parity_tiny_llama_real_questions() -> None:
    pytest.importorskip("lm_eval")
    from chaintune.models import tiny_llama

    examples = _examples([("arc_challenge", 15), ("toxigenqa", 15)])
    model, tokenizer = tiny_llama()
    result = compare(model, tokenizer, examples, batch_size=8)
    assert result["n_questions"] == 30
    _check(result)


@pytest.mark.slow
def test_parity_embedded_arc_challenge_200() -> None:
    pytest.importorskip("lm_eval")
    from chaintune.models import load_model

    examples = _examples([("arc_challenge", 200)])
    model, tokenizer = load_model()
    _check(compare(model, tokenizer, examples, batch_size=16))
