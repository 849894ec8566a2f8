"""Log-likelihood multiple-choice scoring that matches lm-evaluation-harness `multiple_choice` (SPEC.md §3).

Speed: all choices of a question are packed into ONE sequence behind a single copy of the context
(`[context | choice 1 | choice 2 | ...]`) with a block attention mask and restarted positions, so the context is
computed once; many questions go in one forward pass, sorted by length; the LM head runs only on scored positions.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from chaintune.errors import ChaintuneError
if TYPE_CHECKING:
    from chaintune.distributed import Ranks
from chaintune.tasks import Example

log = logging.getLogger(__name__)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) exactly as lm-evaluation-harness builds them.

    A trailing space of the context moves to the continuation; the continuation tokens are the tokens of
    `context + continuation` after the first len(tokens(context)) tokens. An empty context becomes [EOS].
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    continuation_ids = whole[len(context_ids):]
    if not context_ids:
        context_ids = [tokenizer.eos_token_id]
    return context_ids, continuation_ids


@dataclass
class PackedQuestion:
    """One question as a packed token sequence; `spans[i]` = (start, end) of choice i inside `input_ids`."""

    index: int
    input_ids: list[int]
    position_ids: list[int]
    context_len: int
    spans: list[tuple[int, int]]
    truncated: int = 0  # context tokens cut from the left to fit max_length


def pack_question(index: int, tokenizer, example: Example, max_length: int) -> PackedQuestion:
    encoded = [encode_pair(tokenizer, example.prompt, choice) for choice in example.choices]
    context = encoded[0][0]
    continuations = [cont for _, cont in encoded]
    if any(len(c) == 0 for c in continuations):
        raise ValueError(f"example {example.id}: a choice tokenizes to nothing")
    longest = max(len(c) for c in continuations)
    cut = len(context) - max(1, max_length - longest)
    context = context[max(cut, 0):]  # left-truncate like lm-evaluation-harness
    ids, positions, spans = list(context), list(range(len(context))), []
    for cont in continuations:
        start = len(ids)
        ids.extend(cont)
        positions.extend(range(len(context), len(context) + len(cont)))
        spans.append((start, len(ids)))
    return PackedQuestion(index, ids, positions, len(context), spans, max(cut, 0))


def _block_mask(questions: Sequence[PackedQuestion], length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4-D attention mask (B, 1, T, T): context causal; each choice sees the context and itself causally."""
    allowed = torch.zeros(len(questions), length, length, dtype=torch.bool)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for b, q in enumerate(questions):
        c = q.context_len
        allowed[b, :c, :c] = causal[:c, :c]
        for start, end in q.spans:
            allowed[b, start:end, :c] = True
            allowed[b, start:end, start:end] = causal[: end - start, : end - start]
        pad_from = len(q.input_ids)
        allowed[b, pad_from:, :].fill_(False)
        idx = torch.arange(pad_from, length)
        allowed[b, idx, idx] = True  # padding attends to itself only (avoids all-masked rows)
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


def decoder_and_head(model):
    """The decoder stack (hidden states) and the output head of a causal LM, also through a PEFT wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    head = base.get_output_embeddings()
    if decoder is None or head is None:
        raise ChaintuneError(f"{type(base).__name__} has no decoder/LM-head pair", "use a causal LM (AutoModelForCausalLM)")
    return decoder, head


@torch.no_grad()
def score_packed(model, questions: Sequence[PackedQuestion], pad_id: int) -> list[list[float]]:
    """Per-choice Σ log P(continuation | context) for a batch of packed questions, in nats (float32)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    length = max(len(q.input_ids) for q in questions)
    input_ids = torch.full((len(questions), length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(questions), length), dtype=torch.long)
    for b, q in enumerate(questions):
        input_ids[b, : len(q.input_ids)] = torch.tensor(q.input_ids)
        position_ids[b, : len(q.position_ids)] = torch.tensor(q.position_ids)
    mask = _block_mask(questions, length, dtype if dtype != torch.bfloat16 else torch.float32).to(device, dtype)
    # positions whose output predicts a choice token: the context's last token, then each choice token but its last
    rows, cols, targets, owners = [], [], [], []
    for b, q in enumerate(questions):
        for i, (start, end) in enumerate(q.spans):
            preds = [q.context_len - 1] + list(range(start, end - 1))
            rows.extend([b] * len(preds))
            cols.extend(preds)
            targets.extend(q.input_ids[start:end])
            owners.extend([(b, i)] * len(preds))
    decoder, head = decoder_and_head(model)
    kwargs = dict(input_ids=input_ids.to(device), attention_mask=mask, position_ids=position_ids.to(device),
                  use_cache=False)
    hidden = decoder(**kwargs).last_hidden_state
    logits = head(hidden[torch.tensor(rows), torch.tensor(cols)])
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    token_scores = logprobs[torch.arange(len(targets)), torch.tensor(targets, device=logprobs.device)].cpu().tolist()
    scores: list[list[float]] = [[0.0] * len(q.spans) for q in questions]
    for (b, i), s in zip(owners, token_scores):
        scores[b][i] += s
    return scores


def _batches(questions: list[PackedQuestion], max_tokens: int, max_batch: int) -> Iterable[list[PackedQuestion]]:
    """Longest first, so padding is small and memory use peaks at the start (fails fast if too big)."""
    ordered = sorted(questions, key=lambda q: -len(q.input_ids))
    batch: list[PackedQuestion] = []
    for q in ordered:
        if batch and ((len(batch) + 1) * len(batch[0].input_ids) > max_tokens or len(batch) >= max_batch):
            yield batch
            batch = []
        batch.append(q)
    if batch:
        yield batch


def score_examples(model, tokenizer, examples: Sequence[Example], *, max_tokens: int = 1024, max_batch: int = 64,
                   max_length: int | None = None, progress: bool = False, desc: str = "eval",
                   ranks: Ranks | None = None) -> list[list[float]]:
    """Log-likelihood of every choice of every example (nats), in input order. With `ranks` (a multi-rank job), the
    batches are dealt round robin over the ranks and the scores gathered: each question is scored in the same batch
    as in one process, so the scores are identical."""
    from tqdm.auto import tqdm

    if max_length is None:
        max_length = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    packed = [pack_question(i, tokenizer, ex, max_length) for i, ex in enumerate(examples)]
    warn_truncated(sum(q.truncated > 0 for q in packed), len(packed), max_length, f"{desc}: prompts scored")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results: list[list[float]] = [[] for _ in examples]
    was_training = model.training
    model.eval()
    batches = list(_batches(packed, max_tokens, max_batch))
    mine = batches if ranks is None else ranks.mine(batches)
    scored = []
    with tqdm(total=sum(map(len, mine)), desc=desc, disable=not progress, unit="q", leave=False) as bar:
        for batch in mine:
            scored += [(q.index, s) for q, s in zip(batch, score_packed(model, batch, pad_id))]
            bar.update(len(batch))
    for index, s in scored if ranks is None else ranks.gather(scored):
        results[index] = s
    model.train(was_training)
    return results


def warn_truncated(n: int, total: int, max_length: int, what: str) -> None:
    """A logged warning counting the examples that were cut to fit `max_length` tokens (never silent)."""
    if n:
        log.warning("%s: %d of %d were longer than %d tokens and lost the start of their prompt", what, n, total,
                    max_length)


def argmax_first(values: Sequence[float]) -> int:
    """Index of the maximum; ties go to the lowest index."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def choice_length(choice: str) -> int:
    """Characters of a choice as lm-evaluation-harness counts them for acc_norm (without the leading delimiter)."""
    return len(choice[1:]) if choice.startswith(" ") else len(choice)


@dataclass
class EvalResult:
    """Accuracies in percentage points (0–100); `per_group[g]` = {"acc", "acc_norm", "n"}."""

    task: str
    n: int
    acc: float
    acc_norm: float
    per_group: dict[str, dict[str, float]] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"task": self.task, "n": self.n, "acc": self.acc, "acc_norm": self.acc_norm, "per_group": self.per_group}


def _scalar_meta(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool)) or v is None}


def predictions_from_scores(examples: Sequence[Example], scores: Sequence[Sequence[float]]) -> list[dict[str, Any]]:
    rows = []
    for ex, s in zip(examples, scores):
        normed = [v / max(1, choice_length(c)) for v, c in zip(s, ex.choices)]
        pred, pred_norm = argmax_first(s), argmax_first(normed)
        rows.append({"id": ex.id, "group": ex.group, "gold": ex.gold, "pred": pred, "pred_norm": pred_norm,
                     "correct": pred == ex.gold, "correct_norm": pred_norm == ex.gold, "logliks": list(s),
                     **_scalar_meta(ex.meta)})
    return rows


def accuracy_summary(task: str, predictions: Sequence[dict[str, Any]]) -> EvalResult:
    """Overall and per-group acc / acc_norm (percentage points) from per-example predictions."""
    def pct(rows: Sequence[dict[str, Any]], key: str) -> float:
        return 100.0 * sum(bool(r[key]) for r in rows) / len(rows) if rows else math.nan

    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in predictions:
        if row["group"] is not None:
            groups[row["group"]].append(row)
    per_group = {g: {"acc": pct(rows, "correct"), "acc_norm": pct(rows, "correct_norm"), "n": len(rows)}
                 for g, rows in sorted(groups.items())}
    return EvalResult(task, len(predictions), pct(predictions, "correct"), pct(predictions, "correct_norm"),
                      per_group, list(predictions))


def evaluate(model, tokenizer, examples: Sequence[Example], task: str = "task", *, progress: bool = False,
             max_tokens: int = 1024, max_batch: int = 64, ranks: Ranks | None = None) -> EvalResult:
    """Score `examples` and return accuracies, per-group accuracies and per-example predictions (with `ranks`:
    data-parallel, the same result on every rank)."""
    scores = score_examples(model, tokenizer, examples, max_tokens=max_tokens, max_batch=max_batch,
                            progress=progress, desc=task, ranks=ranks)
    return accuracy_summary(task, predictions_from_scores(examples, scores))
