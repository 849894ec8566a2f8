"""Per-device peak memory of a stage, from the model's shape alone (its config.json, no weights): weights,
gradients, optimizer state, activations and the Hessian-vector-product overhead, for a method (full / LoRA), a
micro-batch, a sequence length, a precision and a sharding (devices, DDP or FSDP, gradient checkpointing).

Every quantity is in bytes. The formulas, their assumptions and the measured check are in docs/memory.md; the
symbols: P parameters, P_t trainable parameters, N devices, b micro-batch (examples per device and forward pass),
s tokens per example (padded), h hidden size, f MLP intermediate size, a attention heads, d head dimension, V
vocabulary, L layers, r LoRA rank.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Literal

from chaintune.config import CurvatureConfig, TrainingConfig
from chaintune.errors import ChaintuneError

Precision = Literal["fp32", "bf16-mixed"]  # bf16-mixed: fp32 weights, gradients and moments; bf16 autocast compute
Strategy = Literal["ddp", "fsdp"]
FP32 = 4
BF16 = 2
ANSWER_TOKENS = 8  # answer tokens per example assumed by the plan (MCQ answers are 1-8 tokens): logits are that × V
EAGER_BACKWARD_SCORES = 3  # s × s tensors per head and layer that an HVP's backward-with-graph adds (bench/memory_plan.py)
ATTENTION_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """The shape of a Llama-style decoder (what its config.json says)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    head_dim: int
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelShape":
        """From a config.json mapping (Llama, Mistral, Qwen2, SmolLM… keys); a missing key is a one-line error."""
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            return cls(hidden=hidden, layers=int(config["num_hidden_layers"]), heads=heads,
                       kv_heads=int(config.get("num_key_value_heads") or heads),
                       intermediate=int(config["intermediate_size"]), vocab=int(config["vocab_size"]),
                       tied=bool(config.get("tie_word_embeddings", False)),
                       head_dim=int(config.get("head_dim") or hidden // heads),
                       attention_bias=bool(config.get("attention_bias", False)),
                       mlp_bias=bool(config.get("mlp_bias", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ChaintuneError(f"the model config has no usable {exc} for the memory plan",
                                 "pass a decoder-only model whose config.json has hidden_size, num_hidden_layers, "
                                 "num_attention_heads, intermediate_size and vocab_size") from None

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear module of one layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, f = self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}

    def layer_params(self) -> int:
        shapes = self.module_shapes()
        bias = sum(o for m, (_, o) in shapes.items() if (self.attention_bias if m.endswith(("q_proj", "k_proj",
                   "v_proj", "o_proj")) else self.mlp_bias))
        return sum(i * o for i, o in shapes.values()) + bias + 2 * self.hidden  # + the two RMSNorm weights

    def embedding_params(self) -> int:
        """Input embedding, final norm and (when untied) the output head."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self) -> int:
        return self.layers * self.layer_params() + self.embedding_params()

    def lora_params(self, lora_r: int, targets: list[str]) -> int:
        """Trainable parameters of LoRA adapters A (r × in) and B (out × r) on the named modules of every layer."""
        return self.layers * sum(lora_r * (i + o) for m, (i, o) in self.module_shapes().items() if m in targets)


# Llama shapes from their Hugging Face config.json files, for planning without the gated weights (facts, not code)
KNOWN_SHAPES = {
    "meta-llama/Llama-3.2-1B": ModelShape(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192,
                                          vocab=128256, tied=True, head_dim=64),
    "meta-llama/Llama-3.1-8B": ModelShape(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336,
                                          vocab=128256, tied=False, head_dim=128),
}


def model_shape(model: str | None, trust_remote_code: bool = False) -> ModelShape:
    """The shape of a config's `model`: a known Llama id (with or without -Instruct), a folder or file holding
    config.json, or anything `models.resolve_model_path` accepts (hub ids from the cache or the hub)."""
    known = KNOWN_SHAPES.get(str(model).removesuffix("-Instruct"))
    if known is not None:
        return known
    path = Path(str(model)).expanduser() if model else None
    if path is not None and path.is_file() and path.name.endswith(".json"):
        return ModelShape.from_config(json.loads(path.read_text(encoding="utf-8")))
    from transformers import AutoConfig

    from chaintune.models import resolve_model_path

    location = resolve_model_path(model)
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 — whatever a broken config.json makes transformers raise
        raise ChaintuneError(f"cannot read the config of model '{model}' ({type(exc).__name__})",
                             "pass a model folder with a config.json, or a hub id") from None
    return ModelShape.from_config(config.to_dict())


@dataclass(frozen=True)
class Setup:
    """How a stage runs: devices, data-parallel strategy, activation checkpointing, per-device micro-batch (examples
    per forward pass) and precision. `batch_size` examples per optimizer step are split over the devices."""

    devices: int = 1
    strategy: Strategy = "ddp"
    checkpointing: bool = False  # also on when the stage's training.gradient_checkpointing is
    micro_batch: int | None = None  # None: the device's whole share of batch_size (no gradient accumulation)
    precision: Precision = "bf16-mixed"
    attention: Literal["sdpa", "eager"] = "sdpa"

    def for_stage(self, training: TrainingConfig) -> "Setup":
        """This setup for one stage: the micro-batch at most the device's share of `batch_size`, checkpointing on
        if the stage asks for it."""
        share = math.ceil(training.batch_size / self.devices)
        return replace(self, micro_batch=min(self.micro_batch or share, share),
                       checkpointing=self.checkpointing or training.gradient_checkpointing)

    def describe(self) -> str:
        where = "1 device" if self.devices == 1 else f"{self.devices} devices, {self.strategy}"
        return (f"{where}, micro-batch {self.micro_batch}, "
                f"checkpointing {'on' if self.checkpointing else 'off'}, {self.precision}")


@dataclass(frozen=True)
class Estimate:
    """Per-device bytes of one stage. `peak` is the largest of the phases, not the sum of the parts (activations are
    freed while gradients are filled in, in backward)."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    transient: float  # the largest short-lived buffers: one layer's backward, the optimizer step's temporaries
    peak: float
    curvature: float | None = None  # the peak of the Hessian-vector products after the stage (None: not measured)


def _trainable(shape: ModelShape, training: TrainingConfig) -> int:
    if training.method == "lora":
        return shape.lora_params(training.lora.r, list(training.lora.target_modules))
    return shape.params()


def layer_activation_bytes(shape: ModelShape, tokens: int, seq: int, training: TrainingConfig,
                           precision: Precision, attention: str) -> float:
    """Bytes autograd saves for backward in one decoder layer, for `tokens` = b·s tokens of length-`seq` examples.

    Per token, full fine-tuning (elements): 6h + 2 of RMSNorm state (input, 1/rms, normalised input, output; two
    norms) in fp32, 4·a·d of attention (rotated q, k and v repeated to a heads, the attention output), 4f of the
    SwiGLU MLP (gate, up, SiLU(gate), product), plus a·s attention probabilities (eager) or a log-sum-exp per head
    and an s-wide mask row (SDPA). LoRA with frozen norms and MLP keeps 3h + 2 of the norms, 3f of the MLP (+ h, f
    when gate/up, down are adapted) and r per adapted module. bf16-mixed stores the norms in fp32 and the rest in
    bf16, plus one bf16 copy of each norm output that feeds a trained linear layer.
    """
    h, f, a, qd = shape.hidden, shape.intermediate, shape.heads, shape.heads * shape.head_dim
    compute = BF16 if precision == "bf16-mixed" else FP32
    if training.method == "lora":
        targets = set(training.lora.target_modules) & set(ATTENTION_MLP)
        norm = 3 * h + 2 + (h if targets & {"gate_proj", "up_proj"} else 0)
        mlp = 3 * f + (f if "down_proj" in targets else 0) + training.lora.r * len(targets)
        casts = h * (1 + bool(targets & {"gate_proj", "up_proj"}))
    else:
        norm, mlp, casts = 6 * h + 2, 4 * f, 2 * h
    attn = 4 * qd
    if attention == "eager":  # softmax output in fp32 (+ its bf16 copy under autocast)
        scores = a * seq * (FP32 + (BF16 if compute == BF16 else 0))
    else:
        scores = a * FP32 + seq * compute
    per_token = norm * FP32 + (attn + mlp) * compute + scores + (casts * BF16 if compute == BF16 else 0)
    return tokens * per_token


def backward_buffer_bytes(shape: ModelShape, tokens: int, precision: Precision) -> float:
    """The gradient buffers alive at once inside one layer's backward: (2f + 2h) per token in the compute dtype (the
    MLP's gate and up gradients, the layer's input and output gradients)."""
    return tokens * (2 * shape.intermediate + 2 * shape.hidden) * (BF16 if precision == "bf16-mixed" else FP32)


def _head_bytes(shape: ModelShape, tokens: int, answers: int, precision: Precision, training: TrainingConfig) -> float:
    """Final norm state and the answer-position logits (fp32 logits, their log-softmax, bf16 head output)."""
    norm = (3 * shape.hidden + 1 if training.method == "full" else shape.hidden + 1) * tokens * FP32
    return norm + answers * shape.vocab * (2 * FP32 + (BF16 if precision == "bf16-mixed" else 0))


def training_estimate(shape: ModelShape, training: TrainingConfig, setup: Setup, seq: int | None = None,
                      answer_tokens: int = ANSWER_TOKENS) -> Estimate:
    """Per-device peak bytes of training one stage (AdamW, optionally SAM / L2-to-previous) under `setup`.

    Parts (P_t trainable, 1/N under FSDP): weights 4P (fp32 master weights) — FSDP: 4P/N plus the gathered units
    (two layers and the root's embedding/head in the compute dtype); under bf16 autocast without FSDP, a bf16 copy
    of every linear weight lives from the forward to its backward (2·P_linear). Gradients 4P_t, plus one more copy
    in DDP's buckets (N > 1). Optimizer 8P_t (two moments), + 4P_t for SAM's shift and for l2_prev's anchor each.
    Activations: L layers (checkpointing: each layer's input, h per token, plus one recomputed layer) and the head.
    Peak = weights + optimizer + the largest of (activations + the head/embedding and one layer's gradients + one
    layer's backward buffers and the logits' gradient), (one layer's activations + all gradients + the buffers) and
    (gradients + the optimizer step's temporaries: 4P_t for the foreach AdamW on CUDA, one tensor on CPU).
    Activations assume padded micro-batches (SDPA then gets a mask and k, v repeated to a heads), the usual case.
    """
    seq = seq or training.max_length
    setup = setup.for_stage(training)
    n, b = setup.devices, setup.micro_batch
    shard = n if setup.strategy == "fsdp" else 1
    p, pt = shape.params(), _trainable(shape, training)
    full = training.method == "full"
    compute = BF16 if setup.precision == "bf16-mixed" else FP32
    linear = shape.layers * sum(i * o for i, o in shape.module_shapes().values()) + (0 if shape.tied else
                                                                                    shape.vocab * shape.hidden)
    weights = FP32 * p / shard
    if setup.strategy == "fsdp" and n > 1:
        weights += compute * (2 * shape.layer_params() + shape.embedding_params())
    elif setup.precision == "bf16-mixed":
        weights += BF16 * linear
    layer_grads = FP32 * (shape.layer_params() if full else pt / shape.layers)
    head_grads = FP32 * shape.embedding_params() if full else 0.0
    gradients = FP32 * pt / shard + (FP32 * pt if setup.strategy == "ddp" and n > 1 else 0.0)
    optimizer = (2 * FP32 * pt + FP32 * pt * ((training.optimizer == "sam") + (training.l2_prev > 0))) / shard
    tokens = b * seq
    layer = layer_activation_bytes(shape, tokens, seq, training, setup.precision, setup.attention)
    head = _head_bytes(shape, tokens, b * answer_tokens, setup.precision, training)
    if setup.checkpointing:
        activations = shape.layers * tokens * shape.hidden * FP32 + layer + head
    else:
        activations = shape.layers * layer + head
    backward = backward_buffer_bytes(shape, tokens, setup.precision) + FP32 * b * answer_tokens * shape.vocab
    step = FP32 * pt / shard if setup.precision == "bf16-mixed" else FP32 * _largest_tensor(shape, training)
    peak = weights + optimizer + max(activations + head_grads + layer_grads + backward,
                                     layer + head + gradients + backward, gradients + step)
    return Estimate(weights=weights, gradients=gradients, optimizer=optimizer, activations=activations,
                    transient=max(backward, step), peak=peak)


def _largest_tensor(shape: ModelShape, training: TrainingConfig) -> int:
    if training.method == "lora":
        return max(training.lora.r * max(i, o) for i, o in shape.module_shapes().values())
    return max(shape.vocab * shape.hidden, max(i * o for i, o in shape.module_shapes().values()))


def curvature_estimate(shape: ModelShape, training: TrainingConfig, curvature: CurvatureConfig,
                       seq: int = 512, answer_tokens: int = ANSWER_TOKENS, setup: Setup | None = None) -> float:
    """Per-device peak bytes of the Hessian-vector products after a stage (fp32, eager attention).

    One device or `ddp` (exact HVPs, double backward): weights 4P; the solver's vectors: 6 × 4P_t (Lanczos' three,
    the product, its start vector, one temporary), + max_iter × 4P_t for the re-orthogonalised basis when topk > 1
    or, with ≥ 2 subsets, when it fits in basis_budget (λ_max's vector, `curvature.lanczos`); the first-order
    gradients with their graph (4P_t); per micro-batch, the forward's saved activations, the backward-with-graph's
    as many again plus `EAGER_BACKWARD_SCORES` more s × s attention tensors per head and layer, and one more layer in
    the second backward; plus `graph_budget` bytes of kept graphs.
    `fsdp` on N > 1 devices (`distributed.ShardedHessianOperator`: finite differences of sharded gradients, no
    graph kept): weights 4P/N plus the gathered units in fp32 (two layers, the embedding/head); the vectors, the
    saved parameter shards and the two gradients (6 + 1 + 2) × 4P_t/N (+ the basis / N); one micro-batch's forward
    and first-order backward.
    """
    pt = _trainable(shape, training)
    tokens = curvature.micro_batch * seq
    layer = layer_activation_bytes(shape, tokens, seq, training, "fp32", "eager")
    head = _head_bytes(shape, tokens, curvature.micro_batch * answer_tokens, "fp32", training)
    basis = FP32 * pt * curvature.max_iter
    kept = curvature.topk > 1 or (curvature.subsets > 1 and basis <= curvature.basis_budget)
    if setup is not None and setup.strategy == "fsdp" and setup.devices > 1:
        n = setup.devices
        gathered = FP32 * (2 * shape.layer_params() + shape.embedding_params())
        first_order = shape.layers * layer + head + backward_buffer_bytes(shape, tokens, "fp32")
        return FP32 * shape.params() / n + gathered + (FP32 * pt * 9 + (basis if kept else 0)) / n + first_order
    # the backward-with-graph keeps s × s tensors of the softmax's and q·kᵀ's backward for the second backward: 3 per
    # head and layer beyond the forward's probabilities, fitted to the measured peaks (bench/memory_plan.py tiny-hvp)
    scores_grad = shape.layers * tokens * EAGER_BACKWARD_SCORES * shape.heads * seq * FP32
    graph = 2 * (shape.layers * layer + head) + layer + scores_grad
    vectors = FP32 * pt * 6 + (basis if kept else 0)
    return FP32 * shape.params() + vectors + FP32 * pt + graph + curvature.graph_budget


def stage_estimate(shape: ModelShape, training: TrainingConfig, setup: Setup,
                   curvature: CurvatureConfig | None = None) -> Estimate:
    """Training under `setup` and, if measured, the curvature after it (fp32; per device, sharded under fsdp)."""
    estimate = training_estimate(shape, training, setup)
    if curvature is None:
        return estimate
    return replace(estimate, curvature=curvature_estimate(shape, training, curvature, setup=setup))


def candidate_setups(batch_size: int, max_devices: int, precision: Precision) -> Iterator[Setup]:
    """Setups from the cheapest: fewest devices, then DDP before FSDP, no checkpointing before checkpointing,
    then the largest micro-batch (each device takes batch_size / N examples per step, in micro-batches)."""
    counts = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if n <= max_devices]
    for n in counts:
        per_device = math.ceil(batch_size / n)
        micro_batches = sorted({max(1, per_device // 2 ** k) for k in range(per_device.bit_length())}, reverse=True)
        for strategy in (("ddp",) if n == 1 else ("ddp", "fsdp")):
            for checkpointing in (False, True):
                for micro in micro_batches:
                    yield Setup(n, strategy, checkpointing, micro, precision)


def smallest_fit(shape: ModelShape, training: TrainingConfig, device_bytes: float, precision: Precision,
                 curvature: CurvatureConfig | None = None, max_devices: int = 1024) -> tuple[Setup, Estimate] | None:
    """The cheapest setup (`candidate_setups` order) whose training peak fits `device_bytes` per device, with its
    estimate; None when nothing up to `max_devices` fits. The curvature peak under that setup is reported, not fitted."""
    for setup in candidate_setups(training.batch_size, max_devices, precision):
        estimate = stage_estimate(shape, training, setup, curvature)
        if estimate.peak <= device_bytes:
            return setup.for_stage(training), estimate
    return None


def gib(value: float) -> str:
    return f"{value / 2**30:.2f}"


def measure_peak(fn, device: str = "cpu") -> float:
    """Peak bytes of live torch tensors while `fn()` runs, above those alive before it (the weights, say).

    CUDA: the caching allocator's `max_memory_allocated`. CPU: the profiler's allocation events (every allocation
    and free of the CPU allocator, in order; the running sum's maximum) — exact for tensors, unlike the process's
    resident size, which also moves with Python objects and the C allocator's caching.
    """
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return float(peak)


def memory_table(points: list, setup: Setup, device_bytes: float | None = None) -> tuple[Any, list[str]]:
    """`chaintune plan --memory`: one row per distinct estimate over the planned stages (GiB per device: the parts,
    the training peak, the curvature peak), and notes — the shapes used and, with `device_bytes`, the cheapest
    setup that fits each row. Reads each model's config.json only."""
    import pandas as pd

    from chaintune.plan import make_plan

    plan = make_plan(points)
    shapes: dict[str | None, ModelShape] = {}
    rows: dict[tuple, dict[str, Any]] = {}
    notes: list[str] = []
    for job in plan.jobs.values():
        node = job.node
        if node.stage is None or job.id.point is not None:
            continue
        cfg = plan.points[job.point].cfg
        if cfg.model not in shapes:
            shapes[cfg.model] = shape = model_shape(cfg.model, cfg.trust_remote_code)
            notes.append(f"model {cfg.model or 'embedded SmolLM2-135M'}: {shape.params() / 1e9:.3g} B parameters "
                         f"(hidden {shape.hidden}, {shape.layers} layers, {shape.heads}/{shape.kv_heads} heads, "
                         f"MLP {shape.intermediate}, vocab {shape.vocab}, {'tied' if shape.tied else 'untied'} "
                         "embeddings)")
        shape, training = shapes[cfg.model], node.training
        stage_setup = setup.for_stage(training)
        estimate = stage_estimate(shape, training, stage_setup, job.curvature)
        key = (cfg.model, training.method, stage_setup, training.max_length, tuple(round(v) for v in (
            estimate.peak, estimate.curvature or 0)))
        row = rows.setdefault(key, {"stages": {}, "model": cfg.model or "embedded", "method": training.method,
                                    "micro": stage_setup.micro_batch, "tokens": training.max_length,
                                    **{part: getattr(estimate, part) / 2**30 for part in
                                       ("weights", "gradients", "optimizer", "activations", "transient")},
                                    "train peak": estimate.peak / 2**30,
                                    "HVP peak": None if estimate.curvature is None else estimate.curvature / 2**30,
                                    "_fit": (shape, training, job.curvature)})
        row["stages"][node.stage.label] = row["stages"].get(node.stage.label, 0) + 1
    for number, row in enumerate(rows.values(), 1):
        labels = sorted(row["stages"])
        notes.append(f"row {number}: {sum(row['stages'].values())} stage(s): {', '.join(labels)}")
        row["stages"] = f"{number}: {sum(row['stages'].values())}"
        shape, training, curvature = row.pop("_fit")
        if device_bytes is not None:
            row["fits"] = "yes" if row["train peak"] * 2**30 <= device_bytes else "no"
            found = smallest_fit(shape, training, device_bytes, setup.precision, curvature)
            where = (f"{found[0].describe()}: {gib(found[1].peak)} GiB" if found
                     else "nothing up to 1024 devices")
            if curvature is not None and found and (found[1].curvature or 0) > device_bytes:
                where += f" (the curvature after it needs {gib(found[1].curvature)} GiB on one device)"
            notes.append(f"row {number}, smallest setup within {gib(device_bytes)} GiB per device: {where}")
    table = pd.DataFrame(list(rows.values()))
    return (table.drop(columns="model") if len(shapes) == 1 else table), notes
