"""The training loop's results stay what they were before the speed work of issue 20: seeded stages on the tiny
Llama give the loss / gradient-norm curves that the code of 3660c6a wrote to tests/fixtures/reference_curves.json
(`python tests/test_train_reference.py make` rewrote them, with that code on PYTHONPATH). The default path must match
to float-reduction tolerance; the compiled path (slow) to the same."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

REFERENCE = Path(__file__).resolve().parent / "fixtures" / "reference_curves.json"
WORDS = ("the quick brown fox jumps over the lazy dog which gas do plants absorb from the air carbon dioxide oxygen "
         "water vapor statement people group job math information").split()
CASES = {
    "full": dict(method="full", lr=3e-3, batch_size=4, grad_accum=2, max_steps=8, scheduler="cosine",
                 warmup_steps=2, weight_decay=0.01),
    "lora": dict(method="lora", lr=2e-2, batch_size=4, max_steps=8, lora={"r": 4, "alpha": 8}),
    "sam_l2": dict(method="full", lr=3e-3, batch_size=6, max_steps=6, optimizer="sam", l2_prev=0.1),
}
RTOL = 1e-5  # the default path: float-reduction differences only (measured: 2.3e-7, the fused AdamW rounds differently)
RTOL_COMPILED = 1e-5  # fused kernels round differently (measured: 6e-7 at most)


def reference_examples() -> list:
    """40 seeded questions of 3–20 words with 2–4 choices (no data files needed)."""
    from chaintune.tasks import Example

    rng = random.Random(0)
    out = []
    for i in range(40):
        prompt = "Question: " + " ".join(rng.choices(WORDS, k=rng.randint(3, 20))) + "?\nAnswer:"
        choices = tuple(" " + " ".join(rng.choices(WORDS, k=rng.randint(1, 3))) for _ in range(rng.randint(2, 4)))
        out.append(Example(f"r{i}", prompt, choices, rng.randrange(len(choices))))
    return out


def curves(**kwargs) -> dict[str, list[dict[str, float]]]:
    """Each case's curve: loss, grad_norm, lr and tokens per step (extra keyword arguments go to train_stage)."""
    from chaintune.config import TrainingConfig
    from chaintune.models import tiny_llama
    from chaintune.train import attach_lora, train_stage

    out = {}
    for name, spec in CASES.items():
        cfg = TrainingConfig(**spec)
        model, tokenizer = tiny_llama(seed=0)
        if cfg.method == "lora":
            model = attach_lora(model, cfg, seed=3)
        result = train_stage(model, tokenizer, reference_examples(), cfg, seed=3, **kwargs)
        out[name] = [{k: r[k] for k in ("loss", "grad_norm", "lr", "tokens")} for r in result.curve]
    return out


def largest_difference(got: dict, want: dict) -> float:
    """Largest relative difference of loss and grad_norm over all cases and steps (lr and tokens must be equal)."""
    worst = 0.0
    for name, rows in want.items():
        assert len(got[name]) == len(rows), name
        for g, w in zip(got[name], rows):
            assert (g["lr"], g["tokens"]) == (w["lr"], w["tokens"]), name
            worst = max(worst, *(abs(g[k] - w[k]) / abs(w[k]) for k in ("loss", "grad_norm")))
    return worst


def test_seeded_stages_reproduce_the_reference_curves():
    want = json.loads(REFERENCE.read_text())["cases"]
    difference = largest_difference(curves(), want)
    assert difference <= RTOL, f"largest relative difference {difference:.2e}"


@pytest.mark.slow
def test_compiled_decoder_reproduces_the_reference_curves_to_rounding():
    want = json.loads(REFERENCE.read_text())["cases"]
    difference = largest_difference(curves(compile=True), want)
    assert difference <= RTOL_COMPILED, f"largest relative difference {difference:.2e}"


if __name__ == "__main__":
    import subprocess

    if sys.argv[1:] != ["make"]:
        sys.exit("usage: PYTHONPATH=<src of the reference commit> python tests/test_train_reference.py make")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    REFERENCE.write_text(json.dumps({"commit": commit, "cases": curves()}, indent=1) + "\n")
