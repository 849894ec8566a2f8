"""Shared fixtures: the real data directory (skip when absent), a tiny random Llama saved as a model folder, and
small user multiple-choice datasets with a config factory for runs that need no real data."""
from __future__ import annotations

import json
import random
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


@pytest.fixture(scope="session")
def mcq_data_dir(tmp_path_factory) -> Path:
    """A data folder with two user datasets, mcq_a.jsonl and mcq_b.jsonl: 60 three-choice questions each, two groups."""
    path = tmp_path_factory.mktemp("mcq-data")
    rng = random.Random(0)
    words = "the quick brown fox jumps over the lazy dog which gas do plants absorb".split()
    for name in ("mcq_a", "mcq_b"):
        with open(path / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for i in range(60):
                question = f"{name} {i}: " + " ".join(rng.choices(words, k=rng.randint(3, 12))) + "?"
                fh.write(json.dumps({"question": question, "choices": ["yes", "no", "maybe"],
                                     "answer": rng.randrange(3), "grp": f"g{i % 2}"}) + "\n")
    return path


@pytest.fixture(scope="session")
def mcq_config(tiny_model_dir, mcq_data_dir):
    """Factory of experiment configs (dicts) on the tiny model and the mcq_data_dir tasks: a chain mcq_a → mcq_b,
    full fine-tuning, 8 steps per stage with a mid-stage resume state every 3; keyword arguments replace keys."""
    def make(out: Path, **overrides) -> dict:
        cfg = {"name": "mcq", "model": str(tiny_model_dir), "data_dir": str(mcq_data_dir), "output_dir": str(out),
               "custom_tasks": [{"name": t, "path": str(mcq_data_dir / f"{t}.jsonl"), "group": "grp"}
                                for t in ("mcq_a", "mcq_b")],
               "tasks": {t: {"train_limit": 16, "eval_limit": 10} for t in ("mcq_a", "mcq_b")},
               "training": {"lr": 1e-3, "batch_size": 2, "checkpoint_every": 3}, "eval_max_tokens": 64,
               "executor": {"retries": 0},
               "chains": [{"name": "ab", "stages": [{"task": "mcq_a"}, {"task": "mcq_b"}]}]}
        return cfg | overrides

    return make


def isolate(monkeypatch) -> None:
    """Each test starts without this process's loaded model (stage._PROCESS), as in a fresh process."""
    from chaintune import stage

    monkeypatch.setattr(stage, "_PROCESS", {})


@pytest.fixture
def isolated(monkeypatch) -> None:
    isolate(monkeypatch)


@pytest.fixture
def mcq_experiment(mcq_config, isolated):
    """mcq_config, with the stage executor's model cache isolated for this test."""
    return mcq_config


@pytest.fixture(scope="module")
def module_isolation():
    """isolate() for module-scoped fixtures that run experiments."""
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp)
        yield
