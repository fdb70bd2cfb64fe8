"""Tiny random Hugging Face models of every supported architecture, on the real fixture tokenizers.

Used by the tests and benchmarks (nothing can be downloaded). Hidden sizes are multiples of 256 so every
K-quant applies; weights are drawn with a larger std than usual so greedy decoding has clear margins.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TOKENIZERS = SHARED / "fixtures" / "tokenizers"
TEMPLATES = SHARED / "templates"

# arch -> (fixture tokenizer, transformers model_type, config overrides)
TINY_ARCHS: dict[str, tuple[str, dict]] = {
    "llama": ("llama-bpe", dict(
        model_type="llama", vocab_size=128256, bos_token_id=128000, eos_token_id=128001,
        num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    )),
    "mistral": ("llama-spm", dict(
        model_type="mistral", vocab_size=32000, bos_token_id=1, eos_token_id=2, num_key_value_heads=2,
        rope_theta=1000000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=32768,
        sliding_window=None,
    )),
    "qwen2": ("qwen2", dict(
        model_type="qwen2", vocab_size=151936, bos_token_id=151643, eos_token_id=151645, num_key_value_heads=2,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=32768,
        initializer_range=0.06,  # at 0.08 its q8_0 logits drift 5.6e-2 (llama.cpp's own converter's file too)
    )),
    "qwen3": ("qwen2", dict(
        model_type="qwen3", vocab_size=151936, bos_token_id=151643, eos_token_id=151645, num_key_value_heads=2,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=40960,
        head_dim=64,
    )),
    "gemma2": ("gemma-4", dict(
        model_type="gemma2", vocab_size=262144, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64, rms_norm_eps=1e-6,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096,
        max_position_embeddings=8192, hidden_activation="gelu_pytorch_tanh",
    )),
    "gemma3": ("gemma-4", dict(
        model_type="gemma3_text", vocab_size=262144, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64, rms_norm_eps=1e-6,
        sliding_window=512, max_position_embeddings=32768, hidden_activation="gelu_pytorch_tanh",
        rope_theta=1000000.0,
    )),
    "phi3": ("phi-3", dict(
        model_type="phi3", vocab_size=32064, bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
        num_key_value_heads=4, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        max_position_embeddings=4096, original_max_position_embeddings=4096,
    )),
}


def tiny_config(arch: str, *, hidden_size: int = 256, intermediate_size: int = 512, num_layers: int = 2,
                num_heads: int = 4, init_std: float | None = None, **overrides):
    """A transformers config for a tiny model of ``arch`` (a key of TINY_ARCHS)."""
    from transformers import AutoConfig

    _, base = TINY_ARCHS[arch]
    values = dict(base)
    model_type = values.pop("model_type")
    values.update(hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads,
                  initializer_range=init_std if init_std is not None else values.get("initializer_range", 0.08))
    if arch in ("gemma3",):
        values["layer_types"] = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(num_layers)]
    values.update(overrides)
    return AutoConfig.for_model(model_type, **values)


def copy_tokenizer(fixture: str, out_dir: Path) -> None:
    """Copy a fixture tokenizer's hub files (not FIXTURE_INFO.json) into ``out_dir``."""
    for f in (TOKENIZERS / fixture).iterdir():
        if f.name != "FIXTURE_INFO.json":
            shutil.copy(f, out_dir / f.name)


def build_tiny_model(arch: str, out_dir: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                     max_shard_size: str | None = None, **config_overrides) -> Path:
    """Build and save a tiny random ``arch`` model with its fixture tokenizer into ``out_dir``."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fixture, _ = TINY_ARCHS[arch]
    config = tiny_config(arch, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # norms: random around their neutral value so norm handling (e.g. Gemma's 1+w) is exercised
        for name, p in model.named_parameters():
            if p.ndim == 1:
                neutral = 0.0 if arch.startswith("gemma") or "bias" in name else 1.0
                p.copy_(neutral + 0.1 * torch.randn_like(p))
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    copy_tokenizer(fixture, out_dir)
    gen = out_dir / "generation_config.json"
    if gen.exists():  # keep it minimal and deterministic
        data = json.loads(gen.read_text())
        data.pop("transformers_version", None)
    return out_dir
