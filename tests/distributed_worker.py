"""One rank of tests/test_distributed.py's equality check, under `torchrun --nproc-per-node 2`:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py MODEL_DIR DATA OUT

It scores the examples in DATA (JSON) with the untrained model and measures its λ_max, data-parallel; then, for each
strategy (ddp, fsdp), trains the model on them with `train_stage(ranks=...)` (LoRA: adapters attached first, merged after) and gathers
the weights; with "curvature" in DATA, it also measures λ_max of the FSDP-trained model sharded again for it
(vectors sharded like the parameters, LoRA: before the merge). Rank 0 writes OUT/eval.json (scores, λ_max),
OUT/<strategy>.json (loss curve; fsdp: the sharded λ_max, loss and each rank's vector length) and
OUT/<strategy>.safetensors (weights) for the test to compare with one process.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from chaintune.config import TrainingConfig
from chaintune.curvature import measure_curvature
from chaintune.distributed import ShardedHessianOperator, gather_weights, init_ranks, shard_for_curvature
from chaintune.evaluate import score_examples
from chaintune.io import write_json, write_safetensors
from chaintune.models import load_model
from chaintune.tasks import Example
from chaintune.train import attach_lora, train_stage


def main(model_dir: str, data: str, out: str) -> None:
    spec = json.loads(Path(data).read_text())
    examples = [Example(**e) for e in spec["examples"]]
    cfg = TrainingConfig.model_validate(spec["training"])
    ranks = init_ranks("ddp", "gloo", torch.device("cpu"))
    model, tokenizer = load_model(model_dir, device="cpu", dtype="float32")
    scores = score_examples(model, tokenizer, examples, max_tokens=64, ranks=ranks)
    curvature = measure_curvature(model.requires_grad_(True), tokenizer, examples, n_examples=len(examples),
                                  micro_batch=2, seed=0, ranks=ranks)
    if ranks.writer:
        write_json(Path(out) / "eval.json", {"scores": scores, "lambda_max": curvature.lambda_max})
    for strategy in ("ddp", "fsdp"):
        mine = type(ranks)(ranks.rank, ranks.world, strategy, ranks.device)
        work = Path(out) / f"work-{strategy}"
        work.mkdir(parents=True, exist_ok=True)
        model, tokenizer = load_model(model_dir, device="cpu", dtype="float32")
        if cfg.method == "lora":
            model = attach_lora(model, cfg, seed=0)
        validation = examples[:spec.get("validation", 0)]  # select_best's validation slice (test: the first few)
        result = train_stage(model, tokenizer, examples, cfg, seed=0, work_dir=work, ranks=mine, validation=validation)
        record = {"curve": result.curve}
        if strategy == "fsdp" and spec.get("curvature"):  # what StageExecutor.measure_curvature does under fsdp
            sharded = shard_for_curvature(gather_weights(model, mine))
            curvature = measure_curvature(sharded, tokenizer, examples, n_examples=3, subsets=2, held_out=2,
                                          micro_batch=2, seed=0, ranks=mine)
            record |= {"lambda_max": curvature.lambda_max, "loss": curvature.loss, "size": curvature.n_parameters,
                       "quotients": curvature.lambda_max_subsets, "search": curvature.lambda_max_search,
                       "dims": mine.gather([ShardedHessianOperator(sharded, tokenizer, examples[:1], ranks=mine).dim])}
        model = gather_weights(model, mine)
        if cfg.method == "lora":
            model = model.merge_and_unload()
        if mine.writer:
            write_json(Path(out) / f"{strategy}.json", record)
            write_safetensors(Path(out) / f"{strategy}.safetensors",
                              {k: v.clone() for k, v in model.state_dict().items()})
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
