"""Multi-rank stage jobs (issue 22) on CPU: the gloo backend, 2 ranks, the tiny Llama. Training under DDP and FSDP
gives the loss curve and weights of one process; data-parallel evaluation gives identical scores, data-parallel
HVPs the same λ_max, and FSDP's sharded curvature (finite-difference HVPs) the same λ_max within its measured error;
a run whose stage loses a rank to SIGKILL resumes to the result of one process."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import chaintune
from chaintune import distributed
from chaintune.config import TrainingConfig
from chaintune.curvature import measure_curvature
from chaintune.evaluate import score_examples
from chaintune.models import load_model
from chaintune.rundir import RunDir
from chaintune.tasks import Example
from chaintune.train import attach_lora, train_stage
from chaintune.verify import verdict, verify_run

pytestmark = pytest.mark.distributed

HERE = Path(__file__).parent
TRAINING = {"lr": 1e-3, "batch_size": 3, "grad_accum": 2, "max_steps": 5, "checkpoint_every": 2}
SHARDED_RTOL = 5e-4  # ShardedHessianOperator's finite differences: measured ≤ 5e-5 relative on λ_max (docs/distributed.md)


def torchrun(*args: str) -> None:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def examples(n: int = 13) -> list[Example]:
    """13 examples in steps of 2 micro-batches of 3: ranks get 2 and 1 examples, and each epoch's step of one example
    leaves rank 1 with none (it runs one at weight 0)."""
    rng = random.Random(0)
    words = "the quick brown fox jumps over the lazy dog which gas do plants absorb".split()
    return [Example(f"q{i}", " ".join(rng.choices(words, k=rng.randint(3, 12))) + "?", (" yes", " no", " maybe"),
                    rng.randrange(3), f"g{i % 2}") for i in range(n)]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def assert_sharded_curvature(stored: dict, model, tokenizer, data: list[Example]) -> None:
    """The λ_max measured with vectors sharded like the parameters (the worker's fsdp record: 2 search subsets of 3
    pooled, 2 held out) equals the one of `model` in one process, so do the search side's value and every subset's
    quotient, and the vectors were shards: each rank held about half of the trainable parameters."""
    one = measure_curvature(model, tokenizer, data, n_examples=3, subsets=2, held_out=2, micro_batch=2, seed=0)
    print(f"sharded λ_max: 1 process {one.lambda_max!r}, 2 ranks {stored['lambda_max']!r} "
          f"(rel. {abs(stored['lambda_max'] / one.lambda_max - 1):.2g}); vector lengths {stored['dims']}")
    assert stored["lambda_max"] == pytest.approx(one.lambda_max, rel=SHARDED_RTOL)
    assert stored["search"] == pytest.approx(one.lambda_max_search, rel=SHARDED_RTOL)
    # each subset's quotient: 3 examples, so the finite difference's error is relative to the spectrum's scale, not
    # to a quotient that may be near 0 (LoRA: −0.0013 next to λ_max −0.243; largest difference 1.2e-4 absolute)
    scale = max(abs(q) for q in one.lambda_max_subsets)
    assert stored["quotients"] == pytest.approx(one.lambda_max_subsets, abs=2 * SHARDED_RTOL * scale)
    assert stored["loss"] == pytest.approx(one.loss, rel=1e-6)
    assert stored["size"] == one.n_parameters == sum(stored["dims"])
    assert max(stored["dims"]) < 0.55 * one.n_parameters


def test_two_ranks_train_score_and_measure_like_one_process(tmp_path, tiny_model_dir):
    data = examples()
    (tmp_path / "data.json").write_text(json.dumps({"examples": [e.to_dict() for e in data], "training": TRAINING,
                                                    "curvature": True}))
    torchrun(str(HERE / "distributed_worker.py"), str(tiny_model_dir), str(tmp_path / "data.json"), str(tmp_path))

    model, tokenizer = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    scores = score_examples(model, tokenizer, data, max_tokens=64)
    curvature = measure_curvature(model.requires_grad_(True), tokenizer, data, n_examples=len(data), micro_batch=2,
                                  seed=0)
    parallel = json.loads((tmp_path / "eval.json").read_text())
    assert parallel["scores"] == scores  # each question scored in the same batch as in one process: identical
    assert parallel["lambda_max"] == pytest.approx(curvature.lambda_max, rel=1e-5)

    result = train_stage(model, tokenizer, data, TrainingConfig.model_validate(TRAINING), seed=0)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    print(f"λ_max: 1 process {curvature.lambda_max!r}, 2 ranks {parallel['lambda_max']!r}")
    for strategy in ("ddp", "fsdp"):
        curve = json.loads((tmp_path / f"{strategy}.json").read_text())["curve"]
        assert [r["step"] for r in curve] == [r["step"] for r in result.curve]
        assert [r["tokens"] for r in curve] == [r["tokens"] for r in result.curve]
        losses = max(abs(a["loss"] - b["loss"]) for a, b in zip(curve, result.curve))
        trained = max_diff(load_file(tmp_path / f"{strategy}.safetensors"), weights)
        print(f"{strategy}: max |Δ| loss curve {losses:.3g}, weights {trained:.3g}")  # the figures of the docs
        assert losses < 1e-5 and trained < 1e-5, strategy
    assert_sharded_curvature(json.loads((tmp_path / "fsdp.json").read_text()), model, tokenizer, data)


def test_select_best_under_ranks_restores_the_one_process_weights(tmp_path, tiny_model_dir):
    # lr 0.5: the validation loss rises after step 1, so both strategies must restore step 1's weights (under FSDP
    # the restore was lost until the root's parameters were resharded after each validation pass)
    data, training = examples(), TRAINING | {"select_best": True, "eval_every": 1, "max_steps": 6, "lr": 0.5}
    (tmp_path / "data.json").write_text(json.dumps({"examples": [e.to_dict() for e in data], "training": training,
                                                    "validation": 4}))
    torchrun(str(HERE / "distributed_worker.py"), str(tiny_model_dir), str(tmp_path / "data.json"), str(tmp_path))
    model, tokenizer = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    result = train_stage(model, tokenizer, data, TrainingConfig.model_validate(training), seed=0,
                         validation=data[:4])
    assert result.best_step == 1 < result.steps
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    for strategy in ("ddp", "fsdp"):
        assert max_diff(load_file(tmp_path / f"{strategy}.safetensors"), weights) < 1e-5, strategy


def test_lora_under_ranks_matches_one_process(tmp_path, tiny_model_dir):
    # FSDP shards the frozen base weights and the adapters alike; the gathered model gets the same adapters attached
    lora = {"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}
    data, training = examples(), TRAINING | lora
    (tmp_path / "data.json").write_text(json.dumps({"examples": [e.to_dict() for e in data], "training": training,
                                                    "curvature": True}))
    torchrun(str(HERE / "distributed_worker.py"), str(tiny_model_dir), str(tmp_path / "data.json"), str(tmp_path))
    model, tokenizer = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    model = attach_lora(model, TrainingConfig.model_validate(training), seed=0)
    result = train_stage(model, tokenizer, data, TrainingConfig.model_validate(training), seed=0)
    assert_sharded_curvature(json.loads((tmp_path / "fsdp.json").read_text()), model, tokenizer, data)  # adapters
    weights = {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}
    for strategy in ("ddp", "fsdp"):
        curve = json.loads((tmp_path / f"{strategy}.json").read_text())["curve"]
        assert max(abs(a["loss"] - b["loss"]) for a, b in zip(curve, result.curve)) < 1e-5, strategy
        assert max_diff(load_file(tmp_path / f"{strategy}.safetensors"), weights) < 1e-5, strategy


def test_a_rank_killed_mid_stage_resumes_to_the_one_process_result(tmp_path, mcq_config, isolated, monkeypatch):
    def config(out: Path, **extra) -> dict:
        return mcq_config(out, chains=[{"name": "a", "stages": [{"task": "mcq_a"}]}], eval_tasks=["mcq_a"],
                          curvature={"examples": 8, "micro_batch": 2}, **extra)

    single = chaintune.run(config(tmp_path / "one"), progress=False)
    assert single.completed_runs
    ranks = config(tmp_path / "two", distributed={"nproc_per_node": 2, "strategy": "fsdp"})
    monkeypatch.setattr(distributed, "WORKER", [str(HERE / "distributed_kill_worker.py")])
    killed = chaintune.run(ranks, progress=False)
    assert killed.failed and not killed.completed_runs  # rank 1 died at step 5: the job failed
    two = RunDir(tmp_path / "two")
    stage_dir = next(p for p in two.root.glob("stages/s1-*"))
    assert json.loads((stage_dir / "work" / "attempt0" / "resume.json").read_text())["step"] == 3
    monkeypatch.setattr(distributed, "WORKER", ["-m", "chaintune.distributed"])
    resumed = chaintune.run(ranks, progress=False)
    assert resumed.completed_runs and not resumed.failed

    one = RunDir(tmp_path / "one")
    node = stage_dir.name
    curves = [d.train_curve(node) for d in (one, two)]
    assert (curves[0].loss - curves[1].loss).abs().max() < 1e-5
    weights = [load_file(d.checkpoint_dir(node) / "model.safetensors") for d in (one, two)]
    assert max_diff(*weights) < 1e-5
    base = next(p.name for p in one.root.glob("stages/base-*"))
    for name in (base, node):
        stored = [pd.read_parquet(d.predictions_path(name, "mcq_a")) for d in (one, two)]
        assert (stored[0].pred == stored[1].pred).all()
        flat = [torch.tensor(s.logliks.explode().astype(float).to_numpy()) for s in stored]
        assert float((flat[0] - flat[1]).abs().max()) < (1e-9 if name == base else 1e-4)
    lambdas = [d.curvature(node)["lambda_max"] for d in (one, two)]
    assert lambdas[1] == pytest.approx(lambdas[0], rel=SHARDED_RTOL)  # fsdp: measured with sharded vectors
    code, line = verdict(verify_run(tmp_path / "two")[0])  # the single-process path loads the gathered checkpoint
    assert code == 0, line


def test_a_rank_error_comes_back_as_one_line_and_is_not_retried(tmp_path, mcq_config, isolated, monkeypatch):
    monkeypatch.setattr(distributed, "WORKER", [str(HERE / "distributed_error_worker.py")])
    cfg = mcq_config(tmp_path / "out", chains=[{"name": "a", "stages": [{"task": "mcq_a"}]}], eval_tasks=["mcq_a"],
                     executor={"retries": 1}, distributed={"nproc_per_node": 2})
    outcome = chaintune.run(cfg, progress=False)
    assert len(outcome.failed) == 2
    for info in outcome.failed.values():
        assert info["attempts"] == 1 and info["error"].startswith("ChaintuneError: stage ")
        assert info["error"].endswith("loss is nan at step 2/8 — lower the learning rate")
