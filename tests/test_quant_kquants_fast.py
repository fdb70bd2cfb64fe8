"""The numpy fast paths of the K-quant core (NumpyOps.signed_max / qx_search / q3_k / q3_bits / requant) give
the bytes of the generic backend-neutral code and of llama.cpp, on inputs made to produce near-ties."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from llmforge.quant import kquants
from llmforge.quant.kquants import K_TYPES, NumpyOps, quantize_blocks
from quant_oracle import ggml_quantize


class GenericOps(NumpyOps):
    """NumpyOps without its optional fast paths: the core falls back to the generic code."""

    signed_max = None
    qx_search = None
    q3_k = None
    q3_bits = None
    requant = None


def adversarial(seed: int = 0, rows: int = 8, cols: int = 2048) -> np.ndarray:
    """Rows built for ties: small integers, repeated values, f16/coarse grids, equal |max| of both signs,
    a single spike, signed zeros, subnormals, near the 1e-15 all-zero threshold, and non-finite values."""
    rng = np.random.default_rng(seed)
    normal = rng.standard_normal((rows, cols)).astype(np.float32)
    spike = np.zeros((rows, cols), np.float32)
    spike[:, ::16] = 1.0
    spike[:, 5::16] = -0.5
    both_signs = rng.integers(-3, 4, (rows, cols)).astype(np.float32)
    both_signs[:, ::16] = 3.0
    both_signs[:, 1::16] = -3.0
    signed_zero = np.where(rng.random((rows, cols)) < 0.5, np.float32(-0.0), normal)
    non_finite = normal.copy()                       # quantize_k's callers refuse these; the core must not crash
    non_finite[:, :16] = np.nan                      # an all-NaN sub-block
    non_finite[:, 20] = np.inf
    non_finite[:, cols // 2 - 100:cols // 2 - 60:3] = -np.inf
    non_finite[:, cols // 2 + 5] = np.nan
    parts = [
        rng.integers(-2, 3, (rows, cols)).astype(np.float32),
        rng.integers(-40, 41, (rows, cols)).astype(np.float32),
        np.repeat(rng.standard_normal((rows, cols // 8)).astype(np.float32), 8, axis=1),
        (normal * 0.02).astype(np.float16).astype(np.float32),
        np.round(normal * 4) / np.float32(4),
        spike,
        both_signs,
        signed_zero,
        normal * np.float32(1e-40),                    # subnormal
        normal * np.float32(2e-16),                    # around the 1e-15 threshold
        normal * np.float32(1e15),                     # inf/NaN scales
        non_finite,
        np.abs(normal) + np.float32(1),
    ]
    return np.concatenate(parts).astype(np.float32)


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_fast_paths_match_generic_code_and_ggml(qtype, weighted):
    x = adversarial()
    rng = np.random.default_rng(2)
    imp = None
    if weighted:
        imp = rng.integers(0, 4, x.shape[1]).astype(np.float32)   # repeated and zero weights
    expected = ggml_quantize(x, qtype, imp)
    blocks = x.reshape(-1, 256)
    qw = None if imp is None else kquants._block_weights(imp, x.shape)
    with np.errstate(all="ignore"):
        fast = quantize_blocks(NumpyOps(), qtype, blocks, qw)
        generic = quantize_blocks(GenericOps(), qtype, blocks, None if qw is None else np.ascontiguousarray(qw))
    assert np.array_equal(generic.reshape(expected.shape), expected)
    assert np.array_equal(fast.reshape(expected.shape), expected)


def test_generic_ops_really_skip_the_fast_paths(monkeypatch):
    """Guard for the test above: GenericOps must not reach the numpy-only methods."""
    def boom(*args, **kwargs):
        raise AssertionError("fast path used")

    for name in ("signed_max", "qx_search", "q3_k", "q3_bits", "requant"):
        monkeypatch.setattr(NumpyOps, name, boom, raising=False)
    x = adversarial(rows=1, cols=512)
    with np.errstate(all="ignore"):
        quantize_blocks(GenericOps(), T.Q3_K, x.reshape(-1, 256))
        quantize_blocks(GenericOps(), T.Q6_K, x.reshape(-1, 256))
        with pytest.raises(AssertionError, match="fast path used"):
            quantize_blocks(NumpyOps(), T.Q6_K, x.reshape(-1, 256))


@pytest.mark.parametrize("fill", [0.0, 0.5, np.nan], ids=["zeros", "constant", "nan"])
def test_q3_refinement_with_nothing_to_refine(fill):
    """Chunks where no sub-block's refinement accepts anything (the speculative rounds have no work)."""
    x = np.full((2, 512), fill, dtype=np.float32)
    with np.errstate(all="ignore"):
        got = quantize_blocks(NumpyOps(), T.Q3_K, x.reshape(-1, 256))
        generic = quantize_blocks(GenericOps(), T.Q3_K, x.reshape(-1, 256))
    assert np.array_equal(got, generic)
    if not np.isnan(fill):
        assert np.array_equal(got.reshape(2, -1), ggml_quantize(x, T.Q3_K))


@pytest.mark.parametrize("shared", [True, False], ids=["shared-memory", "pickled"])
def test_worker_processes_give_the_same_bytes(shared, monkeypatch):
    """quantize_k over the calling process and pool helpers, their data through the shared memfds (grown
    between calls) or, without those, pickled slices."""
    monkeypatch.setattr(kquants, "CHUNK_BLOCKS", 5)
    if not shared:
        monkeypatch.setattr(kquants, "_shared_buffers", lambda: None)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 15, 1024)).astype(np.float32)     # 180 blocks: tasks of 23, not page-aligned
    imp = rng.random((3, 1024)).astype(np.float32)
    for qtype in (T.Q3_K, T.Q6_K):
        assert np.array_equal(kquants.quantize_k(x[0, :4], qtype, threads=2), ggml_quantize(x[0, :4], qtype))
        got = kquants.quantize_k(x, qtype, imp, threads=2)
        for e in range(3):
            assert np.array_equal(got[e], ggml_quantize(x[e], qtype, imp[e]))
        assert np.array_equal(kquants.quantize_k(x[0], qtype, threads=3), ggml_quantize(x[0], qtype))
