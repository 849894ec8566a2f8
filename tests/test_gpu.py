"""CUDA checks (marker `gpu`; skipped without a CUDA device; bench/device_smoke.sh runs them): a training step in
bf16 autocast with SDPA attention agrees with fp32 on the CPU, and evaluation in fp32 on the GPU scores like the
CPU. The memory planner against CUDA peaks is printed per case by bench/device_throughput.py (a tiny model's peak
would be mostly cuBLAS workspace)."""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch

from chaintune.config import TrainingConfig
from chaintune.evaluate import score_examples
from chaintune.train import train_stage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import memory_plan  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture
def tiny():
    model, tokenizer = memory_plan.tiny_model()
    return model.float(), tokenizer


def test_bf16_autocast_training_with_sdpa_matches_fp32_on_cpu(tiny):
    """train.py trains fp32 weights under bf16 autocast on CUDA; its loss curve stays within bf16 rounding of the
    CPU's fp32 curve, and the run is deterministic on the GPU."""
    model, tokenizer = tiny
    assert model.config._attn_implementation == "sdpa"
    examples = memory_plan.padded_examples(tokenizer, 16, 48, 8)
    cfg = TrainingConfig(lr=1e-3, batch_size=8, max_steps=4, max_length=48)
    curves = {}
    for device in ("cpu", "cuda", "cuda"):
        copy_ = copy.deepcopy(model).to(device)
        curves.setdefault(device, []).append([r["loss"] for r in train_stage(copy_, tokenizer, examples, cfg, 0).curve])
    cpu, (cuda, again) = curves["cpu"][0], curves["cuda"]
    assert all(math.isfinite(x) for x in cuda) and cuda[-1] < cuda[0]
    assert cuda == pytest.approx(cpu, rel=3e-2)  # bf16 has 8 mantissa bits: ~0.4 % per rounding
    assert again == pytest.approx(cuda, rel=1e-3)


def test_fp32_evaluation_on_cuda_equals_the_cpu(tiny):
    model, tokenizer = tiny
    examples = memory_plan.padded_examples(tokenizer, 12, 40, 4)
    cpu = score_examples(model.eval(), tokenizer, examples, max_tokens=256)
    cuda = score_examples(copy.deepcopy(model).to("cuda").eval(), tokenizer, examples, max_tokens=256)
    for a, b in zip(cpu, cuda):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-4)
        assert max(range(len(a)), key=a.__getitem__) == max(range(len(b)), key=b.__getitem__)

