"""Load a causal LM and its tokenizer for training: NF4 (double quant) on CUDA, bf16/fp32 on CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import LlmforgeError

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "phi3")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")   # the old name and torch 2.9's
EXPANDABLE_SEGMENTS = "expandable_segments:True"


def prefer_expandable_segments() -> bool:
    """Turn on the CUDA allocator's expandable segments for this process, as Unsloth does: freed memory is reused
    without fragmenting, so reserved memory stays close to allocated (on an H100 at the 8B shape, 5.63 GiB reserved
    for 5.14 allocated, against 6.64 without). Left alone when the user configured the allocator or CUDA has started
    (the setting is read once, when CUDA starts); True when it was set."""
    if any(name in os.environ for name in ALLOC_CONF_VARS) or torch.cuda.is_initialized():
        return False
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = EXPANDABLE_SEGMENTS
    return True


def pick_dtype(dtype: str | torch.dtype, cuda: bool) -> torch.dtype:
    """``auto`` is bf16 on CUDA chips that support it, fp16 on older ones, fp32 on CPU (fastest there)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        return DTYPES[dtype]
    if cuda:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(path: str | Path, chat_template: str | None = None) -> Any:
    """Tokenizer with a pad token (eos when missing) and right padding, as training needs."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise LlmforgeError(f"cannot load a tokenizer from {path}", hint=str(exc).splitlines()[0]) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    tokenizer.padding_side = "right"
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def from_pretrained(loader: Any, path: Path, **kwargs: Any) -> Any:
    """``loader.from_pretrained(path)``; weights whose shapes do not fit config.json are one error line
    (transformers prints its report of the mismatched tensors above it, then raises a bare RuntimeError)."""
    try:
        return loader.from_pretrained(str(path), **kwargs)
    except RuntimeError as exc:
        if "ignore_mismatched_sizes" not in str(exc):
            raise
        raise LlmforgeError(f"the weights in {path} do not fit its config.json (see the tensors listed above)",
                            hint="fix config.json or re-save the model") from None


def load_model(path: str | Path, load_in_4bit: bool = True, dtype: str | torch.dtype = "auto",
               max_seq_length: int = 2048, chat_template: str | None = None) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a Hugging Face folder for LoRA/QLoRA training.

    4-bit NF4 with double quantization needs CUDA; without it a note goes to stderr and the model loads
    in 16/32-bit instead.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise LlmforgeError(f"{path} is not a Hugging Face model folder (no config.json)",
                            hint="set model.path to a folder with config.json and weights")
    config = AutoConfig.from_pretrained(str(path))
    if config.model_type not in SUPPORTED_TYPES:
        raise LlmforgeError(f"model type {config.model_type!r} of {path} is not supported for training",
                            hint=f"supported: {', '.join(SUPPORTED_TYPES)}")
    cuda = torch.cuda.is_available()
    torch_dtype = pick_dtype(dtype, cuda)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if load_in_4bit and not cuda:
        print("note: 4-bit loading needs CUDA; loading in "
              f"{str(torch_dtype).removeprefix('torch.')} instead", file=sys.stderr)
    elif load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype)
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = from_pretrained(AutoModelForCausalLM, path, **kwargs)
    if cuda and not load_in_4bit:
        model = model.to("cuda")
    model.config.use_cache = False
    tokenizer = load_tokenizer(path, chat_template)
    tokenizer.model_max_length = max_seq_length
    return model, tokenizer
