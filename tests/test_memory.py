"""The memory planner (chaintune.memory): parameter counts, the estimate against measured peaks of a tiny model
(full and LoRA, with and without gradient checkpointing), the 8B facts, the smallest fitting setup, the CLI; and
gradient checkpointing itself: the same loss curve and weights, the same stage identity."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from chaintune.cli import main
from chaintune.config import CurvatureConfig, TrainingConfig, training_identity
from chaintune.memory import KNOWN_SHAPES, ModelShape, Setup, smallest_fit, stage_estimate, training_estimate
from chaintune.options import memory_size
from chaintune.plan import load_sweep, make_plan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import memory_plan  # noqa: E402

GB = 1e9


def test_parameter_counts_match_the_model():
    from chaintune.train import attach_lora

    model, _ = memory_plan.tiny_model()
    shape = ModelShape.from_config(model.config.to_dict())
    assert shape.params() == sum(p.numel() for p in model.parameters())
    cfg = TrainingConfig(method="lora", lora={"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]})
    lora = attach_lora(model, cfg, seed=0)
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert shape.lora_params(4, ["q_proj", "v_proj", "down_proj"]) == trainable


@pytest.mark.parametrize("case,checkpointing", [("tiny-full", False), ("tiny-full", True), ("tiny-lora", False),
                                                ("tiny-lora", True), ("tiny-hvp", False)])
def test_estimate_is_within_25_percent_of_the_measured_peak(case, checkpointing):
    """The bench's check on a 4-layer model: 2 training steps (or 2 HVPs) measured by the profiler's allocations."""
    row = memory_plan.run_case(case, seq=64, batch=4, checkpointing=checkpointing)
    assert abs(row["ratio"] - 1) <= memory_plan.TOLERANCE, row


def test_checkpointing_lowers_the_estimate_and_the_measured_peak():
    off, on = (memory_plan.run_case("tiny-full", seq=64, batch=4, checkpointing=c) for c in (False, True))
    assert on["measured"] < off["measured"] and on["estimated"] < off["estimated"]


def test_8b_full_adamw_needs_16_bytes_per_parameter_before_activations():
    shape = KNOWN_SHAPES["meta-llama/Llama-3.1-8B"]
    assert shape.params() == pytest.approx(8.03e9, rel=1e-3)  # Llama-3.1-8B's published parameter count
    est = training_estimate(shape, TrainingConfig(), Setup(precision="fp32"))
    assert (est.weights + est.gradients + est.optimizer) / GB == pytest.approx(128.5, rel=0.01)
    sharded = training_estimate(shape, TrainingConfig(), Setup(devices=8, strategy="fsdp", micro_batch=2))
    assert sharded.gradients + sharded.optimizer == pytest.approx(12 * shape.params() / 8)


def test_smallest_fit_shards_the_8b_model_and_keeps_small_models_on_one_device():
    eight, one = KNOWN_SHAPES["meta-llama/Llama-3.1-8B"], KNOWN_SHAPES["meta-llama/Llama-3.2-1B"]
    setup, est = smallest_fit(eight, TrainingConfig(batch_size=16), 80 * 2**30, "bf16-mixed")
    assert setup.devices > 1 and setup.strategy == "fsdp" and est.peak <= 80 * 2**30
    setup, _ = smallest_fit(one, TrainingConfig(batch_size=16, max_length=256), 80 * 2**30, "bf16-mixed")
    assert setup.devices == 1 and not setup.checkpointing
    assert smallest_fit(eight, TrainingConfig(), 2**20, "bf16-mixed", max_devices=8) is None


def test_curvature_is_estimated_only_when_measured():
    shape = KNOWN_SHAPES["meta-llama/Llama-3.2-1B"]
    assert stage_estimate(shape, TrainingConfig(), Setup()).curvature is None
    small, large = (stage_estimate(shape, TrainingConfig(), Setup(), CurvatureConfig(micro_batch=m)).curvature
                    for m in (1, 8))
    assert 0 < small < large


def test_sharded_curvature_divides_the_weights_and_vectors_by_the_devices():
    """fsdp: est(N) = A + B/N with B = 4P + 9·4P_t (+ the basis), by hand from two device counts; ddp is the
    one-device estimate whatever N."""
    from chaintune.memory import curvature_estimate

    shape = KNOWN_SHAPES["meta-llama/Llama-3.2-1B"]
    training, curvature = TrainingConfig(), CurvatureConfig(micro_batch=2, subsets=1)
    two, four = (curvature_estimate(shape, training, curvature, setup=Setup(n, "fsdp")) for n in (2, 4))
    assert two - four == pytest.approx((4 * shape.params() + 9 * 4 * shape.params()) / 4, rel=1e-12)
    one = curvature_estimate(shape, training, curvature)
    assert curvature_estimate(shape, training, curvature, setup=Setup(8, "ddp")) == one
    assert four < one / 2  # no double-backward graph, 1/4 of the weights and vectors
    with_basis = CurvatureConfig(micro_batch=2, subsets=4, max_iter=10, basis_budget=2**50)
    gap = (curvature_estimate(shape, training, with_basis, setup=Setup(4, "fsdp")) -
           curvature_estimate(shape, training, curvature, setup=Setup(4, "fsdp")))
    assert gap == pytest.approx(4 * shape.params() * 10 / 4, rel=1e-12)


def test_hvp_estimate_counts_five_attention_maps_per_head_and_layer():
    """One device: the s × s part of the HVP peak is micro-batch × heads × 4 B × s² × (5L + 1) — the forward's
    probabilities twice (forward and backward-with-graph), 3 more per layer in the backward-with-graph
    (EAGER_BACKWARD_SCORES) and one layer of the second backward — so the second difference in s is twice that:
    Llama-3.2-1B (32 heads, 16 layers), micro-batch 2, s = 100: 2 · 2·32·4·81 · 100² = 414,720,000 bytes."""
    from chaintune.memory import curvature_estimate

    shape = KNOWN_SHAPES["meta-llama/Llama-3.2-1B"]
    training, curvature = TrainingConfig(), CurvatureConfig(micro_batch=2, subsets=1)
    at = [curvature_estimate(shape, training, curvature, seq=s) for s in (100, 200, 300)]
    assert at[2] - 2 * at[1] + at[0] == pytest.approx(414_720_000, rel=1e-9)


def test_memory_sizes():
    assert memory_size("80GiB") == 80 * 2**30 and memory_size("80 GB") == 80e9 and memory_size("40g") == 40 * 2**30


def test_plan_memory_cli(mcq_config, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(mcq_config(tmp_path / "out", curvature={"examples": 2})))
    assert main(["plan", str(config), "--memory", "--device-memory", "1GiB", "--nproc-per-node", "2",
                 "--strategy", "fsdp"]) == 0
    out = capsys.readouterr().out
    assert "2 devices, fsdp" in out and "HVP peak" in out and "smallest setup within 1.00 GiB" in out
    assert not (tmp_path / "out").exists()  # a plan writes nothing


def test_plan_memory_defaults_to_the_configs_distributed_settings(mcq_config, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(mcq_config(tmp_path / "out", distributed={"nproc_per_node": 4,
                                                                               "strategy": "fsdp"})))
    assert main(["plan", str(config), "--memory"]) == 0
    assert "4 devices, fsdp" in capsys.readouterr().out
    assert main(["plan", str(config), "--memory", "--nproc-per-node", "2", "--strategy", "ddp"]) == 0
    assert "2 devices, ddp" in capsys.readouterr().out  # flags win over the config


# ------------------------------------------------------------------------------------- gradient checkpointing
def _train(checkpointing: bool, method: str):
    from chaintune.train import attach_lora, train_stage

    model, tokenizer = memory_plan.tiny_model()
    cfg = TrainingConfig(method=method, lr=1e-3, batch_size=4, max_steps=4, max_length=48,
                         gradient_checkpointing=checkpointing)
    if method == "lora":
        model = attach_lora(model, cfg, seed=0)
    result = train_stage(model, tokenizer, memory_plan.padded_examples(tokenizer, 8, 48, 4), cfg, seed=0)
    return [r["loss"] for r in result.curve], [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_gradient_checkpointing_gives_the_same_loss_curve_and_weights(method):
    (loss_off, weights_off), (loss_on, weights_on) = _train(False, method), _train(True, method)
    assert len(loss_on) == 4 and loss_on[-1] != loss_on[0]  # it trained
    assert loss_on == pytest.approx(loss_off, rel=1e-6, abs=1e-7)
    for a, b in zip(weights_off, weights_on):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_is_not_part_of_a_stage_identity(mcq_config, tmp_path):
    assert training_identity(TrainingConfig(gradient_checkpointing=True)) == training_identity(TrainingConfig())
    off = tmp_path / "off.yaml"
    off.write_text(yaml.safe_dump(mcq_config(tmp_path / "out")))
    keys = [sorted(str(k) for k in make_plan(load_sweep(off, overrides)).jobs)
            for overrides in ([], ["training.gradient_checkpointing=true"])]
    assert keys[0] == keys[1]
