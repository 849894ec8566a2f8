"""The bound each benchmark prints beside its peer ratio: this machine's matmul rate, measured in the same run, and
the useful FLOPs of the timed work, counted from the model's shapes.

`achieved / bound` = (useful FLOPs / seconds) / matmul rate: 1.0 would mean every second went into matrix products
running as fast as one large square product, on useful (non-padding) tokens only. The rate is sampled right before
each timed run (best of a few products of `n`×`n` matrices, same thread count), so contention from other processes
lowers bound and achieved alike; the benchmarks print the median of the samples.

Useful FLOPs (multiply-add = 2 FLOPs) of a Llama-style decoder with d = hidden size, per token per layer: 2·P_lin for
its linear layers (P_lin = q, k, v, o and MLP weights) and 4·n·h·d_h for attention (scores and weighted sum, n = keys
the token may attend to, h heads of width d_h); the LM head costs 2·V·d per scored position. A backward pass costs
2× its forward for a weight that is trained (input and weight gradients) and 1× for a frozen weight whose input
needs a gradient; LoRA adds its own small products (rank r). Embedding lookups, norms, activations and the optimizer
count zero: they are what a perfect implementation would hide behind the matrix products.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch


def matmul_rate(dtype: torch.dtype = torch.float32, n: int = 1536, repeats: int = 3) -> float:
    """Best-of-`repeats` FLOP/s of one `n`×`n` @ `n`×`n` product in `dtype` on the CPU (or the current GPU), at
    torch's current thread count; 0.0 when the dtype has no matmul kernel here."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    try:
        a @ b  # warm-up (kernel selection, page faults of the output)
    except RuntimeError:
        return 0.0
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


LAYER_PRODUCTS = {"forward": lambda x, w, dy: x @ w.T, "input": lambda x, w, dy: dy @ w,
                  "weight": lambda x, w, dy: dy.T @ x}  # (input X, weight W, output gradient dY) → product


def layer_matmul_rate(linear: dict[str, tuple[int, int]], tokens: int, products: Sequence[str] = ("forward",),
                      repeats: int = 3) -> float:
    """Best-of-`repeats` fp32 FLOP/s of one decoder layer's linear-layer products at `tokens` rows, on the CPU (or
    the current GPU): per module of (in, out) features, `forward` Y = X Wᵀ, `input` dX = dY W, `weight` dW = dYᵀ X.
    The rate the model's own matrix shapes allow, to set beside `matmul_rate`'s large square product."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    operands = [tuple(torch.randn(*shape, generator=g).to(device) for shape in ((tokens, n_in), (n_out, n_in),
                                                                             (tokens, n_out)))
                for n_in, n_out in linear.values()]
    work = [(LAYER_PRODUCTS[p], xwd) for xwd in operands for p in products]
    flops = 2 * tokens * sum(i * o for i, o in linear.values()) * len(products)
    for product, xwd in work:  # warm-up
        product(*xwd)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for product, xwd in work:
            product(*xwd)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return flops / best


def omp_settings() -> str:
    """The OpenMP waiting settings of this process (chaintune.runtime sets GOMP_SPINCOUNT unless the user chose)."""
    return f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}"


def bf16_supported() -> bool:
    """Whether this machine has a fast bf16 matmul (CUDA with bf16, or a CPU with AVX-512 BF16 / AMX)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@dataclass
class RateSamples:
    """Matmul rates (FLOP/s) sampled during a benchmark, one per timed run."""

    fp32: list[float] = field(default_factory=list)
    bf16: list[float] = field(default_factory=list)

    def sample(self) -> float:
        """Measure now; returns the fp32 rate (bf16 too where supported)."""
        self.fp32.append(matmul_rate(torch.float32))
        if bf16_supported():
            self.bf16.append(matmul_rate(torch.bfloat16))
        return self.fp32[-1]

    def line(self) -> str:
        text = f"matmul rate (median of {len(self.fp32)} samples, {torch.get_num_threads()} threads): fp32 " \
               f"{statistics.median(self.fp32) / 1e9:.0f} GFLOP/s"
        if self.bf16:
            text += f", bf16 {statistics.median(self.bf16) / 1e9:.0f} GFLOP/s"
        return text


# ------------------------------------------------------------------------------------------------------ shapes
@dataclass(frozen=True)
class Shapes:
    """What the FLOP count needs of a Llama-style causal LM (all sizes in elements)."""

    layers: int
    hidden: int
    heads: int
    head_dim: int
    vocab: int
    linear: dict[str, tuple[int, int]]  # module name in a layer → (in, out) features

    @classmethod
    def of(cls, config) -> "Shapes":
        d, heads = config.hidden_size, config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or d // heads
        kv = config.num_key_value_heads * head_dim
        inter = config.intermediate_size
        linear = {"q_proj": (d, heads * head_dim), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (heads * head_dim, d),
                  "gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d)}
        return cls(config.num_hidden_layers, d, heads, head_dim, config.vocab_size, linear)

    def linear_params(self) -> int:
        """Weights of all linear layers of the decoder (embedding and head excluded): N in "6N per token"."""
        return self.layers * sum(i * o for i, o in self.linear.values())


def causal_keys(length: int) -> int:
    """Σ over the positions of a causal sequence of the keys each attends to: 1 + 2 + … + length."""
    return length * (length + 1) // 2


def forward_flops(s: Shapes, tokens: int, keys: int, scored: int) -> float:
    """Forward FLOPs of `tokens` tokens attending to `keys` (query, key) pairs in all, with the LM head on `scored`
    positions."""
    return 2 * s.linear_params() * tokens + 4 * s.heads * s.head_dim * keys * s.layers + 2 * s.vocab * s.hidden * scored


def training_flops(s: Shapes, lengths: Sequence[int], answers: int, method: str = "full", lora_r: int = 0,
                   lora_targets: Sequence[str] = ()) -> float:
    """Useful FLOPs of one forward + backward over examples of `lengths` tokens (no padding) with the LM head on
    `answers` positions. Full fine-tuning: backward = 2× forward everywhere (the tied head/embedding matrix is
    trained). LoRA: frozen weights cost one product backward (input gradient), except layer 0's q, k, v projections
    and their adapters' down-projections, which read the frozen embedding; the head is frozen; each adapted module
    adds r·(in + out) weights trained in full (3 products)."""
    tokens, keys = sum(lengths), sum(causal_keys(n) for n in lengths)
    fwd = forward_flops(s, tokens, keys, answers)
    if method == "full":
        return 3 * fwd
    attention = 4 * s.heads * s.head_dim * keys * s.layers
    head = 2 * s.vocab * s.hidden * answers
    lin = s.linear_params() * 2 * tokens
    first = ("q_proj", "k_proj", "v_proj")  # layer 0's, fed by the frozen embedding: no input gradient
    below = 2 * tokens * sum(i * (o + (lora_r if name in lora_targets else 0))
                             for name, (i, o) in s.linear.items() if name in first)
    adapters = 3 * 2 * tokens * s.layers * sum(lora_r * (i + o) for name, (i, o) in s.linear.items() if name in lora_targets)
    return fwd + (lin - below) + 2 * attention + head + adapters


def packed_eval_flops(s: Shapes, context_len: int, choice_lens: Sequence[int]) -> float:
    """Forward FLOPs of one question scored with its context computed once: context tokens attend causally, each
    choice token to the context and the choice's earlier tokens; the head runs on one position per choice token."""
    tokens = context_len + sum(choice_lens)
    keys = causal_keys(context_len) + sum(c * context_len + causal_keys(c) for c in choice_lens)
    return forward_flops(s, tokens, keys, sum(choice_lens))


def verdict(achieved: float, bound: float, target: float) -> str:
    """'0.62 of bound (target ≥ 0.75: NOT met)'."""
    ratio = achieved / bound if bound else float("nan")
    return f"{ratio:.2f} of bound (target ≥ {target:.2f}: {'met' if ratio >= target else 'NOT met'})"
