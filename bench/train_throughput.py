"""Training throughput: chaintune's stage trainer vs Hugging Face `Trainer`, same model, data, batch, one run, with
the machine's bound printed beside them (bench/bound.py).

Both fine-tune the same weights on the same tokenized examples (prompt + gold answer, prompt tokens masked with
-100) for the same number of optimizer steps with AdamW, constant LR and gradient clipping 1.0, alternating
(chaintune, Trainer, chaintune, Trainer, ...) so that load from other processes hits both alike; the matmul rate is
sampled before every run. Tokens/s counts non-padding input tokens over the wall time of the training loop (model
loading excluded; with --compile, chaintune's compile time is printed separately and left out of its seconds).
`achieved / bound` divides the useful FLOPs of the examples each tool trained on (bench/bound.py: no padding, LM head
on answer tokens only) per second by the fp32 matmul rate. --contend runs a CPU-bound process beside the benchmark.

    python bench/train_throughput.py [--task toxigenqa] [--examples 256] [--steps 8] [--batch-size 16]
                                     [--method full|lora] [--repeats 2] [--compile] [--contend]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chaintune  # noqa: E402,F401  (before torch: chaintune.runtime's process settings)
import torch  # noqa: E402
from bound import RateSamples, Shapes, layer_matmul_rate, omp_settings, training_flops, verdict  # noqa: E402

TARGET_RATIO, TARGET_BOUND = 2.0, 0.75


def hf_trainer_run(model, tokenizer, data, args) -> dict:
    """tokens, seconds and (lengths, answer tokens) of the examples that transformers.Trainer trained on."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    rows = [{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids)} for e in data]
    targs = TrainingArguments(output_dir="/tmp/chaintune-bench-hf", per_device_train_batch_size=args.batch_size,
                              max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
                              weight_decay=0.0, max_grad_norm=1.0, logging_steps=10_000, save_strategy="no",
                              report_to=[], use_cpu=not torch.cuda.is_available(), seed=0,
                              disable_tqdm=True, dataloader_num_workers=0,
                              **({"train_sampling_strategy": "group_by_length"} if args.hf_group_by_length else {}))
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collator)
    lengths: list[int] = []
    answers = [0]
    original = trainer.training_step

    def counting_step(model_, inputs, *a, **k):
        lengths.extend(int(n) for n in inputs["attention_mask"].sum(1))
        answers[0] += int((inputs["labels"][:, 1:] != -100).sum())
        return original(model_, inputs, *a, **k)

    trainer.training_step = counting_step
    start = time.perf_counter()
    trainer.train()
    return {"tokens": sum(lengths), "seconds": time.perf_counter() - start, "lengths": lengths, "answers": answers[0]}


def chaintune_run(model, tokenizer, examples, cfg, args) -> dict:
    from chaintune.train import IGNORE, plan_steps, tokenize_sft, train_stage

    kwargs = {"compile": True} if args.compile else {}
    res = train_stage(model, tokenizer, examples, cfg, seed=0, **kwargs)
    data = tokenize_sft(tokenizer, examples, cfg.max_length)
    steps = plan_steps([len(e.input_ids) for e in data], cfg.batch_size, cfg.grad_accum, 0, 0)[:args.steps]
    used = [data[i] for step in steps for mb in step for i in mb]
    return {"tokens": res.tokens, "seconds": res.seconds, "lengths": [len(e.input_ids) for e in used],
            "answers": sum(sum(t != IGNORE for t in e.labels[1:]) for e in used),
            "compile_seconds": getattr(res, "compile_seconds", 0.0)}


def busy_process() -> subprocess.Popen:
    """A CPU-bound process (one Python loop) beside the benchmark."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="toxigenqa")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--method", choices=["full", "lora"], default="full")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each tool, alternating")
    parser.add_argument("--tools", nargs="+", choices=["chaintune", "hf_trainer"], default=["chaintune", "hf_trainer"])
    parser.add_argument("--compile", action="store_true", help="chaintune with torch.compile (train_stage(compile=True))")
    parser.add_argument("--contend", action="store_true", help="run a CPU-bound process beside the benchmark")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--hf-group-by-length", action="store_true", help="let Trainer bucket by length too")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from chaintune.config import TrainingConfig
    from chaintune.models import load_model
    from chaintune.tasks import load_task
    from chaintune.train import attach_lora, tokenize_sft

    examples = load_task(args.task, "train", limit=args.examples)
    cfg = TrainingConfig(method=args.method, lr=args.lr, batch_size=args.batch_size, max_steps=args.steps)
    rates, runs = RateSamples(), {tool: [] for tool in args.tools}
    busy = busy_process() if args.contend else None
    load_start = os.getloadavg()[0]
    try:
        for _ in range(args.repeats):
            for tool in args.tools:
                model, tokenizer = load_model(device="cpu" if not torch.cuda.is_available() else None, dtype="float32")
                if args.method == "lora":
                    model = attach_lora(model, cfg, seed=0)
                rate = rates.sample()
                if tool == "chaintune":
                    run = chaintune_run(model, tokenizer, examples, cfg, args)
                else:
                    run = hf_trainer_run(model, tokenizer, tokenize_sft(tokenizer, examples, cfg.max_length), args)
                shapes = Shapes.of(model.config)
                run["flops"] = training_flops(shapes, run["lengths"], run["answers"], args.method, cfg.lora.r,
                                              cfg.lora.target_modules)
                # what the tool computes: HF Trainer runs the LM head on every position, chaintune on answers only
                run["work"] = run["flops"] if tool == "chaintune" else training_flops(
                    shapes, run["lengths"], sum(run["lengths"]), args.method, cfg.lora.r, cfg.lora.target_modules)
                run["rate"] = rate
                runs[tool].append(run)
                del model
    finally:
        if busy is not None:
            busy.kill()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"train throughput — {args.task}, {args.examples} examples, {args.steps} steps × batch {args.batch_size}, "
          f"{args.method} fine-tuning, SmolLM2-135M fp32, {device}{', compiled' if args.compile else ''}")
    print(f"conditions: load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
          f"{'a CPU-bound process beside it' if args.contend else 'no process added'}; "
          f"{omp_settings()}")
    print(rates.line())
    print(f"{'tool':<12} {'run':>3} {'tokens/s':>9} {'seconds':>8} {'useful GFLOP/s':>15} {'of bound':>9}")
    for tool, tool_runs in runs.items():
        for i, r in enumerate(tool_runs):
            extra = f"  (+{r['compile_seconds']:.0f} s compile)" if r.get("compile_seconds") else ""
            print(f"{tool:<12} {i:>3} {r['tokens'] / r['seconds']:>9.1f} {r['seconds']:>8.1f} "
                  f"{r['flops'] / r['seconds'] / 1e9:>15.1f} {r['flops'] / r['seconds'] / r['rate']:>9.2f}{extra}")
    ours = runs.get("chaintune", [])
    if ours:
        achieved = statistics.median(r["flops"] / r["seconds"] / r["rate"] for r in ours)
        per_token = statistics.median(r["flops"] / r["tokens"] for r in ours)
        print(f"chaintune: {verdict(achieved, 1.0, TARGET_BOUND)}; bound ≈ "
              f"{statistics.median(rates.fp32) / per_token:.0f} tokens/s at the median fp32 rate")
        # the same products at this run's own shapes: one micro-batch's tokens through one layer's linear modules
        tokens = round(args.batch_size * statistics.mean(ours[0]["lengths"]))
        products = ("forward", "input", "weight") if args.method == "full" else ("forward", "input")
        shaped = layer_matmul_rate(shapes.linear, tokens, products)
        print(f"a layer's linear products at {tokens} tokens ({', '.join(products)}): {shaped / 1e9:.0f} GFLOP/s "
              f"= {shaped / statistics.median(rates.fp32):.2f} of the square product's rate; chaintune's useful "
              f"FLOP/s = {statistics.median(r['flops'] / r['seconds'] for r in ours) / shaped:.2f} of it")
    if ours and runs.get("hf_trainer"):
        ratios = [(a["tokens"] / a["seconds"]) / (b["tokens"] / b["seconds"]) for a, b in zip(ours, runs["hf_trainer"])]
        print(f"ratio chaintune / HF Trainer per pair: {', '.join(f'{x:.2f}×' for x in ratios)}; median "
              f"{statistics.median(ratios):.2f}× (target ≥ {TARGET_RATIO:.1f}×: "
              f"{'met' if statistics.median(ratios) >= TARGET_RATIO else 'NOT met'})")
        work = statistics.median((b["work"] / b["tokens"]) / (a["work"] / a["tokens"])
                                 for a, b in zip(ours, runs["hf_trainer"]))
        efficiency = statistics.median((a["work"] / a["seconds"]) / (b["work"] / b["seconds"])
                                       for a, b in zip(ours, runs["hf_trainer"]))
        print(f"FLOPs per token, HF Trainer / chaintune: {work:.2f} (the ratio both would reach at the same FLOP/s); "
              f"chaintune's FLOP/s / HF Trainer's: {efficiency:.2f}; the target needs {TARGET_RATIO / work:.2f}")


if __name__ == "__main__":
    main()
