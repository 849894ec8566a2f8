"""Curvature: chaintune's λ_max (`measure_curvature`) vs PyHessian's, same model, loss, batches and tolerance.

After a short training stage on the embedded SmolLM2-135M (or none, with --no-train), both compute λ_max of the
Hessian of the mean answer-token cross-entropy over the same seeded subset of the stage's training data, w.r.t. the
trainable parameters, stopping when the relative change of the estimate is < tol (at most max_iter HVPs):
chaintune by Lanczos from its sampled-gradient start vector (its default, which also requires a small residual, see
docs/curvature.md; --power adds its power iteration), PyHessian by power iteration from its random start
(torch.randn after torch.manual_seed(seed)) in its multi-batch mode (`dataloader=`, the only one that takes the same
micro-batches; its single-batch mode keeps the graph but needs all examples in one batch).

Same batches: PyHessian iterates over chaintune's own micro-batches (`HessianOperator.batches`: the subset sorted
by length, chunks of --micro-batch). Same loss: PyHessian's model is a thin wrapper whose forward takes the packed
(ids, labels, mask) of a micro-batch and returns the logits at answer positions (as `answer_loss_sum` computes them);
its criterion is CE_sum(batch) · N / (T · B), with N examples and T answer tokens in the subset and B examples in the
batch. PyHessian averages per-batch HVPs weighted by B / N, so the weighted sum is exactly chaintune's Σ CE / T for
any batching; with equal-size batches and equal answer-token counts per example (toxigenqa: 1 token each, 64/8 → 8
batches of 8) the criterion is literally the per-batch mean answer-token CE. The bench checks that both losses agree.
Eager attention is forced for both (the CPU flash kernel has no double backward). Times: chaintune's include
subsetting, tokenization and its start-vector pass; PyHessian's only its eigenvalues() call.

Memory, for LoRA and full fine-tuning whatever --method: each measurement runs in a fresh subprocess (same thread
count). The peak RSS high-water mark is reset to the current RSS after setup (/proc/self/clear_refs, value 5) and
read back (VmHWM) after `measure_curvature` capped at 2 Lanczos iterations (start vector, two HVPs, solver vectors,
kept graphs: everything λ_max holds at once) or after one optimizer step of `train_stage` (batch = --micro-batch
examples, the same method); the number printed is the peak minus the RSS just before. torch's CPU allocator returns
large blocks to the OS, so RSS follows tensor memory; tracemalloc does not see torch's allocations. Without
clear_refs it falls back to the ru_maxrss delta.

Bound: one HVP over the subset is timed on its own, the FLOPs of the matrix products it executes are counted
(torch.utils.flop_counter, in a second HVP) and divided by the fp32 matmul rate measured right before (bench/bound.py):
achieved / bound of the HVP as implemented (double backward: about 4 forward passes' worth of products).

Needs `pip install pyhessian==0.1` (torch + numpy only). Set OMP_NUM_THREADS=1 on shared machines (--threads 1).

    python bench/curvature.py [--method lora|full] [--steps 4] [--examples 64] [--micro-batch 8] [--no-train]
                              [--graph-budget BYTES] [--power] [--profile] [--skip bound|lambda|pyhessian|memory]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chaintune  # noqa: E402,F401  (before torch: chaintune.runtime's process settings)
import torch  # noqa: E402
from bound import matmul_rate  # noqa: E402

IGNORE = -100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="toxigenqa")
    parser.add_argument("--method", choices=["full", "lora"], default="lora")
    parser.add_argument("--train-examples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps of the training stage")
    parser.add_argument("--lr", type=float, default=None, help="default 1e-4 (lora) / 1e-5 (full)")
    parser.add_argument("--no-train", action="store_true", help="measure the untrained model")
    parser.add_argument("--examples", type=int, default=64, help="curvature subset size")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--graph-budget", type=float, default=0,
                        help="bytes of first-order graphs chaintune may keep between HVPs (default 0)")
    parser.add_argument("--power", action="store_true", help="also chaintune's power iteration")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (shared machines: keep 1)")
    parser.add_argument("--skip", choices=["bound", "lambda", "pyhessian", "memory"], action="append", default=[],
                        help="leave out a part (bound: the timed HVP and its FLOP count; lambda: both λ_max "
                             "computations)")
    parser.add_argument("--profile", action="store_true", help="time the phases of one micro-batch HVP")
    parser.add_argument("--memory-child", choices=["curvature", "train"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def setup(args: argparse.Namespace, train: bool) -> tuple[Any, Any, list, Any]:
    """(model, tokenizer, training examples, config): SmolLM2-135M fp32 on CPU, LoRA-wrapped if asked, trained."""
    from chaintune.config import TrainingConfig
    from chaintune.models import load_model
    from chaintune.tasks import load_task
    from chaintune.train import attach_lora, train_stage

    lr = args.lr if args.lr is not None else (1e-4 if args.method == "lora" else 1e-5)
    cfg = TrainingConfig(method=args.method, lr=lr, batch_size=args.micro_batch, max_steps=args.steps)
    model, tokenizer = load_model(device="cpu", dtype="float32")
    if args.method == "lora":
        model = attach_lora(model, cfg, seed=args.seed)
    examples = load_task(args.task, "train", limit=args.train_examples)
    if train:
        train_stage(model, tokenizer, examples, cfg, seed=args.seed)
    return model.eval(), tokenizer, examples, cfg


def curvature_subset(examples: list, args: argparse.Namespace) -> list:
    """The subset measure_curvature draws (same seed, grouping and salt)."""
    from chaintune.tasks.splits import subsample

    return subsample(examples, args.examples, args.seed, group=lambda e: e.group, salt="curvature")


class AnswerLogits(torch.nn.Module):
    """PyHessian's model: packed (B, 3, L) = (ids, labels, mask) → logits at answer positions (answer_loss_sum's)."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        from chaintune.evaluate import decoder_and_head

        ids, labels, mask = packed.unbind(1)
        rows, cols = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
        decoder, head = decoder_and_head(self.lm)
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        return head(hidden[rows, cols]).float()


class AnswerCE:
    """criterion(logits, targets) with targets = labels[:, 1:] (B, L−1): CE_sum · N / (T · B) (see module doc)."""

    def __init__(self, n_examples: int, n_tokens: int) -> None:
        self.n_examples, self.n_tokens, self.calls = n_examples, n_tokens, 0

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        ce = torch.nn.functional.cross_entropy(logits, targets[targets != IGNORE], reduction="sum")
        return ce * self.n_examples / (self.n_tokens * targets.size(0))


def run_pyhessian(model, op, args: argparse.Namespace) -> dict[str, float]:
    from pyhessian import hessian

    from chaintune.curvature import eager_attention

    loader = [(torch.stack(batch, 1), batch[1][:, 1:]) for batch in op.batches]
    n_examples = sum(b[0].size(0) for b in op.batches)
    criterion = AnswerCE(n_examples, op.n_tokens)
    wrapper = AnswerLogits(model)
    with eager_attention(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # backward(create_graph=True) reference-cycle warning
        with torch.no_grad():
            loss = sum(criterion(wrapper(x), y).item() * x.size(0) for x, y in loader) / n_examples
        criterion.calls = 0
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        eigenvalues, _ = hessian(wrapper, criterion, dataloader=loader, cuda=False).eigenvalues(
            maxIter=args.max_iter, tol=args.tol, top_n=1)
        seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return {"lambda_max": eigenvalues[0], "seconds": seconds, "hvps": criterion.calls / len(loader), "loss": loss}


def compare(model, tokenizer, examples: list, op, args: argparse.Namespace) -> None:
    """λ_max by chaintune's measure_curvature (Lanczos; power iteration with --power) and by PyHessian."""
    from chaintune.curvature import measure_curvature

    rows, runs = {}, {}
    for method in ["lanczos", "power"] if args.power else ["lanczos"]:
        start = time.perf_counter()
        run = measure_curvature(model, tokenizer, examples, n_examples=args.examples, seed=args.seed,
                                micro_batch=args.micro_batch, tol=args.tol, max_iter=args.max_iter, method=method,
                                graph_budget=args.graph_budget)
        runs[method] = run
        rows[f"chaintune {method}"] = {"lambda_max": run.lambda_max, "seconds": time.perf_counter() - start,
                                       "hvps": run.hvp_calls, "loss": run.loss}
    if "pyhessian" not in args.skip:
        rows["PyHessian power"] = run_pyhessian(model, op, args)
    print(f"{'tool':<18} {'λ_max':>12} {'HVPs':>5} {'seconds':>9} {'s/HVP':>7} {'loss':>10}")
    for tool, r in rows.items():
        print(f"{tool:<18} {r['lambda_max']:>12.6f} {r['hvps']:>5.0f} {r['seconds']:>9.1f} "
              f"{r['seconds'] / r['hvps']:>7.2f} {r['loss']:>10.6f}")
    for method, run in runs.items():
        print(f"chaintune {method}: {run.iterations} iterations, converged={run.converged}, plus one forward+backward "
              f"pass per micro-batch for the start vector (in its seconds)")
    if "PyHessian power" in rows:
        ph = rows["PyHessian power"]
        print(f"loss agreement: |Δ| = {abs(runs['lanczos'].loss - ph['loss']):.2e} (same loss and batches)")
        for tool, r in rows.items():
            if tool == "PyHessian power":
                continue
            rel = abs(r["lambda_max"] - ph["lambda_max"]) / abs(ph["lambda_max"])
            ratio = ph["seconds"] / r["seconds"]
            print(f"{tool}: λ_max relative difference {rel:.3%} (target ≤ 2%) → {'OK' if rel <= 0.02 else 'MISS'}; "
                  f"time PyHessian / {tool}: {ratio:.2f}× (target ≥ 2×) → {'OK' if ratio >= 2 else 'MISS'}; HVPs "
                  f"{ph['hvps']:.0f} vs {r['hvps']:.0f}")


def hvp_bound(op) -> None:
    """Seconds of one HVP over the whole subset, the FLOPs of the matrix products it executes (FlopCounterMode, a
    second HVP) and the fp32 matmul rate measured right before: achieved / bound for the HVP as implemented."""
    from torch.utils.flop_counter import FlopCounterMode

    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0))
    rate = matmul_rate()
    start = time.perf_counter()
    op(v)
    seconds = time.perf_counter() - start
    with FlopCounterMode(display=False) as counter:
        op(v)
    flops = counter.get_total_flops()
    print(f"one HVP over {sum(b[0].size(0) for b in op.batches)} examples: {seconds:.1f} s; {flops / 1e9:.0f} GFLOP of "
          f"matrix products → {flops / seconds / 1e9:.0f} GFLOP/s = {flops / seconds / rate:.2f} of the fp32 matmul rate "
          f"({rate / 1e9:.0f} GFLOP/s, {torch.get_num_threads()} threads; bound {flops / rate:.1f} s/HVP)")


def profile_hvp(model, op) -> None:
    """Seconds per phase of one micro-batch HVP, and the top ops of a full HVP by self CPU time."""
    from chaintune.curvature import eager_attention
    from chaintune.train import answer_loss_sum

    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0))
    vs = [c.view_as(p) for c, p in zip(torch.split(v, [p.numel() for p in op.params]), op.params)]
    batch = op.batches[len(op.batches) // 2]
    with eager_attention(model):
        phases = {}
        t0 = time.perf_counter()
        loss, _ = answer_loss_sum(model, *batch)
        t1 = time.perf_counter()
        grads = torch.autograd.grad(loss / op.n_tokens, op.params, create_graph=True)
        t2 = time.perf_counter()
        torch.autograd.grad(grads, op.params, grad_outputs=vs)
        t3 = time.perf_counter()
        with torch.no_grad():
            answer_loss_sum(model, *batch)
        t4 = time.perf_counter()
        loss, _ = answer_loss_sum(model, *batch)
        torch.autograd.grad(loss, op.params)
        t5 = time.perf_counter()
        phases = {"forward (graph)": t1 - t0, "grad, create_graph": t2 - t1, "second grad (v as cotangent)": t3 - t2,
                  "HVP total": t3 - t0, "forward (no_grad)": t4 - t3, "forward+backward (gradient)": t5 - t4}
        print(f"profile — one micro-batch of {batch[0].shape[0]}×{batch[0].shape[1]} tokens:")
        for name, secs in phases.items():
            print(f"  {name:<28} {secs:7.3f} s  ({secs / phases['forward (no_grad)']:5.1f}× no-grad forward)")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            op(v)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=48))


# ------------------------------------------------------------------------------------------------------- memory
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def memory_child(args: argparse.Namespace) -> None:
    """Runs in its own process: peak extra RSS (MiB) of λ_max capped at 2 iterations, or of one training step."""
    from chaintune.curvature import measure_curvature
    from chaintune.train import train_stage

    model, tokenizer, examples, cfg = setup(args, train=False)  # weights' values do not change memory
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        method, before = "VmHWM", _rss_kib("VmRSS")
    except OSError:
        method, before = "ru_maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if args.memory_child == "curvature":
        measure_curvature(model, tokenizer, examples, n_examples=args.examples, seed=args.seed,
                          micro_batch=args.micro_batch, max_iter=2, graph_budget=args.graph_budget)
    else:
        train_stage(model, tokenizer, curvature_subset(examples, args), cfg.model_copy(update={"max_steps": 1}),
                    seed=args.seed)
    seconds = time.perf_counter() - start
    after = _rss_kib("VmHWM") if method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": (after - before) / 1024, "method": method, "seconds": seconds}))


def measure_memory(kind: str, argv: list[str], method: str) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    out = subprocess.run([sys.executable, __file__, *argv, "--method", method, "--memory-child", kind],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return
    from chaintune.curvature import HessianOperator, eager_attention

    start = time.perf_counter()
    model, tokenizer, examples, cfg = setup(args, train=not args.no_train)
    train_seconds = time.perf_counter() - start
    subset = curvature_subset(examples, args)

    with eager_attention(model):
        op = HessianOperator(model, tokenizer, subset, micro_batch=args.micro_batch)
    training = "no training" if args.no_train else f"{args.steps} steps × {args.micro_batch} ({train_seconds:.0f} s)"
    print(f"curvature — SmolLM2-135M fp32, {args.method} ({op.dim:,} trainable params), {training} on "
          f"{len(examples)} {args.task} train examples; λ_max over {len(subset)} examples, "
          f"{len(op.batches)} micro-batches of ≤{args.micro_batch}, {op.n_tokens} answer tokens; "
          f"tol {args.tol:g}, max_iter {args.max_iter}; CPU, torch threads {torch.get_num_threads()}")
    if "bound" not in args.skip:
        with eager_attention(model):
            hvp_bound(op)
    if "lambda" not in args.skip:
        compare(model, tokenizer, examples, op, args)
    if args.profile:
        profile_hvp(model, op)
    if "memory" not in args.skip:
        budget = f"graph budget {args.graph_budget:g} B"
        for method in ("lora", "full"):
            curv, step = measure_memory("curvature", argv, method), measure_memory("train", argv, method)
            print(f"peak extra RSS ({curv['method']}, fresh subprocess each), {method}: λ_max capped at 2 Lanczos "
                  f"iterations over {len(subset)} examples ({budget}) {curv['peak_mib']:.0f} MiB "
                  f"({curv['seconds']:.0f} s) vs one training step (batch {args.micro_batch}, AdamW) "
                  f"{step['peak_mib']:.0f} MiB → ratio {curv['peak_mib'] / step['peak_mib']:.2f} (target < 4)")


if __name__ == "__main__":
    main()
