"""The memory planner against measured peaks on CPU: estimate vs measured per case (model, method, batch, length).

Each case trains 2 optimizer steps of chaintune's stage trainer (fp32, SDPA attention; the second step runs with
the AdamW moments allocated) on micro-batches padded to `--seq` tokens, and measures the peak of live torch
tensors with the profiler's allocation events (`chaintune.memory.measure_peak`), plus the weights alive before.
The curvature cases measure one Lanczos run of 2 Hessian-vector products the same way. Pass: |estimate / measured
− 1| ≤ 25 % in every case.

    python bench/memory_plan.py [--cases tiny-full,tiny-lora,135m-full,135m-lora,tiny-hvp,135m-hvp] [--seq 128]
    python bench/memory_plan.py --llama      # the planner's figures for the Llama-3.2-1B and 3.1-8B shapes
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch

from chaintune.config import CurvatureConfig, TrainingConfig
from chaintune.memory import ModelShape, Setup, curvature_estimate, measure_peak, training_estimate
from chaintune.tasks import Example

TOLERANCE = 0.25
CASES = ("tiny-full", "tiny-lora", "135m-full", "135m-lora", "tiny-hvp", "135m-hvp")


def padded_examples(tokenizer, n: int, seq: int, batch: int) -> list[Example]:
    """`n` questions of seq, seq − 1, …, seq − batch + 1 tokens (prompt + answer, as training tokenizes them), so
    that every micro-batch is padded to `seq` tokens (the usual case: SDPA gets a mask)."""
    from chaintune.train import tokenize_sft

    def example(i: int, words: int) -> Example:
        return Example(id=str(i), prompt="Question:" + " the" * words + "\nAnswer:", choices=(" yes", " no"), gold=0)

    out = []
    for i in range(n):
        target, words = seq - i % batch, seq
        while (length := len(tokenize_sft(tokenizer, [example(i, words)], 10**6)[0].input_ids)) != target:
            words += target - length
        out.append(example(i, words))
    return out


def tiny_model():
    """A 4-layer random Llama (hidden 64) with the in-code tokenizer: big enough that every part of the estimate
    matters, small enough for a unit test."""
    from chaintune.models import tiny_llama

    return tiny_llama(seed=0, hidden_size=64, num_layers=4)


def load(case: str):
    from chaintune.models import load_model

    if case.startswith("tiny"):
        return tiny_model()
    return load_model(device="cpu", dtype="float32")


def tensor_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (distinct storages)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in list(model.parameters()) + list(model.buffers())}
    return sum(storages.values())


def answer_tokens(tokenizer, example: Example) -> int:
    from chaintune.evaluate import encode_pair

    return len(encode_pair(tokenizer, example.prompt, example.choices[example.gold])[1])


def measure_training(model, tokenizer, cfg: TrainingConfig) -> tuple[float, float]:
    """(measured peak bytes, estimated peak bytes) of 2 optimizer steps of `train_stage`."""
    from chaintune.train import attach_lora, train_stage

    examples = padded_examples(tokenizer, 2 * cfg.batch_size, cfg.max_length, cfg.batch_size)
    if cfg.method == "lora":
        model = attach_lora(model, cfg, seed=0)
    model.train()
    baseline = tensor_bytes(model)
    measured = baseline + measure_peak(lambda: train_stage(model, tokenizer, examples, cfg, seed=0))
    shape = ModelShape.from_config(model.config.to_dict())
    answers = max(answer_tokens(tokenizer, e) for e in examples)
    setup = Setup(precision="fp32")
    estimate = training_estimate(shape, cfg, setup, seq=cfg.max_length, answer_tokens=answers)
    if os.environ.get("MEMORY_PLAN_PARTS"):
        print({k: round(v / 2**20, 1) for k, v in vars(estimate).items() if v is not None})
    return measured, estimate.peak


def measure_hvp(model, tokenizer, cfg: TrainingConfig, curvature: CurvatureConfig) -> tuple[float, float]:
    """(measured, estimated) peak bytes of a Lanczos run of 2 HVPs over one micro-batch of `seq`-token examples."""
    from chaintune.curvature import HessianOperator, eager_attention, lanczos

    examples = padded_examples(tokenizer, curvature.micro_batch, cfg.max_length, curvature.micro_batch)
    model.eval()
    baseline = tensor_bytes(model)

    def run() -> None:
        with eager_attention(model):
            op = HessianOperator(model, tokenizer, examples, micro_batch=curvature.micro_batch,
                                 max_length=cfg.max_length)
            lanczos(op, op.dim, op.device, 1, 0, tol=1e-12, max_iter=2, start=op.start_vector(0))

    measured = baseline + measure_peak(run)
    shape = ModelShape.from_config(model.config.to_dict())
    answers = max(answer_tokens(tokenizer, e) for e in examples)
    return measured, curvature_estimate(shape, cfg, curvature, seq=cfg.max_length, answer_tokens=answers)


def run_case(case: str, seq: int, batch: int, checkpointing: bool = False) -> dict:
    """One case: its measured and estimated peaks (bytes) and the seconds it took."""
    start = time.perf_counter()
    model, tokenizer = load(case)
    method = "lora" if case.endswith("lora") else "full"
    cfg = TrainingConfig(method=method, lr=1e-5, batch_size=batch, max_steps=2, max_length=seq,
                         gradient_checkpointing=checkpointing)
    if case.endswith("hvp"):
        # one subset: the 2-iteration Lanczos below keeps no basis (with ≥ 2 subsets the estimate adds max_iter vectors)
        measured, estimated = measure_hvp(model, tokenizer, cfg, CurvatureConfig(micro_batch=max(1, batch // 2),
                                                                                 subsets=1))
    else:
        measured, estimated = measure_training(model, tokenizer, cfg)
    return {"case": case, "seq": seq, "batch": batch, "checkpointing": checkpointing, "measured": measured,
            "estimated": estimated, "ratio": estimated / measured, "seconds": time.perf_counter() - start}


def mib(value: float) -> str:
    return f"{value / 2**20:.1f}"


def llama_figures() -> None:
    """The planner's figures for the Llama-3.2-1B and Llama-3.1-8B shapes (docs/memory.md): paper settings, batch
    16, 512 tokens, bf16-mixed; GiB per device."""
    from chaintune.memory import KNOWN_SHAPES

    print("| model | method | setup | micro-batch | weights | gradients | optimizer | activations | transient | peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in ("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.1-8B"):
        for method in ("full", "lora"):
            cfg = TrainingConfig(method=method, batch_size=16, max_length=512, lora={"r": 16, "alpha": 32})
            for setup in (Setup(1, "ddp", False, 16), Setup(1, "ddp", True, 16), Setup(8, "ddp", False, 2),
                          Setup(8, "fsdp", False, 2), Setup(8, "fsdp", True, 2)):
                e = training_estimate(KNOWN_SHAPES[name], cfg, setup)
                where = ("1 GPU" if setup.devices == 1 else f"8 GPUs, {setup.strategy}") + (
                    ", checkpointing" if setup.checkpointing else "")
                parts = " | ".join(f"{getattr(e, k) / 2**30:.1f}" for k in ("weights", "gradients", "optimizer",
                                                                           "activations", "transient"))
                print(f"| {name.split('/')[1]} | {method} | {where} | {setup.micro_batch} | {parts} | "
                      f"**{e.peak / 2**30:.1f}** |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--seq", type=int, default=128, help="tokens per example (default 128)")
    parser.add_argument("--batch", type=int, default=16, help="examples per micro-batch (default 16, the paper's)")
    parser.add_argument("--checkpointing", action="store_true", help="also each training case with checkpointing")
    parser.add_argument("--llama", action="store_true", help="only print the 1B and 8B Llama figures (no measuring)")
    args = parser.parse_args(argv)
    if args.llama:
        llama_figures()
        return 0
    torch.manual_seed(0)
    logging.disable(logging.WARNING)  # the examples are cut to --seq tokens on purpose
    print(f"memory plan vs measured peak — CPU ({torch.get_num_threads()} threads), fp32, SDPA; tolerance "
          f"±{TOLERANCE:.0%}")
    print(f"{'case':<12} {'seq':>4} {'batch':>5} {'ckpt':>5} {'measured MiB':>13} {'estimate MiB':>13} "
          f"{'est/meas':>9} {'s':>6}")
    ok = True
    for case in args.cases.split(","):
        for checkpointing in (False, True) if args.checkpointing and not case.endswith("hvp") else (False,):
            row = run_case(case, args.seq, args.batch, checkpointing)
            ok &= abs(row["ratio"] - 1) <= TOLERANCE
            print(f"{row['case']:<12} {row['seq']:>4} {row['batch']:>5} {'on' if checkpointing else 'off':>5} "
                  f"{mib(row['measured']):>13} {mib(row['estimated']):>13} {row['ratio']:>9.2f} "
                  f"{row['seconds']:>6.0f}", flush=True)
    print("all within tolerance" if ok else "SOME CASES OUTSIDE THE TOLERANCE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
