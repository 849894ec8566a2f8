"""Scoring math: lm-evaluation-harness tokenization rules, packed scoring == naive scoring, hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from chaintune.evaluate import (MIN_SHARED, accuracy_summary, argmax_first, choice_length, encode_pair, evaluate,
                                pack_question, pack_rows, predictions_from_scores, score_examples)
from chaintune.models import tiny_llama
from chaintune.tasks import Example


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(seed=0)


def naive_scores(model, tokenizer, example: Example) -> list[float]:
    """One full forward pass per choice: the reference the packed scorer must equal."""
    out = []
    for choice in example.choices:
        ctx, cont = encode_pair(tokenizer, example.prompt, choice)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ctx + cont])).logits.float(), -1)[0]
        out.append(sum(logprobs[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont)))
    return out


EXAMPLES = [
    Example("a", "Question: Which gas do plants absorb?\nAnswer:", (" carbon dioxide", " oxygen", " water vapor"), 0, "g1"),
    Example("b", "Statement: the quick brown fox\nQuestion: Is this statement toxic?\nAnswer:", (" no", " yes"), 1, "g2"),
    Example("c", "Answer: ", ("yes", "no way", "not enough information"), 2, "g1"),  # trailing space in context
    Example("d", "", (" hello", " world"), 0, None),  # empty context → [EOS]
]


def test_trailing_space_moves_to_continuation(tiny):
    _, tokenizer = tiny
    ctx, cont = encode_pair(tokenizer, "Answer: ", "yes")
    assert ctx == tokenizer("Answer:", add_special_tokens=False)["input_ids"]
    assert ctx + cont == tokenizer("Answer: yes", add_special_tokens=False)["input_ids"]
    ctx, _ = encode_pair(tokenizer, "", " hello")
    assert ctx == [tokenizer.eos_token_id]


def test_packed_scores_equal_one_pass_per_choice(tiny):
    model, tokenizer = tiny
    packed = score_examples(model, tokenizer, EXAMPLES, max_tokens=64)  # forces several batches
    for example, scores in zip(EXAMPLES, packed):
        assert scores == pytest.approx(naive_scores(model, tokenizer, example), abs=1e-5)


CONTEXT = ("The woman and the man were talking about the job. The quick brown fox jumps over the lazy dog, "
           "0123456789.\n")
SHARED = [  # BBQ-like: several questions about one context, one of them with nothing after the shared part
    Example("s1", CONTEXT + "Question: Who is bad at math?\nAnswer:", (" the woman", " the man", " not enough information"), 2),
    Example("s2", CONTEXT + "Question: Who is good at math?\nAnswer:", (" the woman", " the man"), 0),
    Example("s3", CONTEXT + "Question: Which gas do plants absorb?\nAnswer:", (" carbon dioxide", " oxygen"), 0),
    Example("s4", CONTEXT.rstrip("\n"), (" yes", " no"), 1),
]


def test_questions_sharing_a_context_prefix_share_one_sequence_and_score_alike(tiny):
    model, tokenizer = tiny
    questions = [pack_question(i, tokenizer, ex, 512) for i, ex in enumerate(SHARED + EXAMPLES)]
    rows = pack_rows(questions)
    (row,) = [r for r in rows if len(r.questions) > 1]
    assert sorted(index for index, _, _ in row.questions) == [0, 1, 2, 3]
    assert len(row.input_ids) < sum(len(q.input_ids) for q in questions[:4]) - 3 * MIN_SHARED
    assert [len(r.questions) for r in rows].count(1) == len(EXAMPLES)  # unrelated contexts stay alone
    packed = score_examples(model, tokenizer, SHARED + EXAMPLES, max_tokens=256)
    for example, scores in zip(SHARED + EXAMPLES, packed):
        assert scores == pytest.approx(naive_scores(model, tokenizer, example), abs=1e-5)


def test_uniform_model_scores_are_minus_k_log_vocab(tiny):
    """All-zero weights give uniform next-token distributions: score = −(continuation tokens) · ln V, by hand."""
    model, tokenizer = tiny_llama(seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    vocab = model.config.vocab_size
    scores = score_examples(model, tokenizer, EXAMPLES[:2])
    for example, s in zip(EXAMPLES[:2], scores):
        for choice, value in zip(example.choices, s):
            k = len(encode_pair(tokenizer, example.prompt, choice)[1])
            assert value == pytest.approx(-k * math.log(vocab), abs=1e-4)


def test_acc_and_acc_norm_from_hand_made_scores():
    examples = [Example("x", "p", (" ab", " abcdef"), 1, "g"), Example("y", "p", (" a", " b"), 0, "h")]
    # x: raw scores -2 vs -3 → pred 0 (wrong); normalised by 2 and 6 chars: -1.0 vs -0.5 → pred_norm 1 (right)
    # y: equal scores → tie goes to index 0 (right) for both
    preds = predictions_from_scores(examples, [[-2.0, -3.0], [-1.0, -1.0]])
    assert [(p["pred"], p["pred_norm"]) for p in preds] == [(0, 1), (0, 0)]
    result = accuracy_summary("t", preds)
    assert (result.acc, result.acc_norm, result.n) == (50.0, 100.0, 2)
    assert result.per_group == {"g": {"acc": 0.0, "acc_norm": 100.0, "n": 1}, "h": {"acc": 100.0, "acc_norm": 100.0, "n": 1}}


def test_helpers():
    assert argmax_first([1.0, 3.0, 3.0]) == 1
    assert choice_length(" yes") == 3 and choice_length("yes") == 3


def test_evaluate_is_deterministic_and_order_independent(tiny):
    model, tokenizer = tiny
    a = evaluate(model, tokenizer, EXAMPLES, "t")
    b = evaluate(model, tokenizer, EXAMPLES[::-1], "t")
    by_id = {p["id"]: p["logliks"] for p in b.predictions}
    for p in a.predictions:
        assert p["logliks"] == pytest.approx(by_id[p["id"]], abs=1e-5)


class CountingDecoder(torch.nn.Module):
    """Stands in for torch.compile's wrapper of the decoder: runs the eager decoder, counts its calls."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder, self.calls = decoder, 0

    def forward(self, **kwargs):
        self.calls += 1
        return self.decoder(**kwargs)


def test_compile_scores_every_batch_through_the_compiled_decoder(tiny, monkeypatch):
    import chaintune.evaluate as ev

    model, tokenizer = tiny
    made = []
    monkeypatch.setattr(ev, "compile_decoder", lambda m: made.append(CountingDecoder(ev.decoder_and_head(m)[0]))
                        or made[-1])
    eager = score_examples(model, tokenizer, EXAMPLES, max_tokens=64)
    compiled = evaluate(model, tokenizer, EXAMPLES, "t", max_tokens=64, compile=True)
    assert len(made) == 1 and made[0].calls == len(list(ev._batches(pack_rows(
        [pack_question(i, tokenizer, e, 2048) for i, e in enumerate(EXAMPLES)]), 64, 64)))
    assert [p["logliks"] for p in compiled.predictions] == eager


@pytest.mark.slow
def test_torch_compiled_scores_equal_eager_to_rounding(tiny):
    model, tokenizer = tiny
    eager = score_examples(model, tokenizer, EXAMPLES + SHARED, max_tokens=64)
    compiled = score_examples(model, tokenizer, EXAMPLES + SHARED, max_tokens=64, compile=True)
    for e, c in zip(eager, compiled):
        assert c == pytest.approx(e, abs=1e-4)
