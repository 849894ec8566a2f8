"""Training throughput: chaintune's stage trainer vs Hugging Face `Trainer`, same model, data, batch, one run.

Both fine-tune the same weights on the same tokenized examples (prompt + gold answer, prompt tokens masked with
-100) for the same number of optimizer steps with AdamW, constant LR and gradient clipping 1.0. Tokens/s counts
non-padding input tokens divided by wall time of the training loop.

    python bench/train_throughput.py [--task toxigenqa] [--examples 256] [--steps 8] [--batch-size 16] [--method full]
"""
from __future__ import annotations

import argparse
import time

import torch


def hf_trainer_throughput(model, tokenizer, data, args) -> tuple[float, float]:
    """(tokens/s, seconds) of transformers.Trainer on the same examples."""
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
    seen = []
    original = trainer.training_step

    def counting_step(model_, inputs, *a, **k):
        seen.append(int(inputs["attention_mask"].sum()))
        return original(model_, inputs, *a, **k)

    trainer.training_step = counting_step
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return sum(seen) / seconds, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="toxigenqa")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--method", choices=["full", "lora"], default="full")
    parser.add_argument("--hf-group-by-length", action="store_true", help="let Trainer bucket by length too")
    args = parser.parse_args()

    from chaintune.config import TrainingConfig
    from chaintune.models import load_model
    from chaintune.tasks import load_task
    from chaintune.train import attach_lora, tokenize_sft, train_stage

    examples = load_task(args.task, "train", limit=args.examples)
    cfg = TrainingConfig(method=args.method, lr=args.lr, batch_size=args.batch_size, max_steps=args.steps)
    results = {}
    for tool in ("chaintune", "hf_trainer"):
        model, tokenizer = load_model(device="cpu" if not torch.cuda.is_available() else None, dtype="float32")
        if args.method == "lora":
            model = attach_lora(model, cfg, seed=0)
        if tool == "chaintune":
            res = train_stage(model, tokenizer, examples, cfg, seed=0)
            results[tool] = (res.tokens / res.seconds, res.seconds)
        else:
            results[tool] = hf_trainer_throughput(model, tokenizer, tokenize_sft(tokenizer, examples, cfg.max_length), args)
        del model
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"train throughput — {args.task}, {args.examples} examples, {args.steps} steps × batch {args.batch_size}, "
          f"{args.method} fine-tuning, SmolLM2-135M fp32, {device}")
    print(f"{'tool':<12} {'tokens/s':>10} {'seconds':>9}")
    for tool, (tps, secs) in results.items():
        print(f"{tool:<12} {tps:>10.1f} {secs:>9.1f}")
    print(f"ratio chaintune / HF Trainer: {results['chaintune'][0] / results['hf_trainer'][0]:.2f}× (target ≥ 1.0)")


if __name__ == "__main__":
    main()
