"""The gated MLP activation with the low-rank LoRA terms fused in, for the fused LoRA MLP (``fast_lora.py``).

Forward: ``e += xa_e @ B_e.T``, ``g += xa_g @ B_u.T`` (LoRA of gate and up, rank r), then ``h = act(e) * g``;
one pass over e and g instead of two in-place ``addmm_`` (each reads and writes the whole (tokens, ffn)
tensor) and then the activation. Backward: ``dh += dyb_d @ A_d`` (down's LoRA term of the input gradient),
then ``de, dg``, written over e and g. The rank-r products are ``tl.dot`` tiles; every sum is rounded to the
storage dtype where the unfused ``addmm_`` rounds it, so results match the unfused path within one rounding.
"""

from __future__ import annotations

import os

import torch

from llmforge.kernels._backend import interpreting, next_power_of_2, triton_importable, use_triton

MIN_RANK, MAX_RANK = 1, 128   # tl.dot tiles pad the rank to a power of two >= 16
BLOCK_M, BLOCK_N = 64, 128
# A/B switch (benchmarks): LLMFORGE_LORA_GATED=0 keeps the unfused addmm_ + activation path
ENABLED = {"value": os.environ.get("LLMFORGE_LORA_GATED", "1") != "0"}

if triton_importable():
    import triton
    import triton.language as tl

    from llmforge.kernels.activations import _act_and_grad

    @triton.jit
    def _low_rank_tile(L, l_stride, R_, r_stride, rows, cols, rank, TRANSPOSED: tl.constexpr, BR: tl.constexpr,
                       UPCAST: tl.constexpr):
        """fp32 tile ``L[rows, :rank] @ R_[cols, :rank].T`` (``TRANSPOSED``: ``R_[:rank, cols]``). ``UPCAST``:
        fp32 operands (the interpreter's 16-bit ``tl.dot`` returns garbage); exact either way, as products of
        16-bit floats are exact in fp32."""
        k = tl.arange(0, BR)
        left = tl.load(L + rows[:, None] * l_stride + k[None, :], mask=k[None, :] < rank, other=0.0)
        if TRANSPOSED:
            right = tl.load(R_ + k[:, None] * r_stride + cols[None, :], mask=k[:, None] < rank, other=0.0)
        else:
            right = tl.trans(tl.load(R_ + cols[:, None] * r_stride + k[None, :], mask=k[None, :] < rank, other=0.0))
        if UPCAST:
            left, right = left.to(tl.float32), right.to(tl.float32)
        return tl.dot(left, right, input_precision="ieee")

    @triton.jit
    def _tile(M, N, BM: tl.constexpr, BN: tl.constexpr):
        """This program's (BM, BN) tile of an (M, N) row-major tensor: row and column indices clamped into
        bounds (for loads of the rank-r factors), the element mask and the element offsets."""
        rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        return tl.minimum(rows, M - 1), tl.minimum(cols, N - 1), mask, rows[:, None] * N + cols[None, :]

    @triton.jit
    def _plus_low_rank(X, idx, mask, L, l_stride, R_, r_stride, rows_c, cols_c, rank, TRANSPOSED: tl.constexpr,
                       BR: tl.constexpr, UPCAST: tl.constexpr):
        """fp32 tile of ``X`` plus its rank-r term ``L @ R_.T`` (see ``_low_rank_tile``)."""
        x = tl.load(X + idx, mask=mask, other=0.0).to(tl.float32)
        return x + _low_rank_tile(L, l_stride, R_, r_stride, rows_c, cols_c, rank, TRANSPOSED, BR, UPCAST)

    @triton.jit
    def _lora_gated_fwd(E, G, H, XA, xa_stride, BE, BG, b_stride, M, N, rank,
                        KIND: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
                        UPCAST: tl.constexpr):
        rows_c, cols_c, mask, idx = _tile(M, N, BM, BN)
        dtype = H.dtype.element_ty
        e = _plus_low_rank(E, idx, mask, XA, xa_stride, BE, b_stride, rows_c, cols_c, rank, False, BR, UPCAST)
        g = _plus_low_rank(G, idx, mask, XA + rank, xa_stride, BG, b_stride, rows_c, cols_c, rank, False, BR, UPCAST)
        e, g = e.to(dtype), g.to(dtype)         # addmm_ rounds the sums to the storage dtype
        tl.store(E + idx, e, mask=mask)
        tl.store(G + idx, g, mask=mask)
        a, _ = _act_and_grad(e.to(tl.float32), KIND)
        a = a.to(dtype).to(tl.float32)          # the activation is rounded first, as in the unfused module
        tl.store(H + idx, (a * g.to(tl.float32)).to(dtype), mask=mask)

    @triton.jit
    def _lora_gated_bwd(DH, DYB, dyb_stride, AD, a_stride, E, G, M, N, rank,
                        KIND: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
                        UPCAST: tl.constexpr):
        rows_c, cols_c, mask, idx = _tile(M, N, BM, BN)
        dtype = E.dtype.element_ty
        dh = _plus_low_rank(DH, idx, mask, DYB, dyb_stride, AD, a_stride, rows_c, cols_c, rank, True, BR, UPCAST)
        dh = dh.to(dtype).to(tl.float32)        # addmm_ rounds dh to the storage dtype
        e = tl.load(E + idx, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + idx, mask=mask, other=0.0).to(tl.float32)
        a, da = _act_and_grad(e, KIND)
        tl.store(E + idx, (dh * g * da).to(dtype), mask=mask)
        tl.store(G + idx, (dh * a).to(dtype), mask=mask)


def fusable(e: torch.Tensor, g: torch.Tensor, rank: int, *low_rank: torch.Tensor) -> bool:
    """Whether the fused kernels take these operands: same-shape contiguous e and g, a LoRA rank in range,
    rank-r factors of e's dtype with unit column stride, and the Triton path available."""
    return (ENABLED["value"] and use_triton(e, g, *low_rank) and e.dim() == 2 and e.shape == g.shape
            and e.dtype == g.dtype and e.is_contiguous() and g.is_contiguous() and e.numel() > 0
            and MIN_RANK <= rank <= MAX_RANK and all(t.dtype == e.dtype and t.stride(-1) == 1 for t in low_rank))


def _grid(m: int, n: int) -> tuple[int, int]:
    return triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N)


def _meta(rank: int) -> dict:
    return dict(BM=BLOCK_M, BN=BLOCK_N, BR=max(16, next_power_of_2(rank)), UPCAST=interpreting(), num_warps=8)


def lora_gated_forward(e: torch.Tensor, g: torch.Tensor, xa: torch.Tensor, b_gate: torch.Tensor,
                       b_up: torch.Tensor, kind: int) -> torch.Tensor:
    """``h = act(e + xa[:, :r] @ b_gate.T) * (g + xa[:, r:2r] @ b_up.T)``; e and g are updated in place (the
    backward needs them). ``xa`` (M, 2r) with unit column stride, ``b_gate``/``b_up`` (N, r) contiguous."""
    m, n = e.shape
    rank = b_gate.shape[1]
    h = torch.empty_like(e)
    _lora_gated_fwd[_grid(m, n)](e, g, h, xa, xa.stride(0), b_gate, b_up, b_gate.stride(0), m, n, rank,
                                 KIND=kind, **_meta(rank))
    return h


def lora_gated_backward(dh: torch.Tensor, dyb: torch.Tensor, a_down: torch.Tensor, e: torch.Tensor,
                        g: torch.Tensor, kind: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``dh + dyb @ a_down`` (down's LoRA term), then (de, dg) written over e and g (returned). ``dh`` (M, N)
    contiguous, ``dyb`` (M, r) with unit column stride, ``a_down`` (r, N) contiguous."""
    m, n = e.shape
    rank = dyb.shape[1]
    _lora_gated_bwd[_grid(m, n)](dh.contiguous(), dyb, dyb.stride(0), a_down, a_down.stride(0), e, g, m, n, rank,
                                 KIND=kind, **_meta(rank))
    return e, g
