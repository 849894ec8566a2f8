"""The FLOP counts behind every benchmark's `achieved / bound` (bench/bound.py) equal what the matrix products
execute: torch's FLOP counter over a real forward + backward (full and LoRA) and a packed evaluation pass, plus the
attention products, which the counter does not see inside the fused attention kernel."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bound import Shapes, causal_keys, packed_eval_flops, training_flops  # noqa: E402

from chaintune.config import TrainingConfig  # noqa: E402
from chaintune.evaluate import pack_question, pack_rows, score_packed  # noqa: E402
from chaintune.models import tiny_llama  # noqa: E402
from chaintune.tasks import Example  # noqa: E402
from chaintune.train import answer_loss_sum, attach_lora  # noqa: E402


def attention(s: Shapes, keys: int) -> int:
    """Forward FLOPs of the attention products (scores, weighted sum) for `keys` (query, key) pairs."""
    return 4 * s.heads * s.head_dim * keys * s.layers


@pytest.mark.parametrize("method", ["full", "lora"])
def test_training_flops_equal_the_executed_matrix_products(method):
    model, _ = tiny_llama(seed=0)
    cfg = TrainingConfig(method=method)
    if method == "lora":
        model = attach_lora(model, cfg, seed=0)
    s, length, answers = Shapes.of(model.config), 12, 3
    ids = torch.arange(3, 3 + length)[None]
    labels = torch.full((1, length), -100)
    labels[0, -answers:] = ids[0, -answers:]
    with FlopCounterMode(display=False) as counter:
        loss, _ = answer_loss_sum(model, ids, labels, torch.ones(1, length, dtype=torch.long))
        loss.backward()
    # the counter sees no products inside the fused attention kernel: add them (forward + 2× backward) to its count
    expected = counter.get_total_flops() + 3 * attention(s, causal_keys(length))
    assert training_flops(s, [length], answers, method, cfg.lora.r, cfg.lora.target_modules) == expected


def test_packed_evaluation_flops_equal_the_executed_matrix_products():
    model, tokenizer = tiny_llama(seed=0)
    example = Example("q", "Question: Which gas do plants absorb?\nAnswer:", (" carbon dioxide", " oxygen"), 0)
    question = pack_question(0, tokenizer, example, 512)
    choices = [end - start for start, end in question.spans]
    with FlopCounterMode(display=False) as counter:
        score_packed(model, pack_rows([question]), tokenizer.eos_token_id)
    s, c = Shapes.of(model.config), question.context_len
    keys = causal_keys(c) + sum(n * c + causal_keys(n) for n in choices)
    assert packed_eval_flops(s, c, choices) == counter.get_total_flops() + attention(s, keys)
