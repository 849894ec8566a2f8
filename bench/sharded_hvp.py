"""Sharded curvature under FSDP2: why its Hessian-vector products are finite differences, and their step.

    python -m torch.distributed.run --standalone --nproc-per-node 2 bench/sharded_hvp.py

On a tiny random Llama (chaintune.models.tiny_llama) and 13 short seeded questions, every rank:

1. tries double backward through `fully_shard`: `torch.autograd.grad(loss, sharded parameters, create_graph=True)`
   and `loss.backward(create_graph=True)` followed by a second gradient of the sharded gradients; prints what each
   gives (docs/distributed.md quotes it), and how far the sharded first-order gradients are from one process's;
2. measures λ_max by Lanczos with `ShardedHessianOperator` (vectors sharded like the parameters) for several
   `distributed.FD_STEP` values and prints its relative error against the exact single-process λ_max (double backward,
   `measure_curvature` without ranks), for the untrained model and after 5 steps of full fine-tuning and of LoRA.

Rank 0 prints. CPU, gloo, fp32; no timing is taken.
"""
from __future__ import annotations

import copy
import random

import torch

from chaintune import distributed
from chaintune.config import TrainingConfig
from chaintune.curvature import measure_curvature
from chaintune.distributed import init_ranks, shard_for_curvature
from chaintune.models import tiny_llama
from chaintune.tasks import Example
from chaintune.train import answer_loss_sum, attach_lora, train_stage

STEPS = (1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
TRAINING = {"lr": 1e-3, "batch_size": 3, "grad_accum": 2, "max_steps": 5}
LORA = {"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}


def questions(n: int = 13) -> list[Example]:
    rng = random.Random(0)
    words = "the quick brown fox jumps over the lazy dog which gas do plants absorb".split()
    return [Example(f"q{i}", " ".join(rng.choices(words, k=rng.randint(3, 12))) + "?", (" yes", " no", " maybe"),
                    rng.randrange(3), f"g{i % 2}") for i in range(n)]


def double_backward(model, tokenizer, data, ranks) -> list[str]:
    """What double backward through fully_shard gives (one line per attempt)."""
    from chaintune.curvature import answer_batches, eager_attention

    sharded = shard_for_curvature(copy.deepcopy(model).eval())
    params = [p for p in sharded.parameters() if p.requires_grad]
    batch = answer_batches(tokenizer, data, 4, 512, ranks.device)[0][0]
    def loss() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(*sharded(*batch), reduction="sum")

    lines = []
    with eager_attention(sharded):
        try:
            torch.autograd.grad(loss(), params, create_graph=True)
            lines.append("autograd.grad w.r.t. the sharded parameters: ran")
        except RuntimeError as exc:
            lines.append(f"autograd.grad w.r.t. the sharded parameters: RuntimeError: {str(exc).splitlines()[0]}")
        distributed.reshard(sharded)
        loss().backward(create_graph=True)
        with_graph = sum(p.grad is not None and p.grad.requires_grad for p in params)
        lines.append(f"backward(create_graph=True): {with_graph} of {len(params)} sharded gradients carry a graph "
                     "(FSDP2 reduce-scatters them detached), so no second backward is possible")
        plain = copy.deepcopy(model).eval()
        with eager_attention(plain):
            exact = torch.autograd.grad(answer_loss_sum(plain, *batch)[0], list(plain.parameters()))
    gap = max(float((p.grad.full_tensor() - g).abs().max()) for p, g in zip(params, exact))
    lines.append(f"first-order sharded gradients vs one process: max |difference| {gap:.2g}")
    return lines


def main() -> None:
    ranks = init_ranks("fsdp", "gloo", torch.device("cpu"))
    say = print if ranks.writer else (lambda *_: None)
    data = questions()
    model, tokenizer = tiny_llama(seed=0)
    for line in double_backward(model, tokenizer, data, ranks):
        say(line)
    cases = {"untrained, full": model}
    trained, _ = tiny_llama(seed=0)
    train_stage(trained, tokenizer, data, TrainingConfig.model_validate(TRAINING), seed=0)
    cases["5 steps, full"] = trained
    lora_cfg = TrainingConfig.model_validate(TRAINING | LORA)
    lora = attach_lora(tiny_llama(seed=0)[0], lora_cfg, seed=0)
    train_stage(lora, tokenizer, data, lora_cfg, seed=0)
    cases["5 steps, LoRA"] = lora
    for name, case in cases.items():
        exact = measure_curvature(case.requires_grad_(True) if name.endswith("full") else case, tokenizer, data,
                                  n_examples=len(data), micro_batch=2, seed=0)
        errors = []
        for step in STEPS:
            distributed.FD_STEP = step
            sharded = measure_curvature(shard_for_curvature(copy.deepcopy(case)), tokenizer, data,
                                        n_examples=len(data), micro_batch=2, seed=0, ranks=ranks)
            errors.append(f"{step:g}: {abs(sharded.lambda_max / exact.lambda_max - 1):.1e}")
        say(f"{name} ({exact.n_parameters} parameters, λ_max {exact.lambda_max:.6g}): relative error of λ_max by "
            f"FD_STEP  " + ", ".join(errors))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
