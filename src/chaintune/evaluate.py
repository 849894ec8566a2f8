"""Log-likelihood multiple-choice scoring that matches lm-evaluation-harness `multiple_choice` (SPEC.md §3).

Speed: all choices of a question are packed into ONE sequence behind a single copy of the context
(`[context | choice 1 | choice 2 | ...]`) with a block attention mask and restarted positions, so the context is
computed once; questions whose contexts share a long prefix (BBQ asks several questions about one context) share
one copy of it too (`[prefix | rest of context 1 | its choices | rest of context 2 | ...]`); many sequences go in
one forward pass, sorted by length; the LM head runs only on scored positions (docs/performance.md).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from chaintune.errors import ChaintuneError
from chaintune.metrics import group_accuracies, percent_correct
from chaintune.runtime import device_plan, use_attention
from chaintune.tasks import Example

if TYPE_CHECKING:
    from chaintune.distributed import Ranks

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


MIN_SHARED = 16  # leading context tokens that questions must share to be packed into one sequence
MAX_ROW = 256  # tokens of a sequence of several questions (attention is computed over the whole sequence)


@dataclass
class PackedRow:
    """One or more questions packed into one sequence behind the context prefix they share.

    `segments[k]` = (start, end, parent): tokens start..end−1 attend to each other causally and to every token of
    the parent segment and of its ancestors (parent −1: none); segment 0 is the shared context (the whole context
    of a single question). `questions` = (index, position of the context's last token, choice spans) per question.
    """

    input_ids: list[int]
    position_ids: list[int]
    segments: list[tuple[int, int, int]]
    questions: list[tuple[int, int, list[tuple[int, int]]]]


def _shared(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _row(group: Sequence[PackedQuestion], shared: int) -> PackedRow:
    """`group` in one sequence: its first `shared` context tokens once, then per question the rest of its context
    and its choices, at the positions they have in the question's own sequence."""
    first = group[0]
    ids, positions, segments, questions = first.input_ids[:shared], list(range(shared)), [(0, shared, -1)], []
    for q in group:
        parent, last = 0, shared - 1
        if q.context_len > shared:
            start = len(ids)
            ids.extend(q.input_ids[shared:q.context_len])
            positions.extend(range(shared, q.context_len))
            segments.append((start, len(ids), 0))
            parent, last = len(segments) - 1, len(ids) - 1
        spans = []
        for s, e in q.spans:
            start = len(ids)
            ids.extend(q.input_ids[s:e])
            positions.extend(q.position_ids[s:e])
            segments.append((start, len(ids), parent))
            spans.append((start, len(ids)))
        questions.append((q.index, last, spans))
    return PackedRow(ids, positions, segments, questions)


def pack_rows(questions: Sequence[PackedQuestion]) -> list[PackedRow]:
    """Pack questions whose contexts share at least MIN_SHARED leading tokens (BBQ: several questions per context)
    into one sequence of at most MAX_ROW tokens, the shared prefix computed once; a question joins a row only if
    that saves tokens (n members sharing p tokens become n + 1 sharing p' only if n·p' > (n − 1)·p). Every other
    question gets a sequence of its own, laid out as before: context, then each choice. Rows come in the order of
    their first question, so that without sharing the batches (and their float results) are the same as before."""
    order = sorted(questions, key=lambda q: q.input_ids[:q.context_len])
    rows: list[PackedRow] = []
    group: list[PackedQuestion] = []
    shared = size = 0
    for q in order:
        if group:
            common = min(shared, _shared(group[0].input_ids[:group[0].context_len], q.input_ids[:q.context_len]))
            grown = size + (len(group) - 1) * shared + len(q.input_ids) - len(group) * common
            if common >= MIN_SHARED and len(group) * common > (len(group) - 1) * shared and grown <= MAX_ROW:
                group.append(q)
                shared, size = common, grown
                continue
            rows.append(_row(group, shared))
        group, shared, size = [q], q.context_len, len(q.input_ids)
    if group:
        rows.append(_row(group, shared))
    return sorted(rows, key=lambda r: min(index for index, _, _ in r.questions))  # input order, as without sharing


def _block_mask(rows: Sequence[PackedRow], length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4-D attention mask (B, 1, T, T): each segment sees itself causally and all of its ancestors."""
    allowed = torch.zeros(len(rows), length, length, dtype=torch.bool)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for b, row in enumerate(rows):
        for start, end, parent in row.segments:
            allowed[b, start:end, start:end] = causal[: end - start, : end - start]
            while parent >= 0:
                p_start, p_end, parent = row.segments[parent]
                allowed[b, start:end, p_start:p_end] = True
        pad_from = len(row.input_ids)
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


def compile_decoder(model):
    """torch.compile of the model's decoder stack with dynamic shapes: one compilation serves every batch shape.
    Inductor fuses the norms, rotary embedding, activations and residual adds between the matrix products (on 2 CPU
    threads, SmolLM2-135M: ~40 % off a LoRA step, ~12 % off scoring, after 1–3 minutes of compilation; full
    fine-tuning gained erratically; docs/performance.md). Results then agree with the eager path to float rounding
    (about 1e-7 relative in the training loss, 5e-5 nats in a choice's log-likelihood), not bit for bit. Dynamo
    keys its compiled code on the module's class and shapes, so a later call in the same process reuses it."""
    decoder, _ = decoder_and_head(model)
    return torch.compile(decoder, dynamic=True)


@torch.no_grad()
def score_packed(model, rows: Sequence[PackedRow], pad_id: int, decoder=None) -> dict[int, list[float]]:
    """Per-choice Σ log P(continuation | context) of the questions in a batch of packed rows, in nats (float32),
    by question index. `decoder`: the decoder stack to run (e.g. `compile_decoder(model)`; default the model's)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    length = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, : len(r.input_ids)] = torch.tensor(r.input_ids)
        position_ids[b, : len(r.position_ids)] = torch.tensor(r.position_ids)
    mask = _block_mask(rows, length, dtype if dtype != torch.bfloat16 else torch.float32).to(device, dtype)
    # positions whose output predicts a choice token: the context's last token, then each choice token but its last
    batch_rows, cols, targets, owners = [], [], [], []
    for b, r in enumerate(rows):
        for index, last, spans in r.questions:
            for i, (start, end) in enumerate(spans):
                preds = [last] + list(range(start, end - 1))
                batch_rows.extend([b] * len(preds))
                cols.extend(preds)
                targets.extend(r.input_ids[start:end])
                owners.extend([(index, i)] * len(preds))
    own, head = decoder_and_head(model)
    decoder = own if decoder is None else decoder
    kwargs = dict(input_ids=input_ids.to(device), attention_mask=mask, position_ids=position_ids.to(device),
                  use_cache=False)
    hidden = decoder(**kwargs).last_hidden_state
    logits = head(hidden[torch.tensor(batch_rows), torch.tensor(cols)])
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    token_scores = logprobs[torch.arange(len(targets)), torch.tensor(targets, device=logprobs.device)].cpu().tolist()
    scores = {index: [0.0] * len(spans) for r in rows for index, _, spans in r.questions}
    for (index, i), s in zip(owners, token_scores):
        scores[index][i] += s
    return scores


def _batches(rows: list[PackedRow], max_tokens: int, max_batch: int) -> Iterable[list[PackedRow]]:
    """Longest first, so padding is small and memory use peaks at the start (fails fast if too big)."""
    ordered = sorted(rows, key=lambda r: -len(r.input_ids))
    batch: list[PackedRow] = []
    for r in ordered:
        if batch and ((len(batch) + 1) * len(batch[0].input_ids) > max_tokens or len(batch) >= max_batch):
            yield batch
            batch = []
        batch.append(r)
    if batch:
        yield batch


def score_examples(model, tokenizer, examples: Sequence[Example], *, max_tokens: int = 1024, max_batch: int = 64,
                   max_length: int | None = None, progress: bool = False, desc: str = "eval",
                   ranks: Ranks | None = None, compile: bool = False) -> list[list[float]]:
    """Log-likelihood of every choice of every example (nats), in input order. With `ranks` (a multi-rank job), the
    batches are dealt round robin over the ranks and the scores gathered: each question is scored in the same batch
    as in one process, so the scores are identical. `compile`: through `compile_decoder` (the first call in a
    process compiles, for minutes)."""
    from tqdm.auto import tqdm

    if max_length is None:
        max_length = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    packed = [pack_question(i, tokenizer, ex, max_length) for i, ex in enumerate(examples)]
    warn_truncated(sum(q.truncated > 0 for q in packed), len(packed), max_length, f"{desc}: prompts scored")
    rows = pack_rows(packed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results: list[list[float]] = [[] for _ in examples]
    was_training = model.training
    model.eval()
    use_attention(model, device_plan(next(model.parameters()).device).attention)
    decoder = compile_decoder(model) if compile else None
    batches = list(_batches(rows, max_tokens, max_batch))
    mine = batches if ranks is None else ranks.mine(batches)
    scored: list[tuple[int, list[float]]] = []
    with tqdm(total=sum(len(r.questions) for b in mine for r in b), desc=desc, disable=not progress, unit="q",
              leave=False) as bar:
        for batch in mine:
            scored += score_packed(model, batch, pad_id, decoder).items()
            bar.update(sum(len(r.questions) for r in batch))
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
    return EvalResult(task, len(predictions), percent_correct(predictions, "correct"),
                      percent_correct(predictions, "correct_norm"), group_accuracies(predictions), list(predictions))


def evaluate(model, tokenizer, examples: Sequence[Example], task: str = "task", *, progress: bool = False,
             max_tokens: int = 1024, max_batch: int = 64, ranks: Ranks | None = None,
             compile: bool = False) -> EvalResult:
    """Score `examples` and return accuracies, per-group accuracies and per-example predictions (with `ranks`:
    data-parallel, the same result on every rank; `compile`: see `score_examples`)."""
    scores = score_examples(model, tokenizer, examples, max_tokens=max_tokens, max_batch=max_batch,
                            progress=progress, desc=task, ranks=ranks, compile=compile)
    return accuracy_summary(task, predictions_from_scores(examples, scores))
