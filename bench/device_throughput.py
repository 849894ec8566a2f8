"""Eval and train throughput and peak memory of one model on one device, with the memory planner's estimate beside
the measured peak (part of bench/device_smoke.sh).

Train: chaintune's stage trainer (fp32 weights; bf16 autocast on CUDA) for `--steps` optimizer steps of
`--batch` examples padded to `--seq` tokens; tokens/s = non-padding tokens / training seconds; the peak is
`chaintune.memory.measure_peak` (CUDA: the caching allocator's peak; CPU: the profiler's allocations) plus the
weights. Eval: packed scoring (`evaluate`) of `--questions` test questions of `--task` (the model in bf16 on CUDA,
fp32 on CPU); questions/s and scored tokens/s.

    python bench/device_throughput.py --model embedded|llama-1b|tiny [--device cuda] [--steps 8] [--batch 16]
"""
from __future__ import annotations

import argparse
import logging
import time

import torch

from chaintune.config import TrainingConfig
from chaintune.memory import KNOWN_SHAPES, ModelShape, Setup, measure_peak, training_estimate
from memory_plan import answer_tokens, padded_examples, tensor_bytes, tiny_model


def build(name: str, device: str, dtype: torch.dtype):
    """(model, tokenizer): the embedded SmolLM2-135M, a randomly initialised Llama-3.2-1B shape (the embedded
    tokenizer; its ids are within the larger vocabulary) built on the device, or the tiny test model."""
    from chaintune.models import load_model, load_tokenizer, resolve_model_path

    if name == "embedded":
        return load_model(device=device, dtype=str(dtype).removeprefix("torch."))
    if name == "tiny":
        model, tokenizer = tiny_model()
        return model.to(device=device, dtype=dtype), tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    s = KNOWN_SHAPES["meta-llama/Llama-3.2-1B"]
    config = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                         num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                         head_dim=s.head_dim, tie_word_embeddings=s.tied, max_position_embeddings=4096,
                         rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval(), load_tokenizer(resolve_model_path(None))


def train_row(name: str, device: str, steps: int, batch: int, seq: int) -> dict:
    from chaintune.train import train_stage

    model, tokenizer = build(name, device, torch.float32)
    cfg = TrainingConfig(lr=1e-5, batch_size=batch, max_steps=steps, max_length=seq)
    examples = padded_examples(tokenizer, steps * batch, seq, batch)
    result = {}
    peak = tensor_bytes(model) + measure_peak(lambda: result.update(r=train_stage(model, tokenizer, examples, cfg, 0)),
                                              device)
    shape = ModelShape.from_config(model.config.to_dict())
    precision = "bf16-mixed" if device.startswith("cuda") else "fp32"
    estimate = training_estimate(shape, cfg, Setup(precision=precision), seq=seq,
                                 answer_tokens=max(answer_tokens(tokenizer, e) for e in examples))
    r = result["r"]
    return {"tokens_per_s": r.tokens / r.seconds, "seconds": r.seconds, "peak": peak, "estimate": estimate.peak,
            "params": shape.params()}


def eval_row(name: str, device: str, task: str, questions: int, max_tokens: int) -> dict:
    from chaintune.evaluate import evaluate
    from chaintune.tasks import load_task

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model, tokenizer = build(name, device, dtype)
    try:
        examples = load_task(task, "test", limit=questions)
    except Exception as exc:  # noqa: BLE001 — no data folder here: synthetic questions, said in the output
        logging.warning("no %s test data (%s): scoring synthetic questions", task, exc)
        examples = padded_examples(tokenizer, questions, 128, 16)
    start = time.perf_counter()
    result = evaluate(model, tokenizer, examples, task, max_tokens=max_tokens)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"questions_per_s": result.n / seconds, "eval_seconds": seconds, "n": result.n, "acc": result.acc}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["embedded", "llama-1b", "tiny"], default="embedded")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--questions", type=int, default=500, help="test questions scored (0: no eval)")
    parser.add_argument("--max-tokens", type=int, default=8192, help="tokens per evaluation forward pass")
    args = parser.parse_args(argv)
    logging.disable(logging.INFO)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    train = train_row(args.model, args.device, args.steps, args.batch, args.seq)
    print(f"{args.model} ({train['params'] / 1e9:.3g} B parameters) on {where}")
    print(f"  train: {train['tokens_per_s']:,.1f} tokens/s ({args.steps} steps × {args.batch} × {args.seq} tokens, "
          f"{'bf16 autocast' if args.device.startswith('cuda') else 'fp32, slowed by the profiler'}, "
          f"{train['seconds']:.1f} s); peak "
          f"{train['peak'] / 2**30:.2f} GiB measured, {train['estimate'] / 2**30:.2f} GiB estimated "
          f"(estimate/measured {train['estimate'] / train['peak']:.2f})")
    if args.questions:
        ev = eval_row(args.model, args.device, args.task, args.questions, args.max_tokens)
        print(f"  eval: {ev['questions_per_s']:,.1f} questions/s ({ev['n']} {args.task} questions in "
              f"{ev['eval_seconds']:.1f} s, acc {ev['acc']:.1f} %)")


if __name__ == "__main__":
    main()
