"""llama.cpp's own quantizers as test oracles: ctypes on llama-cpp-python's bundled libggml-base."""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T



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
    return ggml_quantize_any(data, qtype, importance)


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


def llama_quantize_file(src: Path, dst: Path, file_type: int, importance: dict[str, np.ndarray] | None = None,
                        nthread: int = 2, pure: bool = False) -> None:
    """``llama_model_quantize`` (llama-quantize's library entry) with optional importance data;
    ``pure``: every quantizable tensor gets the ftype's base type (llama-quantize ``--pure``)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = nthread
    params.ftype = int(file_type)
    params.pure = pure
    keep = []
    if importance:
        entries = (llama_cpp.llama_model_imatrix_data * (len(importance) + 1))()
        for i, (name, values) in enumerate(sorted(importance.items())):
            arr = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
            keep.append(arr)
            entries[i].name = name.encode()
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(importance)].name = None
        params.imatrix = entries
        keep.append(entries)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc}) for {src}")


def gguf_tensors(path: Path) -> dict[str, tuple[int, bytes]]:
    """name -> (ggml type id, raw bytes) of every tensor of a GGUF."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {t.name: (int(t.tensor_type), bytes(np.asarray(t.data).view(np.uint8).reshape(-1))) for t in reader.tensors}


def synthetic_gguf(path: Path, n_layer: int, n_head: int, n_head_kv: int, tied: bool, ffn_ne0: int,
                   emb_ne0: int) -> dict[str, tuple[int, ...]]:
    """A llama header with every weight of an n_layer model, each tensor a few rows only."""
    rng = np.random.default_rng(0)
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (8, emb_ne0), "output_norm.weight": (256,)}
    if not tied:
        shapes["output.weight"] = (8, emb_ne0)
    for i in range(n_layer):
        for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up"):
            shapes[f"blk.{i}.{t}.weight"] = (4, 256)
        shapes[f"blk.{i}.ffn_down.weight"] = (4, ffn_ne0)
        shapes[f"blk.{i}.attn_norm.weight"] = (256,)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(n_layer)
    w.add_context_length(64)
    w.add_embedding_length(256)
    w.add_feed_forward_length(256)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return shapes


def nonfinite_gguf(path: Path, rows: int, bad: dict[tuple[int, int], float]) -> Path:
    """A one-layer llama GGUF of two f32 weights: blk.0.attn_q.weight (4 x 256 ones) and blk.0.attn_k.weight
    (``rows`` x 256 ones with the ``bad`` values at their (row, column))."""
    w = gguf.GGUFWriter(path, "llama")
    for key, value in (("block_count", 1), ("context_length", 64), ("embedding_length", 256),
                       ("feed_forward_length", 256), ("attention.head_count", 4)):
        w.add_uint32(f"llama.{key}", value)
    k = np.ones((rows, 256), dtype=np.float32)
    for at, value in bad.items():
        k[at] = value
    w.add_tensor("blk.0.attn_q.weight", np.ones((4, 256), dtype=np.float32))
    w.add_tensor("blk.0.attn_k.weight", k)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
