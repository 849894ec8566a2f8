"""Machine settings (chaintune.runtime): the device plan picks SDPA, bf16 autocast on CUDA (tested
with the device logic mocked, on the CPU), the trainer applies the plan, and the process-wide CPU settings apply."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from chaintune import runtime
from chaintune.config import TrainingConfig
from chaintune.models import tiny_llama
from chaintune.runtime import DevicePlan, device_plan
from chaintune.tasks import Example

EXAMPLES = [Example(f"e{i}", f"Question: is {i} an even number?\nAnswer:", (" yes", " no"), i % 2) for i in range(8)]


def test_cpu_plan_is_fp32_sdpa_and_fused_adamw():
    assert device_plan(torch.device("cpu")) == DevicePlan(attention="sdpa", autocast=None, fused_adamw=True)


def test_a_device_without_the_fused_kernel_gets_the_multi_tensor_adamw():
    assert device_plan(torch.device("xpu")) == DevicePlan(attention="sdpa", autocast=None, fused_adamw=False)


@pytest.mark.parametrize("bf16, autocast", [(True, torch.bfloat16), (False, None)])
def test_cuda_plan_with_the_device_mocked(monkeypatch, bf16, autocast):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert device_plan(torch.device("cuda")) == DevicePlan(attention="sdpa", autocast=autocast, fused_adamw=True)


@pytest.fixture
def built_adamw(monkeypatch) -> list[dict]:
    """The keyword arguments of every AdamW built while the test runs."""
    built = []

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            built.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    return built


def test_trainer_applies_the_plan(monkeypatch, built_adamw):
    """With a CUDA plan mocked onto the CPU, training runs its forward under bf16 autocast, builds a fused AdamW and
    moves an eager-attention model to SDPA."""
    from chaintune import train

    monkeypatch.setattr(train, "device_plan", lambda device: DevicePlan("sdpa", torch.bfloat16, True))
    model, tokenizer = tiny_llama(seed=0)
    model.set_attn_implementation("eager")
    seen = []
    model.model.layers[0].mlp.up_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    train.train_stage(model, tokenizer, EXAMPLES, TrainingConfig(lr=1e-3, batch_size=4, max_steps=1), seed=0)
    assert built_adamw[0].get("fused") is True and "foreach" not in built_adamw[0]
    assert seen and set(seen) == {torch.bfloat16}
    assert model.config._attn_implementation == "sdpa"


def test_trainer_falls_back_to_the_multi_tensor_adamw(monkeypatch, built_adamw):
    from chaintune import train

    monkeypatch.setattr(train, "device_plan", lambda device: DevicePlan("sdpa", None, False))
    model, tokenizer = tiny_llama(seed=0)
    train.train_stage(model, tokenizer, EXAMPLES, TrainingConfig(lr=1e-3, batch_size=4, max_steps=1), seed=0)
    assert built_adamw[0].get("foreach") is True and "fused" not in built_adamw[0]


def test_short_omp_spin_only_claims_this_process_before_torch_and_yields_to_the_user(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert runtime.short_omp_spin() is False  # torch is imported here: only spawned workers get it
    assert os.environ["GOMP_SPINCOUNT"] == str(runtime.OMP_SPIN_COUNT) == "1000"
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.delenv("GOMP_SPINCOUNT")
    assert runtime.short_omp_spin() is True and os.environ["GOMP_SPINCOUNT"] == "1000"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice wins
    assert runtime.short_omp_spin() is False and "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "50")
    assert runtime.short_omp_spin() is False and os.environ["GOMP_SPINCOUNT"] == "50"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_keep_freed_memory_applies_on_glibc_unless_turned_off(monkeypatch):
    assert runtime.keep_freed_memory() is True
    monkeypatch.setenv("CHAINTUNE_KEEP_FREED_MEMORY", "0")
    assert runtime.keep_freed_memory() is False


def test_release_freed_memory_returns_a_freed_peak_to_the_os():
    # a fresh process (chaintune's import keeps freed memory): 800 MiB of tensors freed stay resident until released
    code = """
import re, chaintune, torch
from chaintune.runtime import release_freed_memory
rss = lambda: int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024
xs = [torch.ones(1024 * 1024) for _ in range(200)]
del xs
before = rss()
assert release_freed_memory()
print(before - rss())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert int(done.stdout.strip()) > 600  # MiB returned


def test_every_job_releases_freed_memory(monkeypatch):
    from types import SimpleNamespace

    from chaintune import stage

    def failing_run(job):
        raise RuntimeError("job failed")

    calls = []
    monkeypatch.setattr(stage, "release_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr(stage, "WeightCache", lambda *a, **k: None)
    monkeypatch.setattr(stage, "StageExecutor", lambda *a, **k: SimpleNamespace(run=failing_run))
    monkeypatch.setattr(stage, "_PROCESS", {})
    settings = SimpleNamespace(distributed=SimpleNamespace(nproc_per_node=1), custom_tasks=(), model="m",
                               device="cpu", trust_remote_code=False)
    with pytest.raises(RuntimeError, match="job failed"):
        stage.execute(SimpleNamespace(settings=settings, output_dir="/nonexistent"))
    assert calls == [1]  # released even when the job raised
