"""Supervised fine-tuning of one stage: answer-only loss, AdamW, full or LoRA, resumable mid-stage (SPEC.md §4)."""
from __future__ import annotations

import functools
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from chaintune.config import TrainingConfig
from chaintune.distributed import Ranks, full_tensor, reshard, shard_like, wrap_for_training
from chaintune.errors import TrainingError
from chaintune.evaluate import compile_decoder, decoder_and_head, encode_pair, warn_truncated
from chaintune.io import read_json, write_json, write_safetensors
from chaintune.runtime import device_plan, use_attention
from chaintune.tasks import Example
from chaintune.tasks.splits import stable_seed

IGNORE = -100


@dataclass
class SFTExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens


def tokenize_sft(tokenizer, examples: Sequence[Example], max_length: int, desc: str = "train") -> list[SFTExample]:
    """Prompt + gold choice, tokenized as the evaluator does; prompt tokens are masked out of the loss. Examples
    longer than `max_length` lose the start of their prompt (and, if still too long, the end of the answer); their
    number is logged."""
    out, cut = [], 0
    for ex in examples:
        context, answer = encode_pair(tokenizer, ex.prompt, ex.choices[ex.gold])
        cut += len(context) + len(answer) > max_length
        context = context[-max(1, max_length - len(answer)):]
        answer = answer[: max_length - len(context)]
        out.append(SFTExample(context + answer, [IGNORE] * len(context) + answer))
    warn_truncated(cut, len(out), max_length, f"{desc}: training examples")
    return out


def plan_steps(lengths: Sequence[int], batch_size: int, grad_accum: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """One epoch of optimizer steps, each a list of micro-batches of example indices.

    Order is seeded; examples are grouped by similar length inside windows of 32 steps (less padding), and the
    steps are then shuffled so that lengths are not ordered over time.
    """
    rng = random.Random(stable_seed("epoch", seed, epoch))
    order = list(range(len(lengths)))
    rng.shuffle(order)
    step_size = batch_size * grad_accum
    window = step_size * 32
    steps = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: -lengths[i])
        for s in range(0, len(chunk), step_size):
            ids = chunk[s:s + step_size]
            steps.append([ids[m:m + batch_size] for m in range(0, len(ids), batch_size)])
    rng.shuffle(steps)
    return steps


def _collate(batch: Sequence[SFTExample], pad_id: int, device: torch.device):
    length = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for b, e in enumerate(batch):
        ids[b, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[b, : len(e.labels)] = torch.tensor(e.labels)
        mask[b, : len(e.input_ids)] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def answer_logits(model, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                  decoder=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 logits [answer tokens, vocab], their target ids [answer tokens]), answer tokens in row-major order; the
    LM head runs on answer positions only. `decoder`: the decoder stack to run instead of the model's own (its
    compiled version, see `compile_decoder`)."""
    target = labels[:, 1:]
    rows, cols = (target != IGNORE).nonzero(as_tuple=True)
    own, head = decoder_and_head(model)
    hidden = (own if decoder is None else decoder)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return head(hidden[rows, cols]).float(), target[rows, cols]


def answer_loss_sum(model, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                    decoder=None) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy (nats) over answer tokens and their count (`answer_logits`)."""
    logits, target = answer_logits(model, ids, labels, mask, decoder)
    return torch.nn.functional.cross_entropy(logits, target, reduction="sum"), int(target.numel())


def _accumulate_gradients(forward, batches, n_answer: int, autocast: torch.dtype | None, scale: float = 1.0) -> float:
    """Backpropagate the step's mean answer-token loss over its micro-batches; returns the summed loss (nats).
    `forward(ids, labels, mask)` → (summed loss, tokens), run under `autocast` unless None; `batches` are
    (ids, labels, mask, weight), a weight 0 for a rank's stand-in batch (it only keeps the ranks in step); `scale`
    undoes the ranks' gradient averaging."""
    total = 0.0
    for ids, labels, mask, weight in batches:
        with torch.autocast(ids.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss_sum, _ = forward(ids, labels, mask)
        (loss_sum * (weight * scale) / n_answer).backward()
        total += loss_sum.item() * weight
    return total


def lr_at(step: int, total: int, cfg: TrainingConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`: linear warmup over `cfg.warmup(total)` steps,
    then constant, linear decay to 0, or cosine decay to 0 (half a period over the steps after warmup)."""
    warmup = cfg.warmup(total)
    if warmup and step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if cfg.scheduler == "linear":
        return cfg.lr * max(0.0, 1 - progress)
    if cfg.scheduler == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr


def attach_lora(model, cfg: TrainingConfig, seed: int):
    """Wrap `model` with fresh LoRA adapters (seeded init); only adapter weights are trainable."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(stable_seed("lora-init", seed))
    lcfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def set_gradient_checkpointing(model, enabled: bool) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant checkpoints: exact same gradients,
    dropout masks replayed) or keep them; a model that cannot is a one-line error."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not enabled:
        base.activation_checkpointing_disable()
    elif not base.supports_gradient_checkpointing:
        raise TrainingError(f"{type(base).__name__} does not support gradient checkpointing",
                            "set training.gradient_checkpointing: false")
    else:
        base.activation_checkpointing_enable({"use_reentrant": False})


@dataclass
class StageTrainResult:
    steps: int
    tokens: int
    seconds: float
    curve: list[dict[str, float]] = field(default_factory=list)
    best_step: int | None = None  # select_best: the step whose weights the model holds
    compile_seconds: float = 0.0  # compile=True: the warm-up pass that compiled the decoder (not in `seconds`)


class DivergedError(TrainingError):
    """The training loss became NaN or infinite; `curve` holds the steps before it (the model holds their weights)."""

    def __init__(self, problem: str, fix: str, curve: list[dict[str, float]]):
        super().__init__(problem, fix)
        self.curve = curve


@torch.no_grad()
def validation_loss(model, data: Sequence[SFTExample], pad_id: int, batch_size: int, forward=None,
                    ranks: Ranks | None = None) -> float:
    """Mean answer-token cross-entropy (nats) of `data`, in eval mode (the caller's mode is restored). With `ranks`,
    each rank scores its share of the batches through `forward` (the wrapped loss) and the sums are all-reduced."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    starts = range(0, len(data), batch_size)
    forward = forward or functools.partial(answer_loss_sum, model)
    mine = list(starts) if ranks is None else ranks.mine(starts)
    rounds = len(mine) if ranks is None else math.ceil(len(starts) / ranks.world)
    total, count = 0.0, 0
    for k in range(rounds):  # every rank makes as many forward calls (DDP and FSDP forwards are collectives)
        i = mine[k] if k < len(mine) else 0
        loss_sum, n = forward(*_collate(data[i:i + batch_size], pad_id, device))
        if k < len(mine):
            total, count = total + float(loss_sum), count + n
    if ranks is not None:
        total, count = ranks.sum([total, count])
    model.train(was_training)
    return total / max(count, 1)


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@dataclass
class _Best:
    """select_best: the lowest validation loss so far, its step and a CPU copy of the trainable weights then."""

    loss: float = math.inf
    step: int | None = None
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def offer(self, loss: float, step: int, model) -> None:
        if loss < self.loss:
            self.loss, self.step = loss, step
            self.weights = {n: full_tensor(p.detach()).to("cpu", copy=True) for n, p in _trainable(model).items()}

    def restore(self, model) -> None:
        with torch.no_grad():
            for n, p in _trainable(model).items():
                p.copy_(shard_like(p, self.weights[n]))


def _save_resume_state(folder: Path, model, optimizer, step: int, curve: list, tokens: int, seconds: float,
                       best: _Best, write: bool = True) -> None:
    """Whole tensors (sharded ones gathered: every rank calls this); only a rank with `write` writes them."""
    params = _trainable(model)
    tensors = {f"param/{n}": full_tensor(p.detach()) for n, p in params.items()}
    tensors |= {f"best/{n}": w for n, w in best.weights.items()}
    index = {id(p): n for n, p in params.items()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    tensors[f"optim/{index[id(p)]}/{key}"] = full_tensor(value)
    if not write:
        return
    write_safetensors(folder / "resume.safetensors", tensors)
    write_json(folder / "resume.json", {"step": step, "curve": curve, "tokens": tokens, "seconds": seconds,
                                        "best_loss": best.loss if best.step is not None else None,
                                        "best_step": best.step})


def _load_resume_state(folder: Path, model, optimizer, best: _Best) -> tuple[int, list, int, float] | None:
    from safetensors.torch import load_file

    meta, blob = folder / "resume.json", folder / "resume.safetensors"
    if not (meta.is_file() and blob.is_file()):
        return None
    try:
        state, tensors = read_json(meta), load_file(str(blob))
    except Exception:  # a torn write cannot happen (atomic), but a foreign or corrupt file must not crash resume
        return None
    params = _trainable(model)
    if set(params) != {k[len("param/"):] for k in tensors if k.startswith("param/")}:
        return None
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(shard_like(p, tensors[f"param/{n}"]))
    for n, p in params.items():
        moments = {k.rsplit("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"optim/{n}/")}
        if moments:  # AdamW's step count is a scalar on every rank; its moments are sharded like the parameter
            optimizer.state[p] = {k: shard_like(p, v.to(p.device)) if v.dim() else v.to(p.device)
                                  for k, v in moments.items()}
    if state.get("best_step") is not None:
        best.loss, best.step = float(state["best_loss"]), int(state["best_step"])
        best.weights = {k[len("best/"):]: v for k, v in tensors.items() if k.startswith("best/")}
    return int(state["step"]), list(state["curve"]), int(state["tokens"]), float(state["seconds"])


def train_stage(model, tokenizer, examples: Sequence[Example], cfg: TrainingConfig, seed: int, *,
                work_dir: Path | None = None, progress: bool = False, desc: str = "train",
                on_step: Callable[[dict[str, Any]], None] | None = None,
                validation: Sequence[Example] = (), compile: bool = False,
                ranks: Ranks | None = None) -> StageTrainResult:
    """Fine-tune `model` in place on `examples` (answer-only loss). Deterministic given `seed`.

    With `work_dir`, a resume state (trainable weights + AdamW moments) is written every `cfg.checkpoint_every`
    steps, and a rerun continues from it; step-level RNG is reseeded from (seed, step), so a resumed stage gives
    the same weights as an uninterrupted one. With `cfg.select_best`, the loss on `validation` is measured every
    `cfg.eval_every` steps (and after the last) and the model ends with the weights of the lowest one. A NaN or
    infinite loss raises `DivergedError` (weights of the last finite step kept). With `compile`, the decoder runs
    compiled (`compile_decoder`); the compilation happens in a warm-up forward + backward before the first step,
    timed as the result's `compile_seconds`. With `ranks` (a multi-rank job, chaintune.distributed), each rank
    trains on its slice of every micro-batch under DDP or FSDP, the gradient and curve are those of the whole batch,
    and only rank 0 writes; under FSDP `model` ends sharded (see `distributed.gather_weights`).
    """
    from tqdm.auto import tqdm

    if not examples:
        raise TrainingError(f"stage '{desc}' has no training examples", "check the task's train split and train_limit")
    if cfg.select_best and not validation:
        raise TrainingError(f"stage '{desc}': select_best needs validation examples",
                            "set quality_gate.validation_size above 0, or select_best: false")
    device = next(model.parameters()).device
    plan = device_plan(device)
    use_attention(model, plan.attention)
    data = tokenize_sft(tokenizer, examples, cfg.max_length, desc)
    lengths = [len(e.input_ids) for e in data]
    if cfg.method == "full":
        model.requires_grad_(True)  # a merged LoRA model comes back with frozen base weights
    set_gradient_checkpointing(model, cfg.gradient_checkpointing)
    wrapped = None if ranks is None else wrap_for_training(model, ranks)  # before the optimizer: FSDP swaps params
    steps_per_epoch = math.ceil(len(data) / (cfg.batch_size * cfg.grad_accum))
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    params = list(_trainable(model).values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=1e-8,
                                  **({} if ranks is not None  # DTensor parameters: torch's default AdamW
                                     else {"fused": True} if plan.fused_adamw else {"foreach": True}))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    anchor = [p.detach().clone() for p in params] if cfg.l2_prev > 0 else None  # weights at the stage start
    val_data = tokenize_sft(tokenizer, validation, cfg.max_length) if cfg.select_best else []
    eval_every = cfg.eval_every or max(1, total // 10)
    best = _Best()
    start, curve, tokens, seconds = 0, [], 0, 0.0
    if work_dir is not None:
        resumed = _load_resume_state(work_dir, model, optimizer, best)
        if resumed:
            start, curve, tokens, seconds = resumed
    model.train()
    decoder, compile_seconds = None, 0.0
    if compile and start < total:  # one process only (config validation refuses compile with several ranks)
        decoder, t_compile = compile_decoder(model), time.perf_counter()
        warm = sorted(range(len(data)), key=lambda i: lengths[i])[: cfg.batch_size]
        warm_forward = functools.partial(answer_loss_sum, model, decoder=decoder)
        _accumulate_gradients(warm_forward, [_collate([data[i] for i in warm], pad_id, device) + (1.0,)], 1,
                              plan.autocast)
        optimizer.zero_grad(set_to_none=True)
        compile_seconds = time.perf_counter() - t_compile
    forward = functools.partial(answer_loss_sum, model, decoder=decoder) if wrapped is None else wrapped
    epoch_plan: dict[int, list] = {}
    scale = 1.0 if ranks is None else float(ranks.world)  # DDP and FSDP average gradients over ranks: sum them
    bar = tqdm(total=total, initial=start, desc=desc, disable=not progress, unit="step", leave=False)
    t_last = time.perf_counter()
    for step in range(start, total):
        epoch, index = divmod(step, steps_per_epoch)
        if epoch not in epoch_plan:
            epoch_plan = {epoch: plan_steps(lengths, cfg.batch_size, cfg.grad_accum, seed, epoch)}
        micro_batches = epoch_plan[epoch][index]
        torch.manual_seed(stable_seed("step", seed, step))  # dropout etc. independent of where a run resumed
        lr = lr_at(step, total, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        n_answer = sum(sum(1 for t in data[i].labels if t != IGNORE) for mb in micro_batches for i in mb)
        batches = [_collate([data[i] for i in mb], pad_id, device) + (1.0,) for mb in micro_batches] if ranks is None \
            else [_collate([data[i] for i in ranks.mine(mb) or mb[:1]], pad_id, device) + (float(bool(ranks.mine(mb))),)
                  for mb in micro_batches]  # a rank without examples in a micro-batch runs one at weight 0
        step_loss = _accumulate_gradients(forward, batches, n_answer, plan.autocast, scale)
        if ranks is not None:
            step_loss = ranks.sum([step_loss])[0]
        step_tokens = sum(len(data[i].input_ids) for mb in micro_batches for i in mb)
        mean_loss = step_loss / n_answer
        if not math.isfinite(mean_loss):
            optimizer.zero_grad(set_to_none=True)
            bar.close()
            model.eval()
            raise DivergedError(f"stage '{desc}': loss is {mean_loss} at step {step + 1}/{total} (lr={lr:g})",
                                "lower the learning rate or keep gradient clipping on (max_grad_norm)", curve)
        if cfg.optimizer == "sam":  # gradient at the worst point of a ρ-ball (Foret et al. 2021), then step from w
            with torch.no_grad():
                norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
                shifts = [p.grad * (cfg.sam_rho / (norm + 1e-12)) if p.grad is not None else None for p in params]
                for p, e in zip(params, shifts):
                    if e is not None:
                        p.add_(e)
            optimizer.zero_grad(set_to_none=True)
            torch.manual_seed(stable_seed("step", seed, step))  # same dropout masks as the first pass
            _accumulate_gradients(forward, batches, n_answer, plan.autocast, scale)
            with torch.no_grad():
                for p, e in zip(params, shifts):
                    if e is not None:
                        p.sub_(e)
        if anchor is not None:  # gradient of (l2_prev / 2)·‖θ − θ_stage_start‖²
            with torch.no_grad():
                for p, p0 in zip(params, anchor):
                    if p.grad is not None:
                        p.grad.add_(p - p0, alpha=cfg.l2_prev)
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm else
                                torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        now = time.perf_counter()
        seconds += now - t_last
        t_last = now
        tokens += step_tokens
        record = {"step": step + 1, "epoch": epoch + (index + 1) / steps_per_epoch, "loss": mean_loss, "lr": lr,
                  "grad_norm": float(grad_norm), "tokens": tokens, "seconds": seconds}
        if val_data and ((step + 1) % eval_every == 0 or step + 1 == total):
            record["val_loss"] = validation_loss(model, val_data, pad_id, cfg.batch_size, forward, ranks)
            if wrapped is not None:
                reshard(wrapped)  # FSDP: the root's parameters are sharded again, so offer/restore see the shards
            best.offer(record["val_loss"], step + 1, model)
            t_last = time.perf_counter()  # validation time is not training time
        curve.append(record)
        if on_step:
            on_step(record)
        bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tokens / max(seconds, 1e-9):.0f}")
        bar.update(1)
        if work_dir is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
            _save_resume_state(work_dir, model, optimizer, step + 1, curve, tokens, seconds, best,
                               write=ranks is None or ranks.writer)
            t_last = time.perf_counter()
    bar.close()
    if best.step is not None and best.step != total:
        best.restore(model)
    model.eval()
    return StageTrainResult(total, tokens, seconds, curve, best.step, compile_seconds)
