"""Helpers for the adapter tests: random PEFT adapters (B made non-zero) on tiny models, and their logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# token ids valid in every fixture vocabulary (first one is a BOS-like id per arch)
BOS = {"llama": 128000, "mistral": 1, "qwen2": 151643, "qwen3": 151643, "gemma2": 2, "gemma3": 2, "phi3": 1}
BODY = [300, 1200, 57, 4096, 815, 23, 9000, 31, 777, 1500]


def token_ids(arch: str) -> list[int]:
    return [BOS[arch], *BODY]


def load_f32(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()


def make_adapter(base_dir: Path, out_dir: Path, *, seed: int = 0, std: float = 0.05, prepare=None, **lora_kwargs):
    """Save a PEFT LoRA adapter with random (non-zero) factors for ``base_dir``; return (folder, peft model).

    ``prepare(model)`` runs on the base model before PEFT wraps it (e.g. to resize the vocabulary)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = load_f32(base_dir)
    if prepare is not None:
        prepare(model)
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
            elif "lora_" in name:
                p.normal_(0, std)
            elif "modules_to_save" in name:
                p.add_(0.1 * torch.randn_like(p))
    out_dir = Path(out_dir)
    peft_model.save_pretrained(out_dir)
    return out_dir, peft_model.eval()


def logits_of(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def llama_with_lora_logits(base_gguf: Path, lora_gguf: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp logits of ``base_gguf`` with a GGUF LoRA adapter applied at run time (f32 KV cache)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(base_gguf), lora_path=str(lora_gguf), n_ctx=64, n_batch=64, logits_all=True,
                type_k=0, type_v=0, verbose=False, n_threads=2, seed=0)
    try:
        llm.eval(list(ids))
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def copy_with_nan(model_dir: Path, out_dir: Path, tensor: str, index: tuple[int, int]) -> Path:
    """A copy of ``model_dir`` whose ``tensor`` holds one NaN at ``index`` (for the NaN-refusal tests)."""
    from safetensors.torch import load_file, save_file

    out_dir.mkdir()
    for f in model_dir.iterdir():
        (out_dir / f.name).write_bytes(f.read_bytes())
    tensors = load_file(out_dir / "model.safetensors")
    tensors[tensor][index] = float("nan")
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir
