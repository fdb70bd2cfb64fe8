"""The numpy fast paths of the K-quant core (NumpyOps.signed_max / qx_search / q3_k / q3_bits / requant /
fit_scale_min / qp_refine) give the bytes of the generic backend-neutral code and of llama.cpp, on inputs made
to produce near-ties."""

from __future__ import annotations

import os

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
    fit_scale_min = None
    qp_refine = None


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

    for name in ("signed_max", "qx_search", "q3_k", "q3_bits", "requant", "fit_scale_min", "qp_refine"):
        monkeypatch.setattr(NumpyOps, name, boom, raising=False)
    x = adversarial(rows=1, cols=512)
    with np.errstate(all="ignore"):
        quantize_blocks(GenericOps(), T.Q3_K, x.reshape(-1, 256))
        quantize_blocks(GenericOps(), T.Q6_K, x.reshape(-1, 256))
        quantize_blocks(GenericOps(), T.Q4_K, x.reshape(-1, 256), np.ones((x.size // 256, 256), np.float32))
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


def test_a_killed_helper_fails_that_call_and_the_next_forks_a_fresh_pool(monkeypatch):
    """A pool helper killed mid-session (the OOM killer's usual victim): that call raises BrokenProcessPool (the
    CLI turns it into one line), and the next call works on a fresh pool with the right bytes."""
    import signal
    from concurrent.futures.process import BrokenProcessPool

    monkeypatch.setattr(kquants, "CHUNK_BLOCKS", 5)
    x = np.random.default_rng(6).standard_normal((15, 1024)).astype(np.float32)
    expected = ggml_quantize(x, T.Q4_K)
    assert np.array_equal(kquants.quantize_k(x, T.Q4_K, threads=2), expected)
    for pid in list(kquants._POOL[1]._processes):
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(BrokenProcessPool):
        for _ in range(50):     # the pool notices the death on its next task, or at the latest a moment later
            kquants.quantize_k(x, T.Q4_K, threads=2)
    assert np.array_equal(kquants.quantize_k(x, T.Q4_K, threads=2), expected)


def test_fast_paths_per_distribution():
    """Each adversarial distribution in its own call (the main test's single call mixes them, so the slabs with
    non-finite rows take the exact nearest_int steps): every affine type, plain and weighted, against ggml."""
    x = adversarial(seed=3, rows=4, cols=1024)
    imp = np.random.default_rng(5).integers(0, 4, x.shape[1]).astype(np.float32)
    for qtype in (T.Q2_K, T.Q4_K, T.Q5_K):
        for weights in (None, imp):
            expected = ggml_quantize(x, qtype, weights).reshape(x.shape[0], -1)
            qw = None if weights is None else np.ascontiguousarray(kquants._block_weights(weights, x.shape))
            with np.errstate(all="ignore"):
                for r in range(0, x.shape[0], 4):
                    blocks = x[r:r + 4].reshape(-1, 256)
                    w = None if qw is None else qw[r * 4:(r + 4) * 4]
                    got = quantize_blocks(NumpyOps(), qtype, blocks, w)
                    assert np.array_equal(got.reshape(4, -1), expected[r:r + 4]), (qtype.name, r)


def scale_min_cases() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, x, w) position-major (32, S) sub-blocks for make_qkx2/qkx3: levels near the 2**21 rint limit,
    flat sub-blocks next to others, tiny ranges at huge offsets, subnormals, non-finite values."""
    rng = np.random.default_rng(7)
    S = 600
    normal = rng.standard_normal((32, S)).astype(np.float32)
    w = (np.abs(normal) + rng.random((32, S)).astype(np.float32)).astype(np.float32)
    flat = normal.copy()
    flat[:, ::3] = np.float32(-0.75)                  # constant negative sub-blocks (mx == mn)
    flat[:, 1::3] = np.float32(0.0)
    tiny_range = (np.float32(-1e4) + normal * np.float32(1e-3)).astype(np.float32)   # (x - mn) / (mx - mn) ~ 1
    # a cluster below 0 plus a far-off weightless value: the fitted min moves up to the cluster, and the next
    # steps' iscale * (x - min) for the outlier is ~1e8 (nearest_int and rint differ there)
    outlier = (np.float32(-1) + normal * np.float32(1e-3)).astype(np.float32)
    outlier[0] = np.float32(-1e4)
    outlier_w = w.copy()
    outlier_w[0] = 0
    with np.errstate(over="ignore"):
        overflow = normal * np.float32(2e38)           # max - min overflows: iscale 0, inf * 0
    mixed = normal.copy()
    mixed[:, ::2] *= np.float32(1e30)
    mixed[:, 1::4] *= np.float32(1e-30)
    subnormal = normal * np.float32(1e-41)
    non_finite = normal.copy()
    non_finite[3, ::5] = np.nan
    non_finite[7, 1::5] = np.inf
    non_finite[:, 2::5] = np.nan                       # all-NaN sub-blocks
    zero_w = w.copy()
    zero_w[:, ::2] = 0
    cases = [("normal", normal, w), ("flat", flat, w), ("tiny_range", tiny_range, w), ("outlier", outlier, outlier_w),
             ("overflow", overflow, w),
             ("mixed", mixed, w), ("subnormal", subnormal, w), ("non_finite", non_finite, w),
             ("ties", np.round(normal * 4) / np.float32(4), w), ("zero_weights", normal, zero_w),
             ("all_positive", np.abs(normal) + np.float32(1), w)]
    return [(name, np.ascontiguousarray(a, dtype=np.float32), np.ascontiguousarray(b, dtype=np.float32))
            for name, a, b in cases]


@pytest.mark.parametrize("fit", [(3, -0.5, 0.1, 15, True), (15, -1.0, 0.1, 20, False), (31, -0.5, 0.1, 15, False),
                                 (15, -0.9, 0.05, 36, False)], ids=["q2_k", "q4_k", "q5_k", "weighted"])
def test_fit_scale_min_fast_path_is_bitwise_the_generic_one(fit, monkeypatch):
    """NumpyOps.fit_scale_min (rint steps where safe, slabs) vs the generic loop: scale, the_min and L bit for
    bit; small slabs so that one call has slabs of both kinds of steps."""
    nmax, rmin, rdelta, nstep, use_mad = fit
    monkeypatch.setattr(NumpyOps, "FIT_SLAB", 32 * 128)
    for name, x, w in scale_min_cases():
        with np.errstate(all="ignore"):
            fast = kquants._fit_scale_min(NumpyOps(), x, w, nmax, rmin, rdelta, nstep, use_mad)
            generic = kquants._fit_scale_min(GenericOps(), x, w, nmax, rmin, rdelta, nstep, use_mad)
        for a, b in zip(fast, generic):
            assert a.dtype == b.dtype and np.array_equal(a.view(np.int32), b.view(np.int32)), name


def test_fit_scale_min_takes_both_kinds_of_steps(monkeypatch):
    """Guard for the test above: its cases reach the exact nearest_int steps as well as the rint ones."""
    calls = []
    real = NumpyOps.nearest_int

    def counting(self, f):
        calls.append(f.shape)
        return real(self, f)

    monkeypatch.setattr(NumpyOps, "nearest_int", counting)
    cases = dict((name, (x, w)) for name, x, w in scale_min_cases())
    for name, expect_exact in (("normal", False), ("flat", False), ("outlier", True), ("overflow", True),
                               ("non_finite", True)):
        calls.clear()
        x, w = cases[name]
        with np.errstate(all="ignore"):
            NumpyOps().fit_scale_min(x, w, 15, -1.0, 0.1, 20, False)
        assert (len(calls) > 1) == expect_exact, name      # (one call: the final levels)


def test_qp_refine_matches_the_generic_passes():
    """make_qp_quants' refinement in rounds (NumpyOps.qp_refine) vs the generic 5 passes, bitwise, on scale-like
    inputs of both signs (levels stored & 0xFF), ties, NaN, zero weights; some columns still accept in the
    fifth pass (where C stops), which the guard at the end checks."""
    rng = np.random.default_rng(1)
    late = 0

    class Counting(GenericOps):
        def any(self, a):
            self.log.append(a.copy())
            return bool(a.any())

    for trial in range(48):
        n, nmax = (8, 63) if trial % 2 else (16, 15)
        kind = trial % 6
        if kind == 0:
            x = rng.random((n, 300)).astype(np.float32)
        elif kind == 1:
            x = rng.integers(0, 5, (n, 300)).astype(np.float32) * np.float32(0.37)
        elif kind == 2:
            x = (rng.standard_normal((n, 300)) * 2).astype(np.float32)
        elif kind == 3:
            x = np.exp(rng.standard_normal((n, 300)) * 3).astype(np.float32)
        elif kind == 4:
            x = rng.random((n, 300)).astype(np.float32)
            x[rng.random((n, 300)) < 0.1] = np.nan
            x[rng.random((n, 300)) < 0.05] = 0
        else:
            x = (rng.random((n, 300)) * np.float32(1e-20)).astype(np.float32)
        w = (rng.random((n, 300)) * np.float32(10.0 ** rng.uniform(-3, 3))).astype(np.float32)
        if trial % 4 == 3:
            w[rng.random((n, 300)) < 0.3] = 0
        counting = Counting()
        counting.log = []
        with np.errstate(all="ignore"):
            fast = kquants._fit_qp(NumpyOps(), x, w, nmax)
            generic = kquants._fit_qp(counting, x, w, nmax)
        assert np.array_equal(fast[0].view(np.int32), generic[0].view(np.int32)), trial
        assert np.array_equal(fast[1], generic[1]), trial
        late += int(np.any(counting.log[4 * n:5 * n], axis=0).sum()) if len(counting.log) > 4 * n else 0
    assert late > 0


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
def test_one_block_calls_sum_sequentially(weighted):
    """Calls on a single super-block (a chunk's or a task's remainder): numpy sums a (n, 1) array pairwise, not
    row after row, so every one-column sum (the block's sum of x*x, the super-block scale fits over 8 or 16
    sub-blocks, a Q3_K slab's lone negative-max sub-block) must take the sequential path. Before the fix 32 of
    these 400 blocks differed from ggml with an importance matrix."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((1, 256 * 200)) * np.exp(rng.standard_normal((1, 256 * 200)))).astype(np.float32)
    lone = np.abs(x.reshape(-1, 16, 16))                  # 15 positive-max sub-blocks and one negative per block
    lone[:, 5] *= -1
    x = np.concatenate([x, lone.reshape(1, -1)], axis=1)
    imp = (rng.random(x.shape[1]) * 3).astype(np.float32) if weighted else None
    blocks = x.reshape(-1, 256)
    qw = None if imp is None else np.ascontiguousarray(kquants._block_weights(imp, x.shape))
    for qtype in K_TYPES:
        expected = ggml_quantize(x, qtype, imp).reshape(blocks.shape[0], -1)
        with np.errstate(all="ignore"):                   # (quantize_k's callers set this too)
            got = np.concatenate([quantize_blocks(NumpyOps(), qtype, blocks[i:i + 1],
                                                  None if qw is None else qw[i:i + 1]) for i in range(blocks.shape[0])])
        assert np.array_equal(got, expected), (qtype.name, np.flatnonzero((got != expected).any(axis=1)))
