"""llama.cpp's own quantizers as test oracles: ctypes on llama-cpp-python's bundled libggml-base."""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from llmforge.quant.kquants import BLOCK_BYTES


@cache
def ggml_base() -> ctypes.CDLL:
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    lib = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
    fp = ctypes.POINTER(ctypes.c_float)
    for name in ("q2_K", "q3_K", "q4_K", "q5_K", "q6_K"):
        fn = getattr(lib, f"quantize_{name}")
        fn.restype = ctypes.c_size_t
        fn.argtypes = [fp, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, fp]
    return lib


def ggml_quantize(data: np.ndarray, qtype: T, importance: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's ``quantize_<type>(src, dst, nrow, n_per_row, quant_weights)`` on (rows, cols) float32."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    rows, cols = data.shape
    out = np.zeros((rows, cols // 256 * BLOCK_BYTES[qtype]), dtype=np.uint8)
    fn = getattr(ggml_base(), f"quantize_{qtype.name.replace('_K', '_K')[:2].lower()}_K")
    fp = ctypes.POINTER(ctypes.c_float)
    qw = None
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        qw = importance.ctypes.data_as(fp)
    fn(data.ctypes.data_as(fp), out.ctypes.data, rows, cols, qw)
    return out


def ggml_quantize_any(data: np.ndarray, qtype: T, importance: np.ndarray | None = None) -> np.ndarray:
    """``quantize_<type>`` for any type ggml can quantize (legacy types included)."""
    from gguf.constants import GGML_QUANT_SIZES

    lib = ggml_base()
    fn = getattr(lib, f"quantize_{qtype.name.lower().replace('_k', '_K')}")
    fp = ctypes.POINTER(ctypes.c_float)
    fn.restype = ctypes.c_size_t
    fn.argtypes = [fp, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, fp]
    data = np.ascontiguousarray(data, dtype=np.float32)
    rows, cols = data.shape
    block, size = GGML_QUANT_SIZES[qtype]
    out = np.zeros((rows, cols // block * size), dtype=np.uint8)
    qw = None
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        qw = importance.ctypes.data_as(fp)
    fn(data.ctypes.data_as(fp), out.ctypes.data, rows, cols, qw)
    return out
