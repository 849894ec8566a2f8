"""The weight cache: materialises any node's weights once per process, from the base model, the lineage's latest
full checkpoint and every LoRA adapter after it (merged). The stage executor and `chaintune verify` both use it."""
from __future__ import annotations

from typing import Any

import torch

from chaintune.models import load_model, load_tokenizer, pick_device, resolve_model_path
from chaintune.plan import Node
from chaintune.io import file_sha256
from chaintune.rundir import RunDir


def checkpoint_sources(node: Node) -> list[Node]:
    """The trained nodes whose checkpoints make `node`'s weights: the lineage's latest full fine-tune (if any),
    then every LoRA adapter after it."""
    lineage = node.lineage()[1:]
    start = max((i for i, n in enumerate(lineage) if n.training and n.training.method == "full"), default=-1)
    return lineage[max(start, 0):]


def checkpoint_ok(out: RunDir, node: Node) -> bool:
    """True if the node's checkpoint exists and matches the checksum recorded when it was saved."""
    if node.stage is None:
        return True
    record = out.node(node.dirname)
    if record is None or not record.checkpoint_sha256:
        return False
    ckpt = out.checkpoint_dir(node.dirname)
    return all((ckpt / name).is_file() and file_sha256(ckpt / name) == digest
               for name, digest in record.checkpoint_sha256.items())


def checkpoint_problem(out: RunDir, node: Node, keep_checkpoints: bool) -> str | None:
    """Why `node`'s weights cannot be rebuilt ('released', 'missing' or 'corrupt' checkpoint), or None."""
    for source in checkpoint_sources(node) if node.stage is not None else []:
        which = "" if source is node else f" of {source.dirname}"
        if not out.checkpoint_dir(source.dirname).is_dir():
            return ("released" if not keep_checkpoints else "missing") + f" checkpoint{which}"
        if not checkpoint_ok(out, source):
            return f"corrupt checkpoint{which}"
    return None


class WeightCache:
    """One model in memory (`model`, `tokenizer`) and which node's weights it holds (`loaded`)."""

    def __init__(self, out: RunDir, model: str | None, device: str, trust_remote_code: bool):
        self.out, self.model_name, self.trust_remote_code, self.device_setting = out, model, trust_remote_code, device
        self.device = pick_device(device)
        self.model: Any = None
        self.tokenizer: Any = None
        self.loaded: str | None = None  # key of the node whose weights are in self.model; None: unknown/changing

    def identity(self) -> tuple:
        """What must match for another job to reuse these weights (node keys name weights within one output dir)."""
        return (str(self.out.root), self.model_name, self.device_setting, self.trust_remote_code)

    def materialize(self, node: Node) -> Any:
        """Put `node`'s weights into self.model (in eval mode) and return it."""
        if self.loaded == node.key:
            return self.model
        sources = checkpoint_sources(node)
        full = sources[0] if sources and sources[0].training.method == "full" else None
        if full is not None:
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(
                self.out.checkpoint_dir(full.dirname), dtype=torch.float32,
                trust_remote_code=self.trust_remote_code).to(self.device).eval()
            if self.tokenizer is None:
                self.tokenizer = load_tokenizer(resolve_model_path(self.model_name), self.trust_remote_code)
        else:
            self.model, self.tokenizer = load_model(resolve_model_path(self.model_name), device=str(self.device),
                                                    dtype="float32", trust_remote_code=self.trust_remote_code)
        for n in sources[1:] if full is not None else sources:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, self.out.checkpoint_dir(n.dirname)).merge_and_unload()
        self.model.eval()
        self.loaded = node.key
        return self.model
