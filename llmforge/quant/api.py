"""The narrow interface the export path uses to quantize: ftype names, per-tensor type choice, packing.

``llmforge.export`` calls only these three functions; everything behind them (K-quant packing, mixture
rules, importance weights, the torch path) lives in the other modules of ``llmforge.quant``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F
from gguf import quants as gguf_quants

from ..errors import LlmforgeError


@dataclass(frozen=True)
class FType:
    """A user-facing quant name (``q4_k_m``) and what it means for the file."""

    name: str
    file_type: F          # written as general.file_type
    base_type: T          # the type most 2-D weights get
    description: str


# Filled out by llmforge.quant.mixtures (K-mixtures); the plain types are defined here.
FTYPES: dict[str, FType] = {
    "f32": FType("f32", F.ALL_F32, T.F32, "32-bit float, lossless"),
    "f16": FType("f16", F.MOSTLY_F16, T.F16, "16-bit float"),
    "bf16": FType("bf16", F.MOSTLY_BF16, T.BF16, "bfloat16, lossless from bf16 checkpoints"),
    "q8_0": FType("q8_0", F.MOSTLY_Q8_0, T.Q8_0, "8-bit round-to-nearest, blocks of 32"),
}


def resolve_ftype(name: str) -> FType:
    """Look up a quant name (case-insensitive); unknown names raise a one-line error listing the valid ones."""
    key = name.strip().lower()
    if key not in FTYPES:
        raise LlmforgeError(f"unknown quant type {name!r}", hint="valid: " + ", ".join(FTYPES))
    return FTYPES[key]


@dataclass(frozen=True)
class TensorContext:
    """What the mixture rules need to know about one tensor and its model."""

    name: str                 # GGUF tensor name, e.g. "blk.3.attn_v.weight"
    shape: tuple[int, ...]    # numpy order (rows, cols): ne[0] is shape[-1]
    arch: str                 # GGUF architecture, e.g. "llama"
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0
    has_output: bool = True   # False when token_embd is tied to the output


def is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp's ``tensor_allows_quantization``: >= 2 dims, a *weight, not a norm or similar."""
    if len(shape) < 2 or not name.endswith("weight"):
        return False
    return not any(tag in name for tag in ("_norm.weight", "ffn_gate_inp", "pos_embd", "token_types",
                                            "ssm_conv1d"))


def choose_tensor_type(ftype: FType, ctx: TensorContext, source_type: T = T.F32) -> T:
    """The ggml type ``ctx``'s tensor gets under ``ftype`` (plain types only here; see mixtures)."""
    if not is_quantizable(ctx.name, ctx.shape):
        return T.F32 if source_type not in (T.F16, T.BF16) or len(ctx.shape) < 2 else source_type
    qtype = ftype.base_type
    block = gguf_quants.GGML_QUANT_SIZES[qtype][0]
    if ctx.shape[-1] % block:
        return T.F16
    return qtype


def quantize_array(data: np.ndarray, qtype: T, importance: np.ndarray | None = None) -> np.ndarray:
    """Pack float32 ``data`` (rows x cols) into ``qtype``'s bytes, exactly as llama.cpp does."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    if qtype == T.F32:
        return data
    if qtype == T.F16:
        return data.astype(np.float16)
    return gguf_quants.quantize(data, qtype)
