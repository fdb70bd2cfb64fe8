"""The narrow interface the export path uses to quantize: ftype names, per-tensor type choice, packing.

``llmforge.export`` calls only these functions; everything behind them (K-quant packing, mixture
rules, importance weights, the torch path) lives in the other modules of ``llmforge.quant``.
Reference: llama.cpp 0c1e570 as vendored in llama-cpp-python 0.3.36.

For exporters:
- ``choose_tensor_type(ftype, ctx, source_type)`` is stateless and exact for dense models (one attn_v
  and one ffn_* per layer, the supported archs); set ``TensorContext.has_imatrix`` when an importance
  matrix is used (it changes the q4_0/q5_0 ffn_down rule). For other models use
  ``mixtures.TypePlanner`` in ``mixtures.weights_map_order``.
- ``quantize_array(data, qtype, importance=None, name=..., backend=...)`` refuses NaN/Inf, naming ``name``.
- ``resolve_backend(backend)`` picks where K-types are packed, once per conversion: "numpy" (CPU worker
  processes, no torch import), "cuda" (the fused Triton kernels) or "cpu" (the torch path on the CPU).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F
from gguf import quants as gguf_quants

from ..errors import LlmforgeError
from . import mixtures
from .kquants import K_TYPES, quantize_k
from .q8_0 import quantize_q8_0


@dataclass(frozen=True)
class FType:
    """A user-facing quant name (``q4_k_m``) and what it means for the file."""

    name: str
    file_type: F          # written as general.file_type
    base_type: T          # the type most 2-D weights get
    description: str


FTYPES: dict[str, FType] = {m.name: FType(m.name, m.file_type, m.base_type, m.description)
                            for m in mixtures.MIXTURES}


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
    has_imatrix: bool = False  # an importance matrix is used (llama.cpp's qs.has_imatrix)
    leave_output: bool = False  # output.weight keeps its source type (llama-quantize --leave-output-tensor)


def is_quantizable(name: str, shape: tuple[int, ...], leave_output: bool = False) -> bool:
    """llama.cpp's ``tensor_allows_quantization``: >= 2 dims, a *weight, not a norm or similar (nor
    output.weight with ``leave_output``)."""
    return mixtures.allows_quantization(name, len(shape), leave_output)


def facts_of(ctx: TensorContext) -> mixtures.ModelFacts:
    return mixtures.ModelFacts(ctx.arch, ctx.n_layer, ctx.n_head, ctx.n_head_kv, ctx.n_expert,
                               ctx.has_output, ctx.has_imatrix)


def choose_tensor_type(ftype: FType, ctx: TensorContext, source_type: T = T.F32) -> T:
    """The ggml type ``ctx``'s tensor gets under ``ftype``, as ``llama_model_quantize`` would choose it
    when quantizing an f32 GGUF of the same model (tensors it may not quantize keep ``source_type``,
    except that f16/bf16 vectors are stored as f32, as llama.cpp's converter writes them)."""
    if not is_quantizable(ctx.name, ctx.shape, ctx.leave_output):
        return T.F32 if source_type not in (T.F16, T.BF16) or len(ctx.shape) < 2 else source_type
    mixture = mixtures.BY_NAME[ftype.name]
    return mixtures.stateless_type(mixture, facts_of(ctx), ctx.name, ctx.shape, source_type)


def check_finite(data: np.ndarray, name: str) -> None:
    """Refuse NaN/Inf with the tensor's name (llama.cpp would silently write garbage blocks)."""
    if not np.isfinite(data).all():
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise LlmforgeError(f"tensor {name!r} holds {bad} NaN/Inf value(s)",
                            hint="fix or re-export the checkpoint; quantizing it would give a broken model")


# --------------------------------------------------------------------------- where K-types are packed

BACKENDS = ("numpy", "cuda", "cpu")
# the CLI's --device: cpu is the numpy path (the torch CPU path is for checks only)
DEVICE_BACKENDS: dict[str, str] = {"auto": "auto", "cpu": "numpy", "cuda": "cuda"}
# the fused kernels keep pinned staging buffers per device: one thread packs at a time
_GPU_LOCK = threading.Lock()


def _gpu_unusable() -> str | None:
    """Why the CUDA K-quant path cannot run here, or None when it can (imports torch only where an NVIDIA
    device node exists)."""
    if not os.path.exists("/dev/nvidiactl"):
        return "no NVIDIA GPU found (no /dev/nvidiactl)"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    return None


def auto_backend() -> str:
    """"cuda" when an NVIDIA GPU, CUDA torch and Triton are there (the fused K-quant kernels), else "numpy".

    ``LLMFORGE_KQUANT_GPU=off`` keeps the numpy path. No torch import on machines without an NVIDIA device.
    """
    if os.environ.get("LLMFORGE_KQUANT_GPU", "").lower() in ("off", "0", "numpy") or _gpu_unusable():
        return "numpy"
    import torch

    from .kquants_torch import gpu_kernel_path

    return "cuda" if gpu_kernel_path(torch.device("cuda")) == "triton" else "numpy"


def resolve_backend(backend: str = "auto") -> str:
    """The K-quant backend for a whole conversion: "auto" -> :func:`auto_backend`; "cuda" is refused in
    one line when no usable GPU is there; "numpy" and "cpu" (torch on the CPU) are taken as given."""
    key = backend.strip().lower()
    if key == "auto":
        return auto_backend()
    if key not in BACKENDS:
        raise LlmforgeError(f"unknown K-quant backend {backend!r}", hint="valid: auto, " + ", ".join(BACKENDS))
    if key == "cuda" and (why := _gpu_unusable()):
        raise LlmforgeError(f"--device cuda: {why}", hint="use --device cpu or auto")
    return key


def quantize_array(data: np.ndarray, qtype: T, importance: np.ndarray | None = None, *,
                   name: str = "tensor", threads: int | None = None, backend: str = "numpy") -> np.ndarray:
    """Pack float32 ``data`` (rows x cols) into ``qtype``'s bytes, exactly as llama.cpp does.

    ``importance``: per-column importance (llama.cpp imatrix entry, already divided by its counts) for
    K-types and Q4_0/Q4_1/Q5_0/Q5_1; ignored by Q8_0 and float types, as in llama.cpp.
    ``threads``: K-quant worker processes (default: all usable cores; pass 1 inside a worker process).
    ``backend``: from :func:`resolve_backend`; "cuda"/"cpu" pack K-types with torch (same bytes), one
    thread at a time on the GPU; other types always take the numpy path.
    """
    data = np.ascontiguousarray(data, dtype=np.float32)
    check_finite(data, name)
    if qtype == T.F32:
        return data
    if qtype == T.F16:
        return data.astype(np.float16)
    if qtype in K_TYPES and backend != "numpy":
        from .kquants_torch import quantize_k_torch

        if backend != "cuda":
            return quantize_k_torch(data, qtype, importance, device=backend)
        with _GPU_LOCK:
            return quantize_k_torch(data, qtype, importance, device=backend)
    if qtype in K_TYPES:
        return quantize_k(data, qtype, importance, threads=threads)
    if importance is not None and qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):
        from .legacy_weighted import quantize_legacy_weighted

        return quantize_legacy_weighted(data, qtype, importance)
    if qtype == T.Q8_0:
        return quantize_q8_0(data)
    return gguf_quants.quantize(data, qtype)
