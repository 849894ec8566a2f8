"""Curvature of the training loss after a stage (SPEC.md §6): exact Hessian-vector products, power iteration,
Lanczos top-k eigenvalues and Hutchinson trace, over the trainable parameters only (full model or LoRA adapters).

HVPs use double backward through the eager attention path (PyTorch's fused CPU attention kernels have no double
backward) in fp32, streamed over micro-batches so memory stays that of one micro-batch.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from chaintune.tasks import Example
from chaintune.tasks.splits import stable_seed, subsample
from chaintune.train import IGNORE, SFTExample, _collate, answer_loss_sum, tokenize_sft


@contextlib.contextmanager
def eager_attention(model) -> Iterator[None]:
    """Temporarily switch a Hugging Face model to the eager attention implementation (double-backward safe)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = base.config._attn_implementation
    base.set_attn_implementation("eager")
    try:
        yield
    finally:
        base.set_attn_implementation(previous)


class HessianOperator:
    """v ↦ H v for the mean answer-token cross-entropy over a fixed set of examples (trainable parameters only).

    Use it inside `eager_attention(model)` with the model in eval mode (no dropout: the same H at every call).
    """

    def __init__(self, model, tokenizer, examples: Sequence[Example], micro_batch: int = 8, max_length: int = 512):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.device = self.params[0].device
        data: list[SFTExample] = tokenize_sft(tokenizer, examples, max_length)
        self.n_tokens = sum(sum(t != IGNORE for t in e.labels) for e in data)
        order = sorted(range(len(data)), key=lambda i: len(data[i].input_ids))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.batches = [_collate([data[i] for i in order[s:s + micro_batch]], pad, self.device)
                        for s in range(0, len(order), micro_batch)]
        self.dim = sum(p.numel() for p in self.params)
        self.calls = 0

    def loss(self) -> float:
        with torch.no_grad():
            return sum(answer_loss_sum(self.model, *b)[0].item() for b in self.batches) / self.n_tokens

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        """H·vector for a flat fp32 vector of length `dim`."""
        chunks = list(torch.split(vector, [p.numel() for p in self.params]))
        vs = [c.view_as(p).to(p.dtype) for c, p in zip(chunks, self.params)]
        out = [torch.zeros_like(p) for p in self.params]
        for batch in self.batches:
            loss_sum, _ = answer_loss_sum(self.model, *batch)
            grads = torch.autograd.grad(loss_sum / self.n_tokens, self.params, create_graph=True)
            dot = sum((g * v).sum() for g, v in zip(grads, vs))
            hv = torch.autograd.grad(dot, self.params)
            for acc, h in zip(out, hv):
                acc.add_(h.detach())
        self.calls += 1
        return torch.cat([o.reshape(-1).float() for o in out])


@dataclass
class Curvature:
    lambda_max: float
    iterations: int
    converged: bool
    topk: list[float] = field(default_factory=list)
    trace: float | None = None
    trace_std_error: float | None = None
    n_examples: int = 0
    n_parameters: int = 0
    loss: float = math.nan
    seconds: float = 0.0
    hvp_calls: int = 0


def _random_unit(dim: int, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(dim, generator=g)
    return (v / v.norm()).to(device)


def power_iteration(hvp, dim: int, device: torch.device, seed: int = 0, tol: float = 1e-3,
                    max_iter: int = 100) -> tuple[float, int, bool]:
    """Largest-magnitude eigenvalue; stops when |λ_k − λ_{k−1}| / |λ_k| < tol. Returns (λ, iterations, converged)."""
    v = _random_unit(dim, stable_seed("power", seed), device)
    eigenvalue = None
    for it in range(1, max_iter + 1):
        hv = hvp(v)
        new = float(torch.dot(v, hv))
        norm = hv.norm()
        if norm == 0:
            return 0.0, it, True
        v = hv / norm
        if eigenvalue is not None and abs(new - eigenvalue) / max(abs(new), 1e-12) < tol:
            return new, it, True
        eigenvalue = new
    return float(eigenvalue), max_iter, False


def lanczos(hvp, dim: int, device: torch.device, k: int, steps: int | None = None, seed: int = 0) -> list[float]:
    """Top-k eigenvalues (largest algebraic, descending) by Lanczos with full re-orthogonalisation."""
    steps = min(dim, steps or max(2 * k + 20, 30))
    q = _random_unit(dim, stable_seed("lanczos", seed), device)
    basis, alphas, betas = [q], [], []
    for j in range(steps):
        w = hvp(basis[j])
        alpha = float(torch.dot(w, basis[j]))
        alphas.append(alpha)
        w = w - alpha * basis[j] - (betas[-1] * basis[j - 1] if j > 0 else 0)
        for b in basis:  # full re-orthogonalisation keeps Ritz values clean in float32
            w = w - torch.dot(w, b) * b
        beta = float(w.norm())
        if j == steps - 1 or beta < 1e-10:
            break
        betas.append(beta)
        basis.append(w / beta)
    tri = np.diag(alphas) + np.diag(betas[: len(alphas) - 1], 1) + np.diag(betas[: len(alphas) - 1], -1)
    return sorted(np.linalg.eigvalsh(tri).tolist(), reverse=True)[:k]


def hutchinson_trace(hvp, dim: int, device: torch.device, samples: int = 50, seed: int = 0) -> tuple[float, float]:
    """Unbiased trace estimate E[zᵀHz] with Rademacher z; returns (mean, standard error)."""
    g = torch.Generator().manual_seed(stable_seed("hutchinson", seed))
    values = []
    for _ in range(samples):
        z = (torch.randint(0, 2, (dim,), generator=g) * 2 - 1).float().to(device)
        values.append(float(torch.dot(z, hvp(z))))
    arr = np.array(values)
    return float(arr.mean()), float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else math.nan


def measure_curvature(model, tokenizer, examples: Sequence[Example], *, n_examples: int = 512, seed: int = 0,
                      topk: int = 1, trace: bool = False, trace_samples: int = 50, micro_batch: int = 8,
                      tol: float = 1e-3, max_iter: int = 100) -> Curvature:
    """λ_max (and optionally top-k eigenvalues and the trace) of the Hessian of the mean training loss over a
    seeded subset of `examples`, w.r.t. the model's trainable parameters, in fp32."""
    subset = subsample(list(examples), n_examples, seed, group=lambda e: e.group, salt="curvature")
    original_dtype = next(model.parameters()).dtype
    if {p.dtype for p in model.parameters()} != {torch.float32}:
        model.float()  # HVPs in fp32 even when training used bf16; restored below
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with eager_attention(model):
            op = HessianOperator(model, tokenizer, subset, micro_batch=micro_batch)
            lam, iters, converged = power_iteration(op, op.dim, op.device, seed, tol, max_iter)
            result = Curvature(lam, iters, converged, n_examples=len(subset), n_parameters=op.dim, loss=op.loss())
            if topk > 1:
                result.topk = lanczos(op, op.dim, op.device, topk, seed=seed)
            if trace:
                result.trace, result.trace_std_error = hutchinson_trace(op, op.dim, op.device, trace_samples, seed)
    finally:
        model.train(was_training)
        if original_dtype != torch.float32:
            model.to(original_dtype)
    result.seconds = time.perf_counter() - start
    result.hvp_calls = op.calls
    return result
