"""What produced a result: package versions, device, git sha, data file hashes."""
from __future__ import annotations

import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from chaintune.io import file_sha256

PACKAGES = ("chaintune", "torch", "transformers", "peft", "tokenizers", "safetensors", "numpy", "pandas", "datasets")


def git_sha(path: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path or Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model (its vector units decide float rounding too)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    return model or platform.processor() or "cpu"


def environment(device: torch.device) -> dict[str, Any]:
    return {
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in PACKAGES},
        "device": str(device),
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "git_sha": git_sha(),
    }


def eval_environment(model) -> dict[str, str]:
    """What an evaluation's exact numbers depend on besides weights and data: device, dtype, torch version."""
    param = next(model.parameters())
    return {"device": param.device.type, "device_name": device_name(param.device),
            "dtype": str(param.dtype).removeprefix("torch."), "torch": torch.__version__}


def data_file_hashes(data_dir: Path | None, tasks: list[str]) -> dict[str, str]:
    """SHA-256 of every data file the tasks read, as their `register_task(data_files=...)` records: path (relative
    to `data_dir` when under it) → digest. A folder stands for the files directly in it."""
    from chaintune.tasks import get_task

    hashes = {}
    for task in tasks:
        for entry in get_task(task).data_files:
            path = Path(entry) if Path(entry).is_absolute() else data_dir / entry if data_dir else None
            if path is None:
                continue
            files = ([p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")]
                     if path.is_dir() else [path] if path.is_file() else [])
            for file in files:
                name = file.relative_to(data_dir) if data_dir and file.is_relative_to(data_dir) else file
                hashes[str(name)] = file_sha256(file)
    return hashes
