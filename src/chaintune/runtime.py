"""How chaintune uses the machine: OpenMP spinning and freed memory on a (shared) CPU; attention kernel, autocast and
optimizer implementation per device. Why each setting, and what it bought, measured: docs/performance.md.

Imported by chaintune/__init__.py before anything imports torch (see `prepare_process`), so torch is imported only
inside the functions that need it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from dataclasses import dataclass
from typing import Any

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)
FUSED_ADAMW_DEVICES = ("cpu", "cuda", "mps")  # torch.optim.AdamW(fused=True) kernels (torch >= 2.4)


OMP_SPIN_COUNT = 1000  # GOMP_SPINCOUNT chaintune sets: busy-wait iterations of an idle OpenMP thread before it sleeps


def short_omp_spin() -> bool:
    """Let idle OpenMP threads busy-wait `OMP_SPIN_COUNT` iterations before they sleep (`GOMP_SPINCOUNT`, libgomp,
    which PyTorch's Linux wheels use), unless the user set `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT`.

    libgomp's default (300,000 iterations) wins on an idle machine and loses badly beside another process, whose time
    slices the spinning threads burn; sleeping at once (`OMP_WAIT_POLICY=PASSIVE`) does the reverse. A LoRA step of
    SmolLM2-135M on 2 threads (bench/train_throughput.py, tokens/s idle / beside one CPU-bound process): default
    361–375 / 34–59, PASSIVE 242–258 / 178, 1,000 spins 283–293 / 175–176, 3,000 330–340 / 150–156, 10,000
    344–371 / 113 (docs/performance.md). 1,000 is as fast as PASSIVE when the cores are shared and faster when they
    are not. libgomp reads the variable once, when torch is imported: this covers this process if torch was not
    imported before chaintune, and the worker processes it spawns in any case. Returns whether this process runs with
    it. It does not change results.
    """
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:  # the user's choice
        return False
    os.environ["GOMP_SPINCOUNT"] = str(OMP_SPIN_COUNT)
    return "torch" not in sys.modules


@functools.lru_cache(maxsize=1)
def _glibc():
    """The process's C library when it is glibc on Linux (it has `mallopt`, `malloc_trim`), else None."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "gnu_get_libc_version") else None


def keep_freed_memory() -> bool:
    """Keep memory that torch frees in the process for its next tensors instead of returning it to the OS (glibc
    only; returns whether it applied). Every training step allocates the same large activation and gradient
    tensors again; fresh pages from the OS cost a page fault each (about 2 µs per 4 KiB here, three times the cost of
    writing them), and glibc returns any block above 32 MiB to the OS when it is freed. RSS then stays at its peak
    instead of falling between steps; the peak itself does not change. It does not change results.
    Set CHAINTUNE_KEEP_FREED_MEMORY=0 to leave glibc's defaults."""
    libc = _glibc()
    if os.environ.get("CHAINTUNE_KEEP_FREED_MEMORY", "1") == "0" or libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))


def release_freed_memory() -> bool:
    """Return the memory this process has freed to the OS (glibc `malloc_trim`; returns whether it applied). With
    `keep_freed_memory` RSS stays at its high-water mark, and a long-lived worker that runs training, evaluation and
    curvature jobs one after another grows to the sum of their fragmented peaks (13.6 GiB for one of two workers
    of configs/reproduce_cpu.yaml, whose jobs each peak below 5 GiB); every executor calls this after each job."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))


def prepare_process() -> None:
    """The process-wide CPU settings, applied when chaintune is imported: `short_omp_spin`, `keep_freed_memory`."""
    short_omp_spin()
    keep_freed_memory()


@dataclass(frozen=True)
class DevicePlan:
    """What the trainer and evaluator use on one device.

    attention: Hugging Face `attn_implementation` for training and evaluation ("sdpa": PyTorch's fused kernels,
    flash / memory-efficient on CUDA, the flash kernel for CPU; the curvature code switches to "eager" itself).
    autocast: the dtype of training's forward pass under torch.autocast, or None (fp32).
    fused_adamw: AdamW's single-kernel implementation (CUDA, CPU, MPS: one pass over each parameter's weights,
    gradient and moments; on CPU 5–7× faster than the multi-tensor one, which writes temporaries, and equal to it to
    float rounding, about 5e-8 relative per step), else the multi-tensor one.
    """

    attention: str
    autocast: Any  # torch.dtype | None
    fused_adamw: bool


def device_plan(device) -> DevicePlan:
    """SDPA everywhere; bf16 autocast on a CUDA device that supports bf16, fp32 elsewhere; fused AdamW where torch
    has the kernel."""
    import torch

    cuda = device.type == "cuda"
    bf16 = cuda and torch.cuda.is_bf16_supported()
    return DevicePlan(attention="sdpa", autocast=torch.bfloat16 if bf16 else None,
                      fused_adamw=device.type in FUSED_ADAMW_DEVICES)


def use_attention(model, implementation: str) -> None:
    """Move a Hugging Face model (or a PEFT wrapper around one) off the eager attention path to `implementation`;
    a model on another fused path (e.g. flash_attention_2, chosen at load) or without support for it stays as is."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) == "eager":
        try:
            base.set_attn_implementation(implementation)
        except (ValueError, ImportError):  # the architecture has no such kernel: keep eager
            pass
