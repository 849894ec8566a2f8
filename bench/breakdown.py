"""Where the time goes: torch.profiler over a training step (full and LoRA), an evaluation batch and a Hessian-vector
product on the embedded SmolLM2-135M, with every operator's own time put in one category (docs/performance.md).

Categories (self time of the operators, in seconds per unit of work, and as a share of the wall time):
- matmul: mm, addmm, bmm, baddbmm (the linear layers; bmm is attention's products on the eager path);
- attention: the fused scaled-dot-product kernels and softmax;
- elementwise: norms, activations, rotary embedding, residual adds, loss, dropout;
- data movement: copies, concatenation, indexing, embedding lookups and their gradients, fills, memory allocation;
- optimizer: every operator under AdamW's step, gradient clipping and zeroing (training only);
- framework: the rest of the wall time: Python, the dispatcher, the autograd engine, view operators.
Padding waste is the share of matmul FLOPs spent on padding positions (a property of the batch, printed with it).

    python bench/breakdown.py [--only train-full train-lora eval hvp] [--steps 2] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chaintune  # noqa: E402,F401  (before torch: process settings, see chaintune.runtime)
import torch  # noqa: E402

MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
ATTENTION = ("scaled_dot_product", "flash_attention", "softmax")
MOVEMENT = ("copy", "cat", "index", "embedding", "fill", "zero", "clone", "contiguous", "gather", "scatter", "empty",
            "_to_copy", "masked_fill", "stack", "pad", "repeat", "expand_as", "split_with_sizes_copy", "narrow_copy")
VIEWS = ("view", "reshape", "transpose", "permute", "slice", "select", "unsqueeze", "squeeze", "expand", "as_strided",
         "_unsafe_view", "t", "detach", "alias", "split", "unbind", "chunk", "lift_fresh", "result_type", "size")
OPTIMIZER_SCOPES = ("Optimizer.step", "Optimizer.zero_grad", "clip_grad")
CATEGORIES = ("matmul", "attention", "elementwise", "data movement", "optimizer", "framework")


def category(name: str) -> str | None:
    """The category of an aten operator by name (None: not an aten compute operator, counted as framework)."""
    if not name.startswith("aten::"):
        return None
    op = name[len("aten::"):]
    if name in MATMUL:
        return "matmul"
    if any(a in op for a in ATTENTION):
        return "attention"
    if op in VIEWS or op.rstrip("_") in VIEWS:
        return None
    if any(op.startswith(m) or op.startswith("_" + m) for m in MOVEMENT) or op in ("to", "copy_"):
        return "data movement"
    return "elementwise"


def breakdown(prof, wall: float, units: int) -> dict[str, float]:
    """Seconds per unit of work in each category: operator self times, the optimizer scope taking precedence;
    `framework` is the wall time left over."""
    seconds: dict[str, float] = defaultdict(float)
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CPU:
            continue
        cat = category(evt.name)
        if cat is None:
            continue
        scope, parent = cat, evt.cpu_parent
        while parent is not None:
            if parent.name.startswith(OPTIMIZER_SCOPES):
                scope = "optimizer"
                break
            parent = parent.cpu_parent
        seconds[scope] += evt.self_cpu_time_total / 1e6
    seconds["framework"] = max(0.0, wall - sum(seconds.values()))
    return {k: seconds.get(k, 0.0) / units for k in CATEGORIES}


def matmul_rate_inside(prof) -> float:
    """FLOP/s achieved inside the matmul operators (profiler's FLOP count of mm/addmm/bmm over their self time)."""
    flops = sum(e.flops or 0 for e in prof.events() if e.name in MATMUL)
    secs = sum(e.self_cpu_time_total for e in prof.events() if e.name in MATMUL) / 1e6
    return flops / secs if secs else 0.0


def report(title: str, parts: dict[str, float], prof, padding: float | None, rate: float) -> None:
    total = sum(parts.values())
    print(f"\n{title}: {total:.2f} s per unit")
    for k in CATEGORIES:
        print(f"  {k:<14} {parts[k]:7.3f} s  {parts[k] / total:6.1%}")
    inside = matmul_rate_inside(prof)
    print(f"  matmul kernels ran at {inside / 1e9:.0f} GFLOP/s = {inside / rate:.2f} of a large square fp32 product "
          f"({rate / 1e9:.0f} GFLOP/s)")
    if padding is not None:
        print(f"  padding: {padding:.1%} of the tokens of the profiled batches")


def profile_train(method: str, args, rate: float) -> None:
    from chaintune.config import TrainingConfig
    from chaintune.models import load_model
    from chaintune.tasks import load_task
    from chaintune.train import attach_lora, plan_steps, tokenize_sft, train_stage

    model, tokenizer = load_model(device="cpu", dtype="float32")
    cfg = TrainingConfig(method=method, lr=1e-5 if method == "full" else 1e-4, batch_size=args.batch_size,
                         max_steps=1 + args.steps)
    if method == "lora":
        model = attach_lora(model, cfg, seed=0)
    examples = load_task(args.task, "train", limit=args.batch_size * (1 + args.steps))
    data = tokenize_sft(tokenizer, examples, cfg.max_length)
    steps = plan_steps([len(e.input_ids) for e in data], cfg.batch_size, cfg.grad_accum, 0, 0)[1:1 + args.steps]
    real = sum(len(data[i].input_ids) for s in steps for mb in s for i in mb)
    padded = sum(len(mb) * max(len(data[i].input_ids) for i in mb) for s in steps for mb in s)
    marks: list[float] = []
    schedule = torch.profiler.schedule(wait=0, warmup=1, active=args.steps, repeat=1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], schedule=schedule,
                                with_flops=True) as prof:
        train_stage(model, tokenizer, examples, cfg, seed=0,
                    on_step=lambda record: (marks.append(time.perf_counter()), prof.step()))
    wall = marks[-1] - marks[0]
    report(f"training step, {method} fine-tuning, batch {args.batch_size} of {args.task}", breakdown(prof, wall, args.steps),
           prof, 1 - real / padded, rate)


def profile_eval(args, rate: float) -> None:
    from chaintune.evaluate import score_examples
    from chaintune.models import load_model
    from chaintune.tasks import load_task

    model, tokenizer = load_model(device="cpu", dtype="float32")
    examples = load_task(args.eval_task, "test", limit=args.questions)
    score_examples(model, tokenizer, examples[: max(1, args.questions // 4)])  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True) as prof:
        start = time.perf_counter()
        score_examples(model, tokenizer, examples)
        wall = time.perf_counter() - start
    report(f"evaluation, {args.questions} {args.eval_task} questions (per question)", breakdown(prof, wall, args.questions),
           prof, None, rate)


def profile_hvp(args, rate: float) -> None:
    from chaintune.config import TrainingConfig
    from chaintune.curvature import HessianOperator, eager_attention
    from chaintune.models import load_model
    from chaintune.tasks import load_task
    from chaintune.train import attach_lora

    model, tokenizer = load_model(device="cpu", dtype="float32")
    model = attach_lora(model, TrainingConfig(method="lora"), seed=0).eval()
    examples = load_task(args.task, "train", limit=args.hvp_examples)
    with eager_attention(model):
        op = HessianOperator(model, tokenizer, examples, micro_batch=8)
        v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0))
        op(v)  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True) as prof:
            start = time.perf_counter()
            op(v)
            wall = time.perf_counter() - start
    real = sum(int(mask.sum()) for _, _, mask in op.batches)
    padded = sum(mask.numel() for _, _, mask in op.batches)
    report(f"Hessian-vector product, LoRA, {args.hvp_examples} {args.task} examples in micro-batches of 8",
           breakdown(prof, wall, 1), prof, 1 - real / padded, rate)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=["train-full", "train-lora", "eval", "hvp"],
                        default=["train-full", "train-lora", "eval", "hvp"])
    parser.add_argument("--task", default="toxigenqa")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="profiled training steps (after one warm-up step)")
    parser.add_argument("--eval-task", default="arc_challenge")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--hvp-examples", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from bound import matmul_rate, omp_settings

    rate = matmul_rate()
    print(f"profile — SmolLM2-135M fp32, CPU, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f} at start, {omp_settings()}")
    for part in args.only:
        if part.startswith("train"):
            profile_train(part.split("-")[1], args, rate)
        elif part == "eval":
            profile_eval(args, rate)
        else:
            profile_hvp(args, rate)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
