"""Shared fixtures: the real data directory (skip when absent) and a tiny random Llama saved as a model folder."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = (REPO / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    if not (REAL_DATA / "toxigen").is_dir():
        pytest.skip(f"real data not found at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama + in-code BPE tokenizer, saved like any Hugging Face model directory."""
    from chaintune.models import tiny_llama

    path = tmp_path_factory.mktemp("tiny-llama")
    model, tokenizer = tiny_llama(seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
