"""Q4_0/Q4_1/Q5_0/Q5_1 with importance weights: llama.cpp's ``quantize_row_q*_impl`` weighted paths.

Without importance gguf-py's quantizers are already byte-identical; with an imatrix llama.cpp switches
these types to a weighted fit (``make_qx_quants`` / ``make_qkx3_quants`` over blocks of 32 with
``w = qw * sqrtf(sigma2 + x*x)``, sigma2 over the whole row). Same core as :mod:`.kquants`.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from .kquants import NumpyOps, _fit_scale_min, _fit_symmetric, _seq_sum, f32

_OPS = NumpyOps()
_BYTES = {T.Q4_0: 18, T.Q4_1: 20, T.Q5_0: 22, T.Q5_1: 24}


def _nibbles(L: np.ndarray) -> np.ndarray:
    return ((L[:, :16] & 0xF) | ((L[:, 16:] & 0xF) << 4)).astype(np.uint8)


def _high_bits(L: np.ndarray) -> np.ndarray:
    bits = ((L >> 4) & 1).astype(np.uint32)
    qh = np.zeros(L.shape[0], dtype=np.uint32)
    for j in range(32):
        qh |= bits[:, j] << np.uint32(j)
    return qh.reshape(-1, 1).view(np.uint8)


def _fp16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).reshape(-1, 1).view(np.uint8)


def quantize_legacy_weighted(data: np.ndarray, qtype: T, importance: np.ndarray) -> np.ndarray:
    """Quantize (rows, cols) float32 with per-column ``importance`` as llama.cpp's weighted path does."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    rows, cols = data.reshape(-1, data.shape[-1]).shape
    x2 = data.reshape(rows, cols)
    imp = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1, cols)
    qw_rows = np.broadcast_to(imp.reshape(imp.shape[0], 1, cols), (imp.shape[0], rows // imp.shape[0], cols))
    with np.errstate(all="ignore"):
        xt = np.ascontiguousarray(x2.T)
        sigma2 = _seq_sum(_OPS, xt * xt) / f32(cols)                     # (rows,)
        xs = np.ascontiguousarray(x2.reshape(-1, 32).T)                 # (32, rows*cols/32)
        qws = np.ascontiguousarray(qw_rows.reshape(-1, 32).T)
        w = qws * np.sqrt(np.repeat(sigma2, cols // 32) + xs * xs)
        if qtype in (T.Q4_0, T.Q5_0):
            scale, L = _fit_symmetric(_OPS, xs, 8 if qtype == T.Q4_0 else 16, w)
            head = [_fp16(scale)]
        else:
            scale, the_min, L = _fit_scale_min(_OPS, xs, w, 15 if qtype == T.Q4_1 else 31, -0.9, 0.05, 36, False)
            head = [_fp16(scale), _fp16(-the_min)]
    L = np.ascontiguousarray(L.T)
    if qtype in (T.Q5_0, T.Q5_1):
        head.append(_high_bits(L))
    out = np.concatenate(head + [_nibbles(L)], axis=1)
    return out.reshape(*data.shape[:-1], cols // 32 * _BYTES[qtype])
