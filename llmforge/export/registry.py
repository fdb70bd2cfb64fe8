"""The architectures llmforge converts, as data: config -> GGUF metadata, tensor names, per-arch transforms.

Each :class:`ArchSpec` says which Hugging Face ``architectures`` it covers, which GGUF architecture it
becomes, which metadata keys come from which config keys (with their GGUF value types, which llama.cpp's
loader checks strictly), and which tensor transforms apply. Tensor names go through ``gguf.TensorNameMap``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gguf
from gguf import MODEL_ARCH, MODEL_TENSOR, GGUFValueType
from gguf import Keys

from ..errors import LlmforgeError

if TYPE_CHECKING:
    import torch

U32, F32, BOOL = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.BOOL


class HParams:
    """A config.json view that understands transformers 5's ``rope_parameters`` (and older spellings)."""

    def __init__(self, config: dict):
        self.config = config

    def get(self, *keys: str, default: Any = None) -> Any:
        for key in keys:
            if self.config.get(key) is not None:
                return self.config[key]
        return default

    def require(self, *keys: str) -> Any:
        value = self.get(*keys)
        if value is None:
            raise LlmforgeError(f"config.json lacks {keys[0]!r}", hint="the model folder's config is incomplete")
        return value

    def rope(self, layer_type: str = "full_attention") -> dict:
        """RoPE parameters for ``layer_type`` (nested per layer type in Gemma 3 configs)."""
        params = self.config.get("rope_parameters") or self.config.get("rope_scaling") or {}
        params = dict(params.get(layer_type, params)) if isinstance(params, dict) else {}
        if "rope_theta" not in params and "rope_theta" in self.config:
            params["rope_theta"] = self.config["rope_theta"]
        if "type" in params and "rope_type" not in params:
            params["rope_type"] = params["type"]
        return params

    @property
    def n_head(self) -> int:
        return int(self.require("num_attention_heads"))

    @property
    def n_head_kv(self) -> int:
        return int(self.get("num_key_value_heads", default=self.n_head))

    @property
    def head_dim(self) -> int:
        return int(self.get("head_dim", default=self.require("hidden_size") // self.n_head))

    @property
    def n_layer(self) -> int:
        return int(self.require("num_hidden_layers"))

    @property
    def tied(self) -> bool:
        return bool(self.get("tie_word_embeddings", default=False))


# --------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class KV:
    """One GGUF key filled from the first present config key (or a computed ``value(hp)``)."""

    key: str                      # with {arch}, e.g. Keys.LLM.CONTEXT_LENGTH
    vtype: GGUFValueType
    config_keys: tuple[str, ...] = ()
    value: Callable[[HParams], Any] | None = None
    required: bool = True

    def resolve(self, hp: HParams) -> Any:
        v = self.value(hp) if self.value else hp.get(*self.config_keys)
        if v is None and self.required:
            raise LlmforgeError(f"config.json lacks {self.config_keys[0] if self.config_keys else self.key!r}",
                                hint="the model folder's config is incomplete")
        return v


def _rope_theta(layer_type: str = "full_attention") -> Callable[[HParams], Any]:
    return lambda hp: hp.rope(layer_type).get("rope_theta", 10000.0)


COMMON_KVS: tuple[KV, ...] = (
    KV(Keys.LLM.CONTEXT_LENGTH, U32, ("max_position_embeddings",)),
    KV(Keys.LLM.EMBEDDING_LENGTH, U32, ("hidden_size",)),
    KV(Keys.LLM.BLOCK_COUNT, U32, ("num_hidden_layers",)),
    KV(Keys.LLM.FEED_FORWARD_LENGTH, U32, ("intermediate_size",)),
    KV(Keys.Attention.HEAD_COUNT, U32, ("num_attention_heads",)),
    KV(Keys.Attention.HEAD_COUNT_KV, U32, value=lambda hp: hp.n_head_kv),
    KV(Keys.Rope.FREQ_BASE, F32, value=_rope_theta()),
    KV(Keys.Attention.LAYERNORM_RMS_EPS, F32, ("rms_norm_eps",)),
    KV(Keys.Attention.KEY_LENGTH, U32, value=lambda hp: hp.head_dim),
    KV(Keys.Attention.VALUE_LENGTH, U32, value=lambda hp: hp.head_dim),
)

LLAMA_KVS = (
    KV(Keys.LLM.VOCAB_SIZE, U32, ("vocab_size",)),
    KV(Keys.Rope.DIMENSION_COUNT, U32, value=lambda hp: hp.head_dim),
)
GEMMA2_KVS = (
    KV(Keys.LLM.ATTN_LOGIT_SOFTCAPPING, F32, ("attn_logit_softcapping",), required=False),
    KV(Keys.LLM.FINAL_LOGIT_SOFTCAPPING, F32, ("final_logit_softcapping",), required=False),
    KV(Keys.Attention.SLIDING_WINDOW, U32, ("sliding_window",), required=False),
)
GEMMA3_KVS = (
    KV(Keys.LLM.FINAL_LOGIT_SOFTCAPPING, F32, ("final_logit_softcapping",), required=False),
    KV(Keys.Attention.SLIDING_WINDOW, U32, ("sliding_window",), required=False),
)
# M-RoPE (Qwen2-VL text models): rotary pairs per position axis (time, height, width), padded to 4 as llama.cpp
QWEN2VL_KVS = (
    KV(Keys.Rope.DIMENSION_SECTIONS, GGUFValueType.ARRAY,
       value=lambda hp: [int(s) for s in (list(hp.rope()["mrope_section"]) + [0, 0, 0, 0])[:4]]),
)
PHI3_KVS = (
    KV(Keys.Rope.SCALING_ORIG_CTX_LEN, U32,
       value=lambda hp: hp.get("original_max_position_embeddings", default=hp.rope().get(
           "original_max_position_embeddings", hp.get("max_position_embeddings")))),
    KV(Keys.Rope.DIMENSION_COUNT, U32,
       value=lambda hp: int(hp.rope().get("partial_rotary_factor", 1.0) * hp.require("hidden_size")) // hp.n_head),
    KV(Keys.Attention.SLIDING_WINDOW, U32, value=lambda hp: hp.get("sliding_window", default=0)),
)


def rope_scaling_kvs(hp: HParams) -> list[tuple[str, Any, GGUFValueType]]:
    """Linear/YaRN RoPE scaling keys (Llama 3 scaling becomes the ``rope_freqs`` tensor instead)."""
    rope = hp.rope()
    kind, factor = str(rope.get("rope_type", "default")).lower(), rope.get("factor")
    if kind == "linear" and factor:
        return [(Keys.Rope.SCALING_TYPE, "linear", GGUFValueType.STRING), (Keys.Rope.SCALING_FACTOR, factor, F32)]
    if kind == "yarn" and factor:
        return [(Keys.Rope.SCALING_TYPE, "yarn", GGUFValueType.STRING), (Keys.Rope.SCALING_FACTOR, factor, F32),
                (Keys.Rope.SCALING_ORIG_CTX_LEN, rope["original_max_position_embeddings"], U32)]
    return []


# --------------------------------------------------------------------- tensors


def permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's half-split rotary layout -> llama.cpp's interleaved pairs, per head (rows of Q or K). Works on
    torch tensors and numpy arrays alike (pure data movement)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


Transform = Callable[[Any, HParams], Any]  # torch tensors or numpy arrays

LLAMA_TRANSFORMS: dict[MODEL_TENSOR, Transform] = {
    MODEL_TENSOR.ATTN_Q: lambda w, hp: permute_rotary(w, hp.n_head),
    MODEL_TENSOR.ATTN_K: lambda w, hp: permute_rotary(w, hp.n_head_kv),
}




def llama3_rope_freqs(hp: HParams) -> torch.Tensor | None:
    """Llama 3.x frequency scaling as llama.cpp's ``rope_freqs.weight`` (divisors per rotary pair)."""
    rope = hp.rope()
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    import torch  # torch's float32 pow, as llama.cpp's converter computes it

    base, dim = float(rope.get("rope_theta", 10000.0)), hp.head_dim
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def phi3_rope_factors(hp: HParams) -> dict[MODEL_TENSOR, torch.Tensor]:
    rope = hp.rope()
    if not rope.get("long_factor"):
        return {}
    import torch

    return {MODEL_TENSOR.ROPE_FACTORS_LONG: torch.tensor(rope["long_factor"], dtype=torch.float32),
            MODEL_TENSOR.ROPE_FACTORS_SHORT: torch.tensor(rope["short_factor"], dtype=torch.float32)}


# --------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class ArchSpec:
    """Everything arch-specific about one family."""

    name: str                                    # llmforge's name
    hf_architectures: tuple[str, ...]            # config.json "architectures"
    model_types: tuple[str, ...]                 # config.json "model_type"
    gguf_arch: MODEL_ARCH
    kvs: tuple[KV, ...] = ()
    transforms: dict[MODEL_TENSOR, Transform] = field(default_factory=dict)
    extra_tensors: Callable[[HParams], dict[MODEL_TENSOR, torch.Tensor]] = lambda hp: {}
    skip: tuple[str, ...] = ("rotary_emb.inv_freq",)   # HF tensors with no GGUF counterpart
    norm_shift: float = 0.0                      # added to every *norm.weight (Gemma: x * (1 + w))
    tied_default: bool = False                   # tie_word_embeddings when config.json omits it
    add_bos: bool | None = None                  # forced tokenizer.ggml.add_bos_token (None: from tokenizer)
    # llama.cpp recognises some vocab quirks by general.name (Phi-3: special tokens strip spaces to their right)
    name_tag: str | None = None

    def default_name(self, folder_name: str) -> str:
        """general.name when the user gives none: the folder name, tagged where llama.cpp needs it."""
        if self.name_tag and self.name_tag not in folder_name.lower().replace("-", ""):
            return f"{self.name_tag}-{folder_name}"
        return folder_name

    @property
    def gguf_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def tensor_map(self, n_layer: int) -> gguf.TensorNameMap:
        return gguf.get_tensor_name_map(self.gguf_arch, n_layer)


def _llama_extra(hp: HParams) -> dict[MODEL_TENSOR, torch.Tensor]:
    freqs = llama3_rope_freqs(hp)
    return {MODEL_TENSOR.ROPE_FREQS: freqs} if freqs is not None else {}


REGISTRY: tuple[ArchSpec, ...] = (
    ArchSpec("llama", ("LlamaForCausalLM",), ("llama",), MODEL_ARCH.LLAMA, kvs=LLAMA_KVS,
             transforms=LLAMA_TRANSFORMS, extra_tensors=_llama_extra),
    ArchSpec("mistral", ("MistralForCausalLM",), ("mistral",), MODEL_ARCH.LLAMA, kvs=LLAMA_KVS,
             transforms=LLAMA_TRANSFORMS, extra_tensors=_llama_extra),
    ArchSpec("qwen2", ("Qwen2ForCausalLM",), ("qwen2",), MODEL_ARCH.QWEN2),
    ArchSpec("qwen3", ("Qwen3ForCausalLM",), ("qwen3",), MODEL_ARCH.QWEN3),
    # the text half of Qwen2-VL / Qwen2.5-VL (llmforge.export.vision stages it under these names)
    ArchSpec("qwen2vl", ("Qwen2VLTextModel", "Qwen2_5_VLTextModel"), ("qwen2_vl_text", "qwen2_5_vl_text"),
             MODEL_ARCH.QWEN2VL, kvs=QWEN2VL_KVS),
    ArchSpec("gemma2", ("Gemma2ForCausalLM",), ("gemma2",), MODEL_ARCH.GEMMA2, kvs=GEMMA2_KVS,
             norm_shift=1.0, skip=("rotary_emb.inv_freq", "lm_head.weight"), tied_default=True,
             add_bos=True),
    ArchSpec("gemma3", ("Gemma3ForCausalLM",), ("gemma3_text", "gemma3"), MODEL_ARCH.GEMMA3, kvs=GEMMA3_KVS,
             norm_shift=1.0, skip=("rotary_emb.inv_freq", "lm_head.weight"), tied_default=True,
             add_bos=True),
    ArchSpec("phi3", ("Phi3ForCausalLM",), ("phi3",), MODEL_ARCH.PHI3, kvs=PHI3_KVS,
             extra_tensors=phi3_rope_factors, name_tag="phi3"),
)


def supported_architectures() -> list[str]:
    return [a for spec in REGISTRY for a in spec.hf_architectures]


def find_arch(config: dict, where: str = "config.json") -> ArchSpec:
    """The spec for a config.json, by ``architectures`` then ``model_type``; a clear error otherwise."""
    archs = config.get("architectures") or []
    for spec in REGISTRY:
        if any(a in spec.hf_architectures for a in archs):
            return spec
    if not archs:
        for spec in REGISTRY:
            if config.get("model_type") in spec.model_types:
                return spec
    found = ", ".join(archs) or config.get("model_type") or "none"
    raise LlmforgeError(f"unsupported architecture {found} in {where}",
                        hint="supported: " + ", ".join(supported_architectures()))


def metadata(spec: ArchSpec, hp: HParams) -> list[tuple[str, Any, GGUFValueType]]:
    """(key, value, type) for every architecture key of the GGUF, in writing order."""
    out: dict[str, tuple[Any, GGUFValueType]] = {}
    for kv in COMMON_KVS + spec.kvs:
        value = kv.resolve(hp)
        if value is not None:
            out[kv.key.format(arch=spec.gguf_name)] = (value, kv.vtype)
    for key, value, vtype in rope_scaling_kvs(hp):
        out[key.format(arch=spec.gguf_name)] = (value, vtype)
    return [(k, v, t) for k, (v, t) in out.items()]
