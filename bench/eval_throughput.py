"""Multiple-choice scoring throughput: chaintune vs lm-evaluation-harness HFLM, same model, questions and machine.

One run each (chaintune first), in one process, on the same already loaded model (embedded SmolLM2-135M, fp32). Only scoring is timed
(tokenization included on both sides); model / data / HFLM set-up is reported separately.

    python bench/eval_throughput.py              # 500 ARC-Challenge test questions
    python bench/eval_throughput.py --limit 50   # quick run
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_eval_parity import lm_eval_scores, make_hflm  # noqa: E402

from chaintune.evaluate import score_examples  # noqa: E402
from chaintune.models import load_model  # noqa: E402
from chaintune.tasks import load_task  # noqa: E402

TARGET_SPEEDUP = 1.5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="arc_challenge")
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval HFLM batch size")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for both (default: torch's). On a shared, busy machine use 1: "
                             "oversubscribed OpenMP threads slow lm-eval's many small batches far more than chaintune")
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
    ours = score_examples(model, tokenizer, examples)
    ours_s = time.perf_counter() - t

    t = time.perf_counter()
    lm = make_hflm(model, tokenizer, args.batch_size)
    hflm_init_s = time.perf_counter() - t
    t = time.perf_counter()
    theirs = lm_eval_scores(lm, examples)
    theirs_s = time.perf_counter() - t

    max_delta = max(abs(a - b) for o, r in zip(ours, theirs) for a, b in zip(o, r))
    ours_qps, theirs_qps = n / ours_s, n / theirs_s
    ratio = ours_qps / theirs_qps
    print(f"{args.task}/test: {n} questions, {n_choices} choices; model {args.model} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, {next(model.parameters()).dtype})")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} (at end)")
    print(f"load (not timed below): model {model_load_s:.1f}s  data {data_load_s:.1f}s  HFLM wrapper {hflm_init_s:.1f}s")
    print()
    print(f"{'':28}{'chaintune':>12}{'lm-eval':>12}")
    print(f"{'setting':28}{'packed':>12}{f'bs={args.batch_size}':>12}")
    print(f"{'scoring time (s)':28}{ours_s:12.1f}{theirs_s:12.1f}")
    print(f"{'questions / s':28}{ours_qps:12.2f}{theirs_qps:12.2f}")
    print(f"{'choices / s':28}{n_choices / ours_s:12.2f}{n_choices / theirs_s:12.2f}")
    print()
    print(f"speed-up chaintune / lm-eval: {ratio:.2f}x (target >= {TARGET_SPEEDUP}x: {'met' if ratio >= TARGET_SPEEDUP else 'NOT met'})")
    print(f"sanity: max |Δ loglik| = {max_delta:.2e} nats; "
          f"acc agree = {all(int(np.argmax(o)) == int(np.argmax(r)) for o, r in zip(ours, theirs))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
