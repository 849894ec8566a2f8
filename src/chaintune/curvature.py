"""Curvature of the training loss after a stage (SPEC.md §6): exact Hessian-vector products, Lanczos (default) or
power iteration for λ_max, Lanczos top-k eigenvalues and Hutchinson trace, over the trainable parameters only (full
model or LoRA adapters). Choices and measurements: docs/curvature.md.

HVPs use double backward through the eager attention path (PyTorch's fused attention kernels have no double
backward) in fp32, streamed over micro-batches so memory stays that of one micro-batch (unless graphs are kept).
Multi-rank `fsdp` jobs use `distributed.ShardedHessianOperator` instead (vectors sharded like the parameters).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from chaintune.distributed import Ranks, ShardedHessianOperator
from chaintune.errors import ChaintuneError
from chaintune.evaluate import decoder_and_head
from chaintune.runtime import release_freed_memory
from chaintune.tasks import Example
from chaintune.tasks.splits import stable_seed, subsample
from chaintune.train import IGNORE, SFTExample, _collate, answer_loss_sum, tokenize_sft

OUTLIER_FACTOR = 10.0  # dominant_subset: deviations from the median quotient, in median absolute deviations
METHODS = ("lanczos", "power")


def sign_note(lambda_max: float, eigenvalue: str = "magnitude") -> str:
    """What a negative λ_max means, for the lines that print one ("" when it is not negative)."""
    if not lambda_max < 0:
        return ""
    if eigenvalue == "largest":
        return " (λ_max is the algebraically largest eigenvalue: negative means the loss curves downward in every direction)"
    return (" (λ_max is the eigenvalue of largest magnitude: negative means the strongest curvature is downward, i.e. "
            "the stage ended near a saddle, not in a sharp minimum; curvature.eigenvalue: largest gives the top of the "
            "spectrum instead)")


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def eager_attention(model) -> Iterator[None]:
    """Temporarily switch a Hugging Face model to the eager attention implementation (double-backward safe)."""
    base = _base(model)
    previous = base.config._attn_implementation
    base.set_attn_implementation("eager")
    try:
        yield
    finally:
        base.set_attn_implementation(previous)


def _require_eager(model) -> None:
    implementation = getattr(getattr(_base(model), "config", None), "_attn_implementation", "eager")
    if implementation != "eager":
        raise ChaintuneError(f"Hessian-vector products need eager attention, but the model uses '{implementation}' "
                             "(its kernels have no double backward)",
                             "call the HessianOperator inside `with chaintune.curvature.eager_attention(model):`")


def answer_batches(tokenizer, examples: Sequence[Example], micro_batch: int, max_length: int, device: torch.device,
                   parts: Sequence[int] | None = None) -> tuple[list[tuple[torch.Tensor, ...]], list[int], list[int]]:
    """The examples as (ids, labels, mask) micro-batches of `micro_batch`, formed within each part (`parts`: one
    index per example, default all 0) and sorted by length there; the part of each micro-batch; each part's number
    of answer tokens."""
    data: list[SFTExample] = tokenize_sft(tokenizer, examples, max_length, "curvature")
    if not data:
        raise ValueError("curvature needs at least one example")
    part_of = [0] * len(data) if parts is None else list(parts)
    if len(part_of) != len(data):
        raise ValueError(f"parts has {len(part_of)} entries for {len(data)} examples")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches, batch_part, part_tokens = [], [], []
    for part in range(max(part_of) + 1):
        order = sorted((i for i in range(len(data)) if part_of[i] == part), key=lambda i: len(data[i].input_ids))
        part_tokens.append(sum(sum(t != IGNORE for t in data[i].labels) for i in order))
        for s in range(0, len(order), micro_batch):
            batches.append(_collate([data[i] for i in order[s:s + micro_batch]], pad, device))
            batch_part.append(part)
    return batches, batch_part, part_tokens


def part_quotients(op, vector: torch.Tensor, product: Callable[[int], torch.Tensor]) -> list[float]:
    """Each part's Rayleigh quotient vᵀH_k v / vᵀv for an operator with `part_tokens`, `n_tokens` and `dot`, from
    `product(k)`: the part's share of H·v (its summed loss's Hessian over all parts' token count)."""
    squared_norm = float(op.dot(vector, vector))
    return [float(op.dot(vector, product(part))) * op.n_tokens / (tokens * squared_norm)
            for part, tokens in enumerate(op.part_tokens)]


class HessianOperator:
    """v ↦ H v for the mean answer-token cross-entropy over a fixed set of examples (trainable parameters only).

    `parts` (one index per example, default all 0) splits the examples into disjoint parts: micro-batches are formed
    within each part (sorted by length), and `quadratic_forms` gives each part's own Rayleigh quotient.

    Per micro-batch, a call runs the forward pass, the gradient with create_graph=True and a second backward. With
    `graph_budget` > 0 (bytes), the first call keeps the first-order graphs of the micro-batches that fit in it
    (counted as the tensors autograd saves, plus one gradient-sized sum per part) and later calls run only their second
    backward; the others are recomputed at every call (changed parameters then raise). Use it inside
    `eager_attention(model)`, in eval mode (no dropout: the same H at every call). With `ranks` (a multi-rank job,
    every rank holding the whole model), each rank runs its share of the micro-batches and the products are
    all-reduced: every rank gets the whole H·v.
    """

    def __init__(self, model, tokenizer, examples: Sequence[Example], micro_batch: int = 8, max_length: int = 512,
                 graph_budget: float = 0, ranks: Ranks | None = None, parts: Sequence[int] | None = None):
        self.model, self.ranks = model, ranks
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.device = self.params[0].device
        self.batches, self.batch_part, self.part_tokens = answer_batches(tokenizer, examples, micro_batch, max_length,
                                                                         self.device, parts)
        self.n_parts, self.n_tokens = len(self.part_tokens), sum(self.part_tokens)
        self.sizes = [p.numel() for p in self.params]
        self.dim = self.size = sum(self.sizes)  # vector length; the space's dimension (they differ for shards)
        self.graph_budget = graph_budget
        self.graph_bytes = 0  # estimated bytes held by the kept graphs
        self.kept: list[int] = []  # micro-batches whose first-order graph is kept
        self.calls = 0
        self._kept_grads: dict[int, tuple[torch.Tensor, ...]] = {}  # part → Σ of its kept gradients, with graph
        self._versions: list[int] = []  # parameter versions when the graphs were kept (the byte count skips autograd's)
        self._loss: float | None = None

    def loss(self) -> float:
        """Mean answer-token loss over the examples (from `start_vector`'s forward passes when it ran)."""
        if self._loss is None:
            with torch.no_grad():
                total = sum(answer_loss_sum(self.model, *self.batches[i])[0].item() for i in self._mine())
            self._loss = self._sum(total) / self.n_tokens
        return self._loss

    dot = staticmethod(torch.dot)  # the inner product of the vectors (ShardedHessianOperator: over the ranks)

    @staticmethod
    def vector_seed(seed: int) -> int:
        """The seed of random vectors (ShardedHessianOperator: one per rank)."""
        return seed

    def _mine(self) -> list[int]:
        """The micro-batches this rank computes (all of them in one process)."""
        indices = range(len(self.batches))
        return list(indices) if self.ranks is None else self.ranks.mine(indices)

    def _sum(self, value: float) -> float:
        return value if self.ranks is None else self.ranks.sum([value])[0]

    def start_vector(self, seed: int) -> torch.Tensor:
        """Unit start vector for the eigen-solvers: Σ ∇CE(logits, y) over the answer tokens with each label y drawn
        from the model's own prediction (seeded). A random vector whose covariance is the Fisher, the Gauss-Newton
        part of H, so it leans toward H's top eigenvectors (a seeded random unit vector if it is zero). One forward
        + backward per micro-batch; records the loss on the way."""
        generator = torch.Generator().manual_seed(stable_seed("fisher-start", seed))
        total, loss_sum = [torch.zeros_like(p) for p in self.params], 0.0
        decoder, head = decoder_and_head(self.model)
        mine = set(self._mine())
        for i, (ids, labels, mask) in enumerate(self.batches):
            target = labels[:, 1:]
            rows, cols = (target != IGNORE).nonzero(as_tuple=True)
            with torch.set_grad_enabled(i in mine):  # other ranks' batches: forward only, for the same label draws
                hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                logits = head(hidden[rows, cols]).float()
            sampled = torch.multinomial(logits.detach().softmax(-1).cpu(), 1, generator=generator)[:, 0]
            if i not in mine:
                continue
            loss_sum += torch.nn.functional.cross_entropy(logits.detach(), target[rows, cols], reduction="sum").item()
            grads = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, sampled.to(logits.device),
                                                                          reduction="sum"), self.params)
            for acc, g in zip(total, grads):
                acc.add_(g)
        self._loss = self._sum(loss_sum) / self.n_tokens
        start = torch.cat([t.reshape(-1).float() for t in total])
        if self.ranks is not None:
            self.ranks.sum_(start)
        norm = start.norm()
        return start / norm if norm > 0 else _start(None, self.dim, seed, "lanczos", self.device)

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        """H·vector for a flat fp32 vector of length `dim` (a new tensor)."""
        out = self._apply(vector, range(self.n_parts), may_keep=self.calls == 0 and self.graph_budget > 0)
        if self.calls == 0:
            self._versions = [p._version for p in self.model.parameters()]
        self.calls += 1
        return out

    def quadratic_forms(self, vector: torch.Tensor) -> list[float]:
        """Each part's Rayleigh quotient vᵀH_k v / vᵀv, H_k the Hessian of the part's own mean loss (one pass over
        the micro-batches). Their token-weighted mean is vᵀHv / vᵀv."""
        return part_quotients(self, vector, lambda part: self._apply(vector, [part]))

    def _apply(self, vector: torch.Tensor, parts: Sequence[int], may_keep: bool = False) -> torch.Tensor:
        """Σ over the micro-batches of `parts` of their share of H·vector (divided by all parts' token count);
        `may_keep`: keep first-order graphs within the budget (the first call)."""
        _require_eager(self.model)
        if self.kept and self._versions != [p._version for p in self.model.parameters()]:
            raise ChaintuneError("the model's parameters changed after the HessianOperator kept their graphs",
                                 "build a new HessianOperator for the new parameters")
        vs = [c.view_as(p).to(p.dtype) for c, p in zip(torch.split(vector, self.sizes), self.params)]
        out = torch.zeros(self.dim, dtype=torch.float32, device=self.device)
        outs = [o.view_as(p) for o, p in zip(torch.split(out, self.sizes), self.params)]
        for i in self._mine():
            if i in self.kept or self.batch_part[i] not in parts:
                continue
            batch, part = self.batches[i], self.batch_part[i]
            grads, saved = self._gradient_graph(batch, count=may_keep)
            cost = saved + (0 if part in self._kept_grads else sum(g.numel() * g.element_size() for g in grads))
            if may_keep and self.graph_bytes + cost <= self.graph_budget:
                self.kept.append(i)
                self.graph_bytes += cost
                kept = self._kept_grads.get(part)
                self._kept_grads[part] = grads if kept is None else tuple(a + b for a, b in zip(kept, grads))
            else:
                self._second_backward(grads, vs, outs, retain=False)
        for part in parts:
            if part in self._kept_grads:
                self._second_backward(self._kept_grads[part], vs, outs, retain=True)
        if self.ranks is not None:
            self.ranks.sum_(out)
        return out

    def _gradient_graph(self, batch, count: bool) -> tuple[tuple[torch.Tensor, ...], int]:
        """The micro-batch's share of the gradient, with its graph, and (if `count`) the bytes autograd saved for it
        (distinct storages, parameters excluded)."""
        storages: dict[int, int] = {}
        skip = {p.untyped_storage().data_ptr() for p in self.model.parameters()} if count else set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            s = t.untyped_storage()
            if s.data_ptr() not in skip:
                storages[s.data_ptr()] = s.nbytes()
            return t

        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if count else contextlib.nullcontext()
        with hooks:
            loss_sum, _ = answer_loss_sum(self.model, *batch)
            grads = torch.autograd.grad(loss_sum / self.n_tokens, self.params, create_graph=True)
        return grads, sum(storages.values())

    def _second_backward(self, grads, vs, outs, retain: bool) -> None:
        pairs = [(g, v) for g, v in zip(grads, vs) if g.requires_grad]  # g without graph: zero Hessian rows
        if not pairs:
            return
        hv = torch.autograd.grad([g for g, _ in pairs], self.params, grad_outputs=[v for _, v in pairs],
                                 retain_graph=retain, allow_unused=True)
        for acc, h in zip(outs, hv):
            if h is not None:
                acc.add_(h)


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
    method: str = "lanczos"
    eigenvalue: str = "magnitude"  # which end of the spectrum λ_max is: largest magnitude or algebraically largest
    subsets: int = 1  # search subsets: the eigen-solve's sample
    held_out: int = 0  # held-out subsets: only their Rayleigh quotients along the Ritz vector
    lambda_max_search: float | None = None  # with held-out subsets: the search subsets' pooled Ritz value
    lambda_max_subsets: list[float] = field(default_factory=list)  # each subset's Rayleigh quotient along the Ritz
    # vector (≥ 2 search subsets; search subsets first): its estimate of λ_max to first order
    subset_ids: list[list[str]] = field(default_factory=list)  # each subset's example ids, search subsets first
    lambda_max_ci_low: float | None = None  # delta-method t-interval from the quotients (`quotient_interval`)
    lambda_max_ci_high: float | None = None
    disagreement: float | None = None  # the interval's far / near end (≥ 1; None without an interval or across 0)


Dot = Callable[[torch.Tensor, torch.Tensor], torch.Tensor | float]


def _norm(v: torch.Tensor, dot: Dot) -> torch.Tensor | float:
    return v.norm() if dot is torch.dot else math.sqrt(float(dot(v, v)))


def _start(start: torch.Tensor | None, dim: int, seed: int, salt: str, device: torch.device,
           dot: Dot = torch.dot) -> torch.Tensor:
    """`start` normalised, else a seeded random unit vector of length `dim` (with a `dot` over shards: this rank's
    shard, `seed` differing per rank)."""
    v = torch.randn(dim, generator=torch.Generator().manual_seed(stable_seed(salt, seed))) if start is None else start
    return (v / _norm(v, dot)).to(device)


class Eigen(NamedTuple):
    """An eigen-solver's answer: the selected eigenvalue, the top-k (descending; Lanczos with k > 1), the iterations
    (one HVP each), convergence, and the unit eigenvector estimate when asked for (else None)."""

    value: float
    topk: list[float]
    iterations: int
    converged: bool
    vector: torch.Tensor | None = None


def power_iteration(hvp, dim: int, device: torch.device, seed: int = 0, tol: float = 1e-3, max_iter: int = 100,
                    start: torch.Tensor | None = None, dot: Dot = torch.dot) -> Eigen:
    """Largest-magnitude eigenvalue and its vector; stops when |λ_k − λ_{k−1}| / |λ_k| < tol. Starts from `start` or
    else a seeded random unit vector. `dot`: the inner product (vectors sharded over ranks:
    `ShardedHessianOperator.dot`)."""
    v = _start(start, dim, seed, "power", device, dot)
    eigenvalue = None
    for it in range(1, max_iter + 1):
        hv = hvp(v)
        new = float(dot(v, hv))
        norm = _norm(hv, dot)
        if norm == 0:
            return Eigen(0.0, [0.0], it, True, v)
        previous, v = v, hv / norm
        if eigenvalue is not None and abs(new - eigenvalue) / max(abs(new), 1e-12) < tol:
            return Eigen(new, [new], it, True, previous)
        eigenvalue = new
    return Eigen(float(eigenvalue), [float(eigenvalue)], max_iter, False, previous)


WHICH = ("magnitude", "largest")


def lanczos(hvp, dim: int, device: torch.device, k: int = 1, seed: int = 0, tol: float = 1e-3, max_iter: int = 100,
            start: torch.Tensor | None = None, which: str = "magnitude", vector: bool = False,
            basis_budget: float = math.inf, dot: Dot = torch.dot, size: int | None = None) -> Eigen:
    """λ_max, the top-k eigenvalues (descending) and, with `vector`, λ_max's Ritz vector, by Lanczos (one HVP per
    iteration).

    λ_max is the Ritz value of largest magnitude (`which="magnitude"`: what power iteration finds) or the
    algebraically largest (`"largest"`: the top of the spectrum, which stays positive near a saddle). Stops after
    `max_iter` iterations, when the Krylov space is invariant, or when it and each of the k largest Ritz values θ
    change by < `tol`·|θ| between two iterations (SPEC §6's rule) with residuals ρ = ‖Hy − θy‖ ≤ √(tol/10)·|θ|: a
    guard against plateaus (by Kato–Temple the error is ≤ ρ²/gap, so ≤ tol·|θ| when the gap to the next eigenvalue is
    ≥ 10% of |θ|). k = 1 without `vector` runs the plain three-term recurrence: three `dim`-vectors in memory whatever
    the iteration count. k > 1 keeps the basis, fully re-orthogonalised: iterations × dim floats; so does `vector`
    when max_iter × dim fp32 fit in `basis_budget` bytes, and otherwise it replays the recurrence once the Ritz
    vector's coefficients are known (iterations − 1 more HVPs, no basis in memory). Starts from `start`, else from a
    seeded random unit vector. Vectors sharded over ranks (`ShardedHessianOperator`): `dim` is this rank's length,
    `dot` the inner product over the ranks and `size` the whole length (it bounds the iterations: default `dim`).
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, not {which!r}")
    last = min(max_iter, dim if size is None else size)
    q = _start(start, dim, seed, "lanczos", device, dot)
    keep = k > 1 or (vector and 4 * dim * last <= basis_budget)
    basis = [q] if keep else []
    first = q if vector and not keep else None  # for the replay
    q_prev, beta = None, 0.0
    alphas: list[float] = []
    betas: list[float] = []
    previous = None
    for it in range(1, last + 1):
        w = hvp(q) if q_prev is None else hvp(q) - beta * q_prev
        alpha = float(dot(w, q))
        w.sub_(q, alpha=alpha)
        for b in basis:  # full re-orthogonalisation keeps inner Ritz values clean in float32
            w.sub_(b, alpha=float(dot(w, b)))
        alphas.append(alpha)
        ritz, vectors = np.linalg.eigh(np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1))  # ascending
        beta = float(_norm(w, dot))
        top = int(np.abs(ritz).argmax()) if which == "magnitude" else it - 1
        index = [top] + ([it - 1 - j for j in range(min(k, it))] if k > 1 else [])
        watched, residual = ritz[index], np.abs(beta * vectors[-1, index])
        converged = (previous is not None and len(previous) == len(watched)
                     and bool(np.all(np.abs(watched - previous) < tol * np.abs(watched)))
                     and bool(np.all(residual <= math.sqrt(tol / 10) * np.abs(watched))))
        done = converged or beta <= 1e-6 * np.abs(ritz).max()  # invariant Krylov space: the Ritz values are exact
        if done or it == last:
            ritz_vector = None if not vector else (_combine(basis, vectors[:, top], dot) if keep else
                                                   _replay(hvp, first, alphas, betas, vectors[:, top], dot))
            return Eigen(float(watched[0]), ritz[::-1][:k].tolist(), it, bool(done), ritz_vector)
        previous = watched
        betas.append(beta)
        q_prev, q = q, w.div_(beta)
        if keep:
            basis.append(q)
    raise AssertionError("unreachable: the loop returns at its last iteration")


def _combine(basis: Sequence[torch.Tensor], coefficients: np.ndarray, dot: Dot) -> torch.Tensor:
    """Σ c_i q_i, normalised."""
    out = torch.zeros_like(basis[0])
    for c, q in zip(coefficients, basis):
        out.add_(q, alpha=float(c))
    return out / _norm(out, dot)


def _replay(hvp, first: torch.Tensor, alphas: Sequence[float], betas: Sequence[float], coefficients: np.ndarray,
            dot: Dot) -> torch.Tensor:
    """Σ c_i q_i, normalised, regenerating the Lanczos vectors q_i from q_1 and the recorded α, β (no basis kept)."""
    out = first * float(coefficients[0])
    q_prev, q = None, first
    for i in range(1, len(coefficients)):
        w = hvp(q) - alphas[i - 1] * q - (0 if q_prev is None else betas[i - 2] * q_prev)
        q_prev, q = q, w / betas[i - 1]
        out.add_(q, alpha=float(coefficients[i]))
    return out / _norm(out, dot)


def hutchinson_trace(hvp, dim: int, device: torch.device, samples: int = 50, seed: int = 0,
                     dot: Dot = torch.dot) -> tuple[float, float]:
    """Unbiased trace estimate E[zᵀHz] with Rademacher z; returns (mean, standard error). Vectors sharded over
    ranks: `dot` over the ranks, `seed` differing per rank."""
    g = torch.Generator().manual_seed(stable_seed("hutchinson", seed))
    values = []
    for _ in range(samples):
        z = (torch.randint(0, 2, (dim,), generator=g) * 2 - 1).float().to(device)
        values.append(float(dot(z, hvp(z))))
    arr = np.array(values)
    return float(arr.mean()), float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else math.nan


def disjoint_subsets(examples: Sequence[Example], n_examples: int, subsets: int, seed: int) -> list[list[Example]]:
    """`subsets` disjoint, seeded, group-stratified subsets of `n_examples` each (fewer when `examples` runs short:
    they share what there is equally). One subset is exactly the single seeded subset of earlier releases."""
    if len(examples) < subsets:
        raise ChaintuneError(f"curvature needs at least {subsets} training examples for {subsets} subsets "
                             f"(the stage has {len(examples)})", "lower curvature.subsets")
    pool = subsample(list(examples), n_examples * subsets, seed, group=lambda e: e.group, salt="curvature")
    if subsets == 1:
        return [pool]
    order = sorted(range(len(pool)), key=lambda i: (str(pool[i].group), stable_seed("curvature-part", seed, pool[i].id)))
    return [[pool[i] for i in sorted(order[k::subsets])] for k in range(subsets)]  # round robin within groups


def _ratio(quotients: Sequence[float], tokens: Sequence[float]) -> tuple[float, float, int]:
    """Token-weighted ratio estimate Σ t_k r_k / Σ t_k of K independent parts' quotients r_k, its delta-method
    variance Σ z_k² / (K (K − 1)), z_k = t_k (r_k − λ) / mean(t), and its degrees of freedom K − 1."""
    r, t = np.asarray(quotients, dtype=float), np.asarray(tokens, dtype=float)
    value = float((t * r).sum() / t.sum())
    z = t * (r - value) / t.mean()
    return value, float((z ** 2).sum()) / (r.size * (r.size - 1)), r.size - 1


def quotient_interval(quotients: Sequence[float], tokens: Sequence[float], held_out: int = 0,
                      confidence: float = 0.95) -> tuple[float, float | None, float | None]:
    """(λ_max, low, high) from disjoint parts' Rayleigh quotients r_k along the Ritz vector, weighted by their
    answer-token counts t_k; (λ, None, None) when a side has fewer than 2 parts.

    `held_out` = 0: every part was in the Lanczos run, λ = Σ t_k r_k / Σ t_k (the pooled Ritz value) with a t
    interval of K − 1 df (`_ratio`). To first order a perturbation of H moves its top eigenvalue by vᵀ(ΔH)v, the
    eigenvector's own error entering at second order, so the parts' spread along the fixed vector is the
    estimator's sampling spread.
    `held_out` = H > 0: the last H parts were not in the Lanczos run. λ = (λ_search + λ_held)/2, the two sides'
    ratio estimates: the search side's value is biased up by the eigenvector's fit to its own noise, the held-out
    side's down by the same second-order amount (vᵀHv < λ_max), so their mean cancels it. se² = (se_s² + se_h²)/4,
    Welch–Satterthwaite degrees of freedom."""
    from scipy import stats

    if held_out < 0 or held_out > len(quotients):
        raise ValueError(f"held_out must be in [0, {len(quotients)}], not {held_out}")
    split = len(quotients) - held_out
    if held_out == 0:
        if split < 2:
            return float(np.average(quotients, weights=tokens)), None, None
        value, var, df = _ratio(quotients, tokens)
    else:
        if split < 2 or held_out < 2:
            raise ValueError("a split estimate needs ≥ 2 search and ≥ 2 held-out parts")
        (a, var_a, df_a), (b, var_b, df_b) = _ratio(quotients[:split], tokens[:split]), _ratio(quotients[split:],
                                                                                               tokens[split:])
        value, var = (a + b) / 2, (var_a + var_b) / 4
        df = (var_a + var_b) ** 2 / (var_a ** 2 / df_a + var_b ** 2 / df_b) if var_a + var_b > 0 else df_a + df_b
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * math.sqrt(var)
    return value, value - half, value + half


def dominant_subset(quotients: Sequence[float], factor: float = OUTLIER_FACTOR) -> int | None:
    """The index of the subset whose quotient lies farther from the median than `factor` × the quotients' median
    absolute deviation (the farthest such one), or None: a subset whose own sharp direction the eigen-solve found."""
    q = np.asarray(quotients, dtype=float)
    if q.size < 3:
        return None
    deviation = np.abs(q - np.median(q))
    k = int(deviation.argmax())
    return k if deviation[k] > factor * np.median(deviation) else None


def measure_curvature(model, tokenizer, examples: Sequence[Example], *, n_examples: int = 512, subsets: int = 1,
                      held_out: int = 0, seed: int = 0, topk: int = 1, trace: bool = False, trace_samples: int = 50,
                      micro_batch: int = 8, tol: float = 1e-3, max_iter: int = 100, method: str = "lanczos",
                      eigenvalue: str = "magnitude", graph_budget: float = 0, basis_budget: float = 2**30,
                      ranks: Ranks | None = None) -> Curvature:
    """λ_max (and optionally top-k eigenvalues and the trace) of the Hessian of the mean training loss over a seeded
    sample of `examples`, w.r.t. the model's trainable parameters, in fp32.

    The sample is `subsets` + `held_out` disjoint, group-stratified subsets of `n_examples` each
    (`disjoint_subsets`). The eigen-solve runs on the pooled Hessian of the first `subsets` (the search subsets);
    with ≥ 2 of them each subset's Rayleigh quotient along the Ritz vector gives λ_max's interval, and with
    `held_out` ≥ 2 the held-out subsets' quotients (one more pass over them) enter as well (`quotient_interval`:
    without held-out subsets λ_max is the pooled Ritz value; with them, the mean of the two sides' estimates, whose
    second-order biases cancel). The interval's far / near end ratio is how much the subsets disagree
    (`disagreement`). `method`: "lanczos" (default, fewer HVPs) or "power", both from
    `HessianOperator.start_vector`; `eigenvalue`: "magnitude" (SPEC §6) or "largest" (algebraically, Lanczos only).
    Top-k come from a second, re-orthogonalised Lanczos run from a seeded random vector; the trace from Hutchinson's
    estimator, both over the search subsets. `graph_budget`: bytes of first-order graphs the operator may keep
    between HVPs (0: recompute them; see docs/curvature.md); `basis_budget`: bytes of Lanczos basis kept for the
    eigenvector (`lanczos`). `ranks`: data-parallel HVPs (`HessianOperator`), the same result on every rank; under
    `fsdp`, `model` is `distributed.shard_for_curvature`'s and the vectors are each rank's shards
    (`ShardedHessianOperator`: finite-difference HVPs, no graph kept)."""
    if method not in METHODS:
        raise ChaintuneError(f"unknown curvature method '{method}'", f"use one of {', '.join(METHODS)}")
    if eigenvalue not in WHICH or (method == "power" and eigenvalue != "magnitude"):
        raise ChaintuneError(f"curvature eigenvalue '{eigenvalue}' is not available with method '{method}'",
                             "use eigenvalue: magnitude, or method: lanczos for eigenvalue: largest")
    if held_out and (held_out < 2 or subsets < 2):
        raise ChaintuneError(f"curvature with {held_out} held-out subset(s) and {subsets} search subset(s) has no "
                             "interval", "use held_out: 0, or ≥ 2 of each")
    parts = disjoint_subsets(examples, n_examples, subsets + held_out, seed)
    search, held = parts[:subsets], parts[subsets:]
    several = subsets > 1
    original_dtype = next(model.parameters()).dtype
    if {p.dtype for p in model.parameters()} != {torch.float32}:
        model.float()  # HVPs in fp32 even when training used bf16; restored below
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    operator = ShardedHessianOperator if ranks is not None and ranks.strategy == "fsdp" else HessianOperator

    def build(group: list[list[Example]]):
        return operator(model, tokenizer, [e for part in group for e in part], micro_batch=micro_batch,
                        graph_budget=graph_budget, ranks=ranks, parts=[k for k, part in enumerate(group) for _ in part])

    try:
        with eager_attention(model):
            op = build(search)
            v0 = op.start_vector(seed)
            if method == "lanczos":
                found = lanczos(op, op.dim, op.device, 1, seed, tol, max_iter, start=v0, which=eigenvalue,
                                vector=several, basis_budget=basis_budget, dot=op.dot, size=op.size)
            else:
                found = power_iteration(op, op.dim, op.device, seed, tol, max_iter, start=v0, dot=op.dot)
            iterations = found.iterations
            quotients = op.quadratic_forms(found.vector) if several else []
            # top-k: a random start spreads over all eigenvectors evenly (fewer missed members than the Fisher start)
            top = lanczos(op, op.dim, op.device, topk, op.vector_seed(seed), tol, max_iter, dot=op.dot,
                          size=op.size).topk if topk > 1 else []
            trace_mean, trace_se = (hutchinson_trace(op, op.dim, op.device, trace_samples, op.vector_seed(seed),
                                                     dot=op.dot) if trace else (None, None))
            loss, size, part_tokens = op.loss(), op.size, list(op.part_tokens)
            hvp_calls = op.calls + (1 if several else 0)  # the quotients cost one more pass
            value, converged, vector = found.value, found.converged, found.vector
            del op, found, v0  # the kept graphs go before the held-out subsets' operator is built
            if held:
                op = build(held)
                quotients += op.quadratic_forms(vector)
                part_tokens += op.part_tokens
                hvp_calls += 1
                del op
            del vector
            release_freed_memory()  # the freed memory back to the OS
    finally:
        model.train(was_training)
        if original_dtype != torch.float32:
            model.to(original_dtype)
    estimate, low, high = quotient_interval(quotients, part_tokens, held_out) if several else (value, None, None)
    return Curvature(
        lambda_max=estimate if held else value, iterations=iterations, converged=converged, topk=top,
        trace=trace_mean, trace_std_error=trace_se, n_examples=sum(len(part) for part in parts), n_parameters=size,
        loss=loss, seconds=time.perf_counter() - start, hvp_calls=hvp_calls, method=method, eigenvalue=eigenvalue,
        subsets=len(search), held_out=len(held), lambda_max_search=value if held else None,
        lambda_max_subsets=quotients, subset_ids=[[e.id for e in part] for part in parts] if several else [],
        lambda_max_ci_low=low, lambda_max_ci_high=high,
        disagreement=None if low is None or low * high <= 0 else max(abs(low), abs(high)) / min(abs(low), abs(high)))
