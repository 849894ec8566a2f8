"""What produced a result: package versions, device, git sha, data file hashes."""
from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

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


def environment(device: torch.device) -> dict[str, Any]:
    return {
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in PACKAGES},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "git_sha": git_sha(),
    }


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_file_hashes(data_dir: Path | None, tasks: list[str]) -> dict[str, str]:
    """SHA-256 of every data file under the task folders used (relative path → digest)."""
    if data_dir is None:
        return {}
    folders = {"toxigenqa": "toxigen/annotated", "hatecheckqa": "hatecheck", "bbq": "bbq/data",
               "bbq_lite": "bbq/bbq_lite/resources", "arc_easy": "arc/ARC-Easy_hf_format", "arc_challenge": "arc",
               "cqa": "cqa/dev_hf_format", "cqa_v1": "cqa/v1.0_3choice_cos-e", "cqa2": "csqa2"}
    hashes = {}
    for task in tasks:
        folder = data_dir / folders.get(task, "__none__")
        if folder.is_dir():
            for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
                hashes[str(path.relative_to(data_dir))] = file_sha256(path)
    return hashes
