"""Multiple-choice scoring throughput: chaintune vs lm-evaluation-harness HFLM, same model, questions and machine,
with the machine's bound printed beside them (bench/bound.py).

Both score the same questions with the same already loaded model (embedded SmolLM2-135M, fp32) in one process,
alternating (chaintune, lm-eval, chaintune, lm-eval, ...) so that load from other processes hits both alike; the
matmul rate is sampled before every run. Only scoring is timed (tokenization included on both sides); model, data
and HFLM set-up are reported separately. `achieved / bound`: the useful FLOPs of scoring every question with its
context computed once (bench/bound.py) per second, over the fp32 matmul rate. --contend runs a CPU-bound process
beside the benchmark.

    python bench/eval_throughput.py              # 500 ARC-Challenge test questions
    python bench/eval_throughput.py --limit 50   # quick run
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chaintune  # noqa: E402,F401  (before torch: chaintune.runtime's process settings)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from bound import (RateSamples, Shapes, causal_keys, forward_flops, layer_matmul_rate,  # noqa: E402
                   omp_settings, packed_eval_flops, verdict)
from lm_eval_parity import lm_eval_scores, make_hflm  # noqa: E402
from train_throughput import busy_process  # noqa: E402

from chaintune.evaluate import pack_question, score_examples  # noqa: E402
from chaintune.models import load_model  # noqa: E402
from chaintune.tasks import load_task  # noqa: E402

TARGET_RATIO, TARGET_BOUND = 3.0, 0.85
EVAL_BATCH_TOKENS = 1024  # score_examples' default max_tokens: padded tokens per forward pass


def useful_flops(model, tokenizer, examples) -> tuple[float, float]:
    """FLOPs of scoring `examples` with each context computed once (bench/bound.py, packed_eval_flops), and those
    lm-eval's way of scoring computes: each choice with its own copy of the context, the LM head on every position."""
    shapes = Shapes.of(model.config)
    max_length = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    useful = peer = 0.0
    for i, ex in enumerate(examples):
        q = pack_question(i, tokenizer, ex, max_length)
        choices = [end - start for start, end in q.spans]
        useful += packed_eval_flops(shapes, q.context_len, choices)
        peer += sum(forward_flops(shapes, q.context_len + c, causal_keys(q.context_len + c), q.context_len + c)
                    for c in choices)
    return useful, peer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="arc_challenge")
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval HFLM batch size")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each tool, alternating")
    parser.add_argument("--tools", nargs="+", choices=["chaintune", "lm-eval"], default=["chaintune", "lm-eval"])
    parser.add_argument("--contend", action="store_true", help="run a CPU-bound process beside the benchmark")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for both (default: torch's)")
    parser.add_argument("--compile", action="store_true",
                        help="chaintune through torch.compile (score_examples(compile=True)); the first call, which "
                             "compiles, is timed apart")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t = time.perf_counter()
    model, tokenizer = load_model(args.model)
    model_load_s = time.perf_counter() - t
    t = time.perf_counter()
    examples = load_task(args.task, "test", limit=args.limit)
    data_load_s = time.perf_counter() - t
    n, n_choices = len(examples), sum(len(e.choices) for e in examples)
    t = time.perf_counter()
    lm = make_hflm(model, tokenizer, args.batch_size) if "lm-eval" in args.tools else None
    hflm_init_s = time.perf_counter() - t
    flops, peer_flops = useful_flops(model, tokenizer, examples)
    compile_s = None
    if args.compile and "chaintune" in args.tools:
        t = time.perf_counter()
        score_examples(model, tokenizer, examples, compile=True)  # compiles; later calls reuse the compiled code
        compile_s = time.perf_counter() - t

    rates, runs, scores = RateSamples(), {tool: [] for tool in args.tools}, {}
    busy = busy_process() if args.contend else None
    load_start = os.getloadavg()[0]
    try:
        for _ in range(args.repeats):
            for tool in args.tools:
                rate = rates.sample()
                t = time.perf_counter()
                scores[tool] = (score_examples(model, tokenizer, examples, compile=args.compile) if tool == "chaintune"
                                else lm_eval_scores(lm, examples))
                runs[tool].append({"seconds": time.perf_counter() - t, "rate": rate})
    finally:
        if busy is not None:
            busy.kill()

    print(f"{args.task}/test: {n} questions, {n_choices} choices; model {args.model} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, {next(model.parameters()).dtype})")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {omp_settings()}")
    print(f"conditions: load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
          f"{'a CPU-bound process beside it' if args.contend else 'no process added'}")
    print(f"load (not timed below): model {model_load_s:.1f}s  data {data_load_s:.1f}s  HFLM wrapper {hflm_init_s:.1f}s"
          + (f"  chaintune's first compiled pass (compilation + one scoring) {compile_s:.1f}s" if compile_s else ""))
    print(rates.line())
    print(f"useful work: {flops / 1e12:.2f} TFLOP ({flops / n / 1e9:.1f} GFLOP per question)")
    print(f"{'tool':<10} {'run':>3} {'seconds':>8} {'questions/s':>12} {'useful GFLOP/s':>15} {'of bound':>9}")
    for tool, tool_runs in runs.items():
        for i, r in enumerate(tool_runs):
            print(f"{tool:<10} {i:>3} {r['seconds']:>8.1f} {n / r['seconds']:>12.2f} {flops / r['seconds'] / 1e9:>15.1f} "
                  f"{flops / r['seconds'] / r['rate']:>9.2f}")
    if "chaintune" in runs:
        achieved = statistics.median(flops / r["seconds"] / r["rate"] for r in runs["chaintune"])
        print(f"chaintune: {verdict(achieved, 1.0, TARGET_BOUND)}; bound ≈ "
              f"{statistics.median(rates.fp32) / (flops / n):.1f} questions/s at the median fp32 rate")
        shaped = layer_matmul_rate(Shapes.of(model.config).linear, EVAL_BATCH_TOKENS)
        print(f"a layer's linear products at {EVAL_BATCH_TOKENS} tokens (score_examples' batch): "
              f"{shaped / 1e9:.0f} GFLOP/s = {shaped / statistics.median(rates.fp32):.2f} of the square product's "
              f"rate; chaintune's useful FLOP/s = "
              f"{statistics.median(flops / r['seconds'] for r in runs['chaintune']) / shaped:.2f} of it")
    if len(runs) == 2:
        ratios = [b["seconds"] / a["seconds"] for a, b in zip(runs["chaintune"], runs["lm-eval"])]
        median = statistics.median(ratios)
        print(f"speed-up chaintune / lm-eval per pair: {', '.join(f'{x:.2f}×' for x in ratios)}; median {median:.2f}× "
              f"(target ≥ {TARGET_RATIO:.1f}×: {'met' if median >= TARGET_RATIO else 'NOT met'})")
        print(f"FLOPs, lm-eval's scoring / chaintune's: {peer_flops / flops:.2f} (the speed-up both would reach at the "
              f"same FLOP/s); chaintune's FLOP/s / lm-eval's: {median * flops / peer_flops:.2f}; the target needs "
              f"{TARGET_RATIO * flops / peer_flops:.2f}")
        ours, theirs = scores["chaintune"], scores["lm-eval"]
        max_delta = max(abs(a - b) for o, r in zip(ours, theirs) for a, b in zip(o, r))
        print(f"sanity: max |Δ loglik| = {max_delta:.2e} nats; acc agree = "
              f"{all(int(np.argmax(o)) == int(np.argmax(r)) for o, r in zip(ours, theirs))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
