"""Curvature (SPEC.md §6): exact HVPs checked against a Hessian formed in full on a tiny model, eigen-solvers and
Hutchinson against `eigvalsh`/trace, micro-batch invariance, graph reuse, the eager-attention guard, PEFT LoRA, state
restoration, determinism.

The exact-Hessian model is tiny_llama(hidden_size=8, num_layers=1) with only the attention projections, the norms
and down_proj trainable (344 parameters), so H (344×344) is built column by column from 344 HVPs in a few seconds.
"""
from __future__ import annotations

import copy
import math
import weakref
from dataclasses import asdict, dataclass

import pytest
import torch

from chaintune.config import TrainingConfig
from chaintune.curvature import (HessianOperator, eager_attention, hutchinson_trace, lanczos, measure_curvature,
                                 power_iteration)
from chaintune.errors import ChaintuneError
from chaintune.models import tiny_llama
from chaintune.tasks import Example
from chaintune.train import answer_loss_sum, attach_lora

TRAINABLE = ("self_attn", "norm", "down_proj")


def _examples(n: int) -> list[Example]:
    return [Example(f"ex-{i}", f"Statement: sample number {i} about the group\nQuestion: Is this statement toxic?\n"
                    "Answer:", (" no", " yes"), i % 2, group=("a", "b", "c")[i % 3]) for i in range(n)]


def _tiny_exact_model():
    model, tokenizer = tiny_llama(seed=0, hidden_size=8, num_layers=1)
    for name, p in model.named_parameters():
        p.requires_grad_(any(k in name for k in TRAINABLE))
    return model, tokenizer


@dataclass
class Exact:
    model: torch.nn.Module
    tokenizer: object
    op: HessianOperator
    hessian: torch.Tensor  # built from HVPs, column by column
    eigenvalues: torch.Tensor  # ascending


@pytest.fixture(scope="module")
def exact() -> Exact:
    torch.manual_seed(0)
    model, tokenizer = _tiny_exact_model()
    with eager_attention(model):  # graphs kept: the 344 columns take one second backward each
        op = HessianOperator(model, tokenizer, _examples(12), micro_batch=4, graph_budget=1e9)
        hessian = torch.stack([op(e) for e in torch.eye(op.dim)], dim=1)
    assert op.kept == [0, 1, 2]
    return Exact(model, tokenizer, op, hessian, torch.linalg.eigvalsh((hessian + hessian.T) / 2))


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _dominant(exact: Exact) -> float:
    ev = exact.eigenvalues
    return ev[ev.abs().argmax()].item()


def test_exact_hessian_is_symmetric_and_small_enough(exact: Exact):
    assert 200 <= exact.op.dim <= 400
    scale = exact.hessian.abs().max()
    assert scale > 0 and torch.isfinite(exact.hessian).all()
    assert (exact.hessian - exact.hessian.T).abs().max() <= 1e-5 * scale


def test_hvp_matches_autograd_functional_hessian(exact: Exact):
    """Independent: torch.autograd.functional.hessian of the same loss as a function of the flat trainable vector."""
    model, op = exact.model, exact.op
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    class Loss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = model

        def forward(self) -> torch.Tensor:
            return sum(answer_loss_sum(self.lm, *b)[0] for b in op.batches) / op.n_tokens

    wrapper = Loss()
    shapes = [p.shape for p in op.params]

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, [s.numel() for s in shapes])
        params = {f"lm.{n}": t.view(s) for n, t, s in zip(names, parts, shapes)}
        return torch.func.functional_call(wrapper, params, ())

    flat = torch.cat([p.detach().reshape(-1) for p in op.params])
    with eager_attention(model):
        reference = torch.autograd.functional.hessian(loss_of, flat)
        assert abs(loss_of(flat).item() - op.loss()) < 1e-6
    assert torch.allclose(exact.hessian, reference, rtol=1e-4, atol=1e-5 * reference.abs().max().item())


def test_hvp_matches_finite_differences_of_gradients(exact: Exact):
    """Independent of double backward: central differences of first-order gradients, in float64."""
    model = copy.deepcopy(exact.model).double()
    v = torch.randn(exact.op.dim, generator=torch.Generator().manual_seed(1))
    v /= v.norm()
    with eager_attention(model):
        op = HessianOperator(model, exact.tokenizer, _examples(12), micro_batch=4)
        vs = [c.view_as(p).double() for c, p in zip(torch.split(v, [p.numel() for p in op.params]), op.params)]

        def grad_at(shift: float) -> torch.Tensor:
            with torch.no_grad():
                for p, d in zip(op.params, vs):
                    p.add_(shift * d)
            total = sum(answer_loss_sum(model, *b)[0] for b in op.batches) / op.n_tokens
            grads = torch.autograd.grad(total, op.params)
            with torch.no_grad():
                for p, d in zip(op.params, vs):
                    p.sub_(shift * d)
            return torch.cat([g.reshape(-1) for g in grads])

        eps = 1e-3
        fd = (grad_at(eps) - grad_at(-eps)) / (2 * eps)
        hv = op(v)
    assert torch.allclose(hv.double(), fd, atol=1e-4 * fd.norm().item())
    assert torch.allclose(exact.hessian @ v, hv, atol=1e-5 * hv.norm().item())


def test_power_iteration_matches_eigvalsh(exact: Exact):
    ev = exact.eigenvalues
    dominant = ev[ev.abs().argmax()].item()
    with eager_attention(exact.model):
        lam, _, iterations, converged, _ = power_iteration(exact.op, exact.op.dim, exact.op.device, seed=0,
                                                           tol=1e-9, max_iter=2000)
    assert converged and iterations > 1
    assert _rel(lam, dominant) < 1e-4


def test_lanczos_top_k_matches_eigvalsh(exact: Exact):
    top = exact.eigenvalues.flip(0)[:3].tolist()
    with eager_attention(exact.model):
        lam, found, iterations, converged, _ = lanczos(exact.op, exact.op.dim, exact.op.device, k=3, seed=0, tol=1e-6)
    assert converged and iterations < exact.op.dim // 4
    assert len(found) == 3 and found == sorted(found, reverse=True)
    for got, want in zip(found, top):
        assert _rel(got, want) < 1e-4
    assert _rel(lam, _dominant(exact)) < 1e-4


@pytest.mark.parametrize("start", ["random", "sampled gradient"])
def test_early_stopped_lanczos_matches_eigvalsh_top_eigenvalue(exact: Exact, start: str):
    """k = 1: three-term recurrence, stopped by the change + residual rule long before the Krylov space is full."""
    with eager_attention(exact.model):
        v0 = exact.op.start_vector(seed=0) if start != "random" else None
        lam, top, iterations, converged, _ = lanczos(exact.op, exact.op.dim, exact.op.device, seed=0, tol=1e-6,
                                                     start=v0)
        power_iterations = power_iteration(exact.op, exact.op.dim, exact.op.device, seed=0, tol=1e-6, max_iter=2000,
                                           start=v0).iterations
    assert converged and iterations < min(exact.op.dim // 10, power_iterations)
    assert _rel(lam, _dominant(exact)) < 1e-4 and _rel(top[0], exact.eigenvalues[-1].item()) < 1e-4


def test_lanczos_keeps_the_basis_only_for_top_k(exact: Exact):
    """Memory: for λ_max alone at most the current and previous Lanczos vectors are alive when an HVP runs."""
    def run(k: int) -> tuple[int, int]:
        refs: list[weakref.ref] = []
        most = 0

        def hvp(v: torch.Tensor) -> torch.Tensor:
            nonlocal most
            refs.append(weakref.ref(v))
            most = max(most, sum(r() is not None for r in refs))
            return exact.hessian @ v

        iterations = lanczos(hvp, exact.op.dim, exact.op.device, k=k, seed=0, tol=1e-6).iterations
        return most, iterations

    assert run(1)[0] == 2
    most, iterations = run(3)
    assert most == iterations > 2


def test_hutchinson_trace_within_three_standard_errors(exact: Exact):
    h, n = exact.hessian.double(), 100
    with eager_attention(exact.model):
        estimate, std_error = hutchinson_trace(exact.op, exact.op.dim, exact.op.device, samples=n, seed=0)
    truth = h.trace().item()
    # Var(zᵀHz) = 2 Σ_{i≠j} H_ij² for Rademacher z: the reported standard error must be of that size
    expected_se = (2 * ((h**2).sum() - (h.diagonal()**2).sum()).item() / n) ** 0.5
    assert 0.7 * expected_se < std_error < 1.3 * expected_se
    assert abs(estimate - truth) < 3 * std_error


@pytest.mark.parametrize("micro_batch", [1, 5, 12])
def test_micro_batching_does_not_change_the_operator(exact: Exact, micro_batch: int):
    v = torch.randn(exact.op.dim, generator=torch.Generator().manual_seed(2))
    with eager_attention(exact.model):
        op = HessianOperator(exact.model, exact.tokenizer, _examples(12), micro_batch=micro_batch)
        assert len(op.batches) == -(-12 // micro_batch) and op.n_tokens == exact.op.n_tokens
        hv, reference = op(v), exact.op(v)
        assert abs(op.loss() - exact.op.loss()) < 1e-6
    assert torch.allclose(hv, reference, atol=1e-5 * reference.norm().item())


def test_graph_reuse_equals_recompute(exact: Exact):
    """Keeping all, some or none (budget too small) of the first-order graphs gives the same HVPs, first call and
    later calls alike."""
    vectors = torch.randn(3, exact.op.dim, generator=torch.Generator().manual_seed(4))

    def run(budget: float) -> tuple[HessianOperator, torch.Tensor]:
        op = HessianOperator(exact.model, exact.tokenizer, _examples(12), micro_batch=3, graph_budget=budget)
        return op, torch.stack([op(v) for v in vectors])

    with eager_attention(exact.model):
        (recompute, reference), (too_small, _), (keep_all, all_kept) = run(0), run(1), run(1e9)
        some, some_kept = run(0.7 * keep_all.graph_bytes)
    assert recompute.kept == too_small.kept == [] and keep_all.kept == [0, 1, 2, 3] and 0 < len(some.kept) < 4
    assert 0 < some.graph_bytes <= some.graph_budget
    for result in (all_kept, some_kept):
        assert torch.allclose(result, reference, rtol=1e-5, atol=1e-6 * reference.abs().max().item())


def test_kept_graphs_refuse_changed_parameters():
    model, tokenizer = _tiny_exact_model()
    v = torch.randn(sum(p.numel() for p in model.parameters() if p.requires_grad))
    with eager_attention(model):
        op = HessianOperator(model, tokenizer, _examples(4), micro_batch=2, graph_budget=1e9)
        op(v)
        with torch.no_grad():
            op.params[0].add_(0.1)
        with pytest.raises(ChaintuneError, match="parameters changed"):
            op(v)


def test_hessian_operator_outside_eager_attention_is_a_one_line_chaintune_error(exact: Exact):
    assert exact.model.config._attn_implementation != "eager"
    with pytest.raises(ChaintuneError, match="eager attention") as info:
        exact.op(torch.ones(exact.op.dim))
    assert "\n" not in str(info.value) and "eager_attention(model)" in str(info.value)


def test_start_vector_is_a_seeded_unit_vector_and_records_the_loss(exact: Exact):
    with eager_attention(exact.model):
        op = HessianOperator(exact.model, exact.tokenizer, _examples(12), micro_batch=5)
        v0, again, other = op.start_vector(0), op.start_vector(0), op.start_vector(1)
        no_grad_pass = HessianOperator(exact.model, exact.tokenizer, _examples(12), micro_batch=5).loss()
    assert abs(op.loss() - no_grad_pass) < 1e-6
    assert abs(v0.norm().item() - 1) < 1e-6 and torch.equal(v0, again) and not torch.equal(v0, other)
    # it leans toward the top eigenvector: squared overlap far above a random unit vector's 1/dim on average
    top = torch.linalg.eigh((exact.hessian + exact.hessian.T) / 2).eigenvectors[:, -1]
    assert (top @ v0) ** 2 > 10 / exact.op.dim


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_measure_curvature_matches_exact_lambda_max(exact: Exact, method: str):
    result = measure_curvature(exact.model, exact.tokenizer, _examples(12), n_examples=12, micro_batch=4, tol=1e-6,
                               max_iter=2000, method=method, topk=3, graph_budget=1e9)
    assert result.converged and result.method == method and result.n_parameters == exact.op.dim
    assert _rel(result.lambda_max, _dominant(exact)) < 1e-4
    for got, want in zip(result.topk, exact.eigenvalues.flip(0)[:3].tolist()):
        assert _rel(got, want) < 1e-4
    assert (result.iterations < 30) == (method == "lanczos")


def test_measure_curvature_rejects_an_unknown_method(exact: Exact):
    with pytest.raises(ChaintuneError, match="unknown curvature method"):
        measure_curvature(exact.model, exact.tokenizer, _examples(4), method="arnoldi")


def test_measure_curvature_through_lora_counts_adapters_and_restores_state():
    model, tokenizer = tiny_llama(seed=0)
    model = attach_lora(model, TrainingConfig(method="lora"), seed=0)
    with torch.no_grad():  # LoRA B starts at zero; make the adapters non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(3))
    base = model.get_base_model()
    attn_before = base.config._attn_implementation
    assert attn_before != "eager"  # otherwise restoring it would prove nothing
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    model.train()
    result = measure_curvature(model, tokenizer, _examples(16), n_examples=8, micro_batch=3, topk=2, trace=True,
                               trace_samples=4, max_iter=15, graph_budget=1e9)
    assert result.n_parameters == adapters and trainable == {n for n, p in model.named_parameters() if "lora_" in n}
    assert result.n_examples == 8 and result.lambda_max != 0 and len(result.topk) == 2
    assert result.hvp_calls >= result.iterations + 4 and result.trace is not None and result.method == "lanczos"
    assert model.training and all(m.training for m in model.modules())
    assert base.config._attn_implementation == attn_before
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    measure_curvature(model, tokenizer, _examples(16), n_examples=4, max_iter=2)
    assert not any(m.training for m in model.modules()) and base.config._attn_implementation == attn_before


def test_measure_curvature_is_deterministic_for_a_fixed_seed():
    def run(seed: int) -> dict:
        model, tokenizer = _tiny_exact_model()
        torch.manual_seed(seed + 100)  # the global RNG must not matter
        out = asdict(measure_curvature(model, tokenizer, _examples(20), n_examples=10, seed=seed, topk=2,
                                       trace=True, trace_samples=5, micro_batch=4))
        out.pop("seconds")
        return out

    first = run(0)
    assert first == run(0)
    assert first["n_examples"] == 10 and first["converged"]
    assert first != run(1)


def _matrix_hvp(eigenvalues: list[float], dim: int = 30, seed: int = 0):
    """v ↦ Q diag(λ) Qᵀ v for a seeded random rotation Q: a Hessian with a known spectrum."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    values = torch.tensor(eigenvalues + [0.01 * i for i in range(dim - len(eigenvalues))])
    matrix = q @ torch.diag(values) @ q.T
    return (lambda v: matrix @ v), matrix


def test_lanczos_picks_the_largest_magnitude_or_the_algebraically_largest_eigenvalue():
    hvp, matrix = _matrix_hvp([-5.0, 3.0, 1.0])
    magnitude = lanczos(hvp, 30, torch.device("cpu"), seed=0, tol=1e-8, max_iter=30)
    largest = lanczos(hvp, 30, torch.device("cpu"), seed=0, tol=1e-8, max_iter=30, which="largest")
    assert magnitude.value == pytest.approx(-5.0, rel=1e-5) and largest.value == pytest.approx(3.0, rel=1e-5)
    with pytest.raises(ValueError, match="which"):
        lanczos(hvp, 30, torch.device("cpu"), which="smallest")


@pytest.mark.parametrize("budget", [math.inf, 0.0])
def test_lanczos_ritz_vector_from_the_basis_or_by_replay_is_the_eigenvector(budget: float):
    """basis_budget 0: no basis is kept and the recurrence is replayed (iterations − 1 more HVPs)."""
    hvp, matrix = _matrix_hvp([4.0, 2.0, -1.0])
    calls = []
    found = lanczos(lambda v: calls.append(1) or hvp(v), 30, torch.device("cpu"), seed=0, tol=1e-8, max_iter=30,
                    vector=True, basis_budget=budget)
    top = torch.linalg.eigh(matrix).eigenvectors[:, -1]
    assert found.value == pytest.approx(4.0, rel=1e-5) and found.vector.norm().item() == pytest.approx(1, abs=1e-6)
    assert abs(float(top @ found.vector)) > 1 - 1e-5
    assert len(calls) == found.iterations + (0 if budget else found.iterations - 1)
    power = power_iteration(hvp, 30, torch.device("cpu"), seed=0, tol=1e-10, max_iter=500)
    assert abs(float(top @ power.vector)) > 1 - 1e-4 and power.value == pytest.approx(4.0, rel=1e-5)


def test_quadratic_forms_are_each_parts_rayleigh_quotient(exact: Exact):
    """Parts: the micro-batches stay within a part; each quotient is vᵀH_k v / vᵀv with H_k the Hessian of the
    part's own mean loss, and the token-weighted mean of the quotients is vᵀHv / vᵀv."""
    examples, parts = _examples(12), [i % 3 for i in range(12)]
    v = torch.randn(exact.op.dim, generator=torch.Generator().manual_seed(5))
    with eager_attention(exact.model):
        op = HessianOperator(exact.model, exact.tokenizer, examples, micro_batch=2, parts=parts, graph_budget=1e9)
        hv, quotients = op(v), op.quadratic_forms(v)  # the second call uses the kept graphs
        alone = []
        for k in range(3):
            part = HessianOperator(exact.model, exact.tokenizer, [e for e, p in zip(examples, parts) if p == k])
            alone.append(float(v @ part(v)) / float(v @ v))
            assert part.n_tokens == op.part_tokens[k]
    assert {op.batch_part[i] for i in range(len(op.batches))} == {0, 1, 2} and len(op.batches) == 6
    assert torch.allclose(hv, exact.hessian @ v, atol=1e-5 * hv.norm().item())
    assert quotients == pytest.approx(alone, rel=1e-4)
    weighted = sum(q * t for q, t in zip(quotients, op.part_tokens)) / op.n_tokens
    assert weighted == pytest.approx(float(v @ hv) / float(v @ v), rel=1e-4)
