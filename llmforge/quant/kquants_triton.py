"""Fused Triton kernels for the K-quants (Q2_K..Q6_K), byte-identical to :mod:`llmforge.quant.kquants`.

One kernel per type, each with and without importance weights. A program owns ``BLOCK`` super-blocks and
runs llama.cpp's reference algorithm for them in three phases: the sub-block fits with one lane per
(sub-block, super-block), then the super-block scales with one lane per super-block, then the second
quantization pass and the byte packing. Every sum over the 16/32 positions of a sub-block (or the 8/16
sub-blocks of a super-block) is a sequential left-to-right loop, the positions loaded one by one, never
a tree reduction. What keeps the bytes exact on a GPU (shared/docs/gguf-and-kquants.md, sections 4-5):

- launched with ``enable_fp_fusion=False``: no multiply-add contraction (ptxas ``--fmad=false`` too);
- every division is ``tl.math.div_rn`` and every square root ``tl.math.sqrt_rn`` (IEEE, correctly
  rounded; Triton's plain ``/`` on float32 is the approximate ``div.full``);
- ``nearest_int`` is llama.cpp's magic-number trick with the add as its own rounded op; NaN maps to 0 as
  on x86 (where every NaN the C code can make is the default NaN, whose trick result is 0);
- one float32 rounding per C operator in C's order, strict comparisons, first strictly greater wins.

Input and scratch are position-major (``[position, super-block]``) so that lane loads are coalesced;
the output is written position-major too (``[byte, super-block]``) and transposed by the host.
Per-sub-block values (scales, mins, the fit's step) go through a small global scratch written and read
back by the same lane.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as T

from .kquants import BLOCK_BYTES, QK_K, _check

# rows of the float scratch ``fs`` ([rows, NB]); each holds up to 16 per-sub-block values
_R_SCALE, _R_MIN, _R_ISC, _R_MN, _R_SW, _R_D, _R_DM, _R_AZ = (tl.constexpr(16 * k) for k in range(8))
_FS_ROWS = 128
_IS_ROWS = 32           # int scratch: sub-scale levels (0..15) and min levels (16..31)


# ----------------------------------------------------------------------------- small helpers


@triton.jit
def _ld(p, row, NB, offs, mask):
    return tl.load(p + row * NB + offs, mask=mask, other=0.0)


@triton.jit
def _st(p, row, NB, offs, mask, v):
    tl.store(p + row * NB + offs, v, mask=mask)


@triton.jit
def _div(a, b):
    """IEEE float32 division (both operands tensors)."""
    a, b = tl.broadcast(a, b)
    return tl.math.div_rn(a, b)


@triton.jit
def _nearest_int(f):
    """llama.cpp's nearest_int: bits of (f + 1.5*2^23), mantissa minus 2^22 (NaN -> 0, as x86 gets it)."""
    v = f + 12582912.0
    i = v.to(tl.int32, bitcast=True)
    return tl.where(f != f, 0, (i & 0x7FFFFF) - 0x400000)


@triton.jit
def _clamp(i, lo: tl.constexpr, hi: tl.constexpr):
    return tl.minimum(tl.maximum(i, lo), hi)


@triton.jit
def _fp16(a):
    """(fp16 bits as int32, the fp16 value as float32): round to nearest even."""
    h = a.to(tl.float16)
    return h.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF, h.to(tl.float32)


@triton.jit
def _st_u8(out, row, NB, offs, mask, v):
    tl.store(out + row * NB + offs, (v & 0xFF).to(tl.uint8), mask=mask)


@triton.jit
def _st_fp16(out, row, NB, offs, mask, bits):
    _st_u8(out, row, NB, offs, mask, bits & 0xFF)
    _st_u8(out, row + 1, NB, offs, mask, bits >> 8)


@triton.jit
def _imp_base(blk0, offs, BPR, BPE, COLS):
    """Offset of a super-block's 256 importance values: expert (b // BPE), column block (b % BPR)."""
    b = blk0 + offs
    return (b // BPE) * COLS + (b % BPR) * 256


@triton.jit
def _sum_x2(xt, NB, offs, mask):
    acc = tl.zeros(offs.shape, tl.float32)
    for p in range(256):
        x = _ld(xt, p, NB, offs, mask)
        acc = acc + x * x
    return acc


@triton.jit
def _weights_sigma(xt, wt, imp, ibase, sigma2, row0, N: tl.constexpr, NB, offs, mask):
    """w = qw * sqrtf(sigma2 + x*x) for the N positions from ``row0`` (per lane), into ``wt``."""
    for i in range(N):
        x = _ld(xt, row0 + i, NB, offs, mask)
        q = tl.load(imp + ibase + row0 + i, mask=mask, other=0.0)
        _st(wt, row0 + i, NB, offs, mask, q * tl.math.sqrt_rn(sigma2 + x * x))


@triton.jit
def _sub_lanes(offs, NSUB: tl.constexpr, NB):
    """Lanes for the per-sub-block phase: (sub-block index [NSUB, 1], super-block [NSUB, BLOCK], mask)."""
    jj = tl.arange(0, NSUB)[:, None]
    offs2 = offs[None, :] + jj * 0
    return jj, offs2, offs2 < NB


@triton.jit
def _seq_sum_rows(p, row0, N: tl.constexpr, NB, offs, mask):
    acc = tl.zeros(offs.shape, tl.float32)
    for i in range(N):
        acc = acc + _ld(p, row0 + i, NB, offs, mask)
    return acc


# ----------------------------------------------------------------------------- make_qkx2/3_quants


@triton.jit
def _ld_w(xt, wt, row, NB, offs, mask, W_ABS: tl.constexpr):
    x = _ld(xt, row, NB, offs, mask)
    if W_ABS:
        w = tl.abs(x)
    else:
        w = _ld(wt, row, NB, offs, mask)
    return x, w


@triton.jit
def _affine_error(xt, wt, row0, NB, offs, mask, iscale, mn, scale, the_min,
                  N: tl.constexpr, NMAX: tl.constexpr, USE_MAD: tl.constexpr, W_ABS: tl.constexpr):
    err = tl.zeros(offs.shape, tl.float32)
    for i in range(N):
        x, w = _ld_w(xt, wt, row0 + i, NB, offs, mask, W_ABS)
        lf = _clamp(_nearest_int(iscale * (x - mn)), 0, NMAX).to(tl.float32)
        diff = scale * lf
        diff = diff + the_min
        diff = diff - x
        if USE_MAD:
            diff = tl.abs(diff)
        else:
            diff = diff * diff
        err = err + diff * w
    return err


@triton.jit
def _fit_affine(xt, wt, row0, NB, offs, mask, N: tl.constexpr, NMAX: tl.constexpr, RMIN: tl.constexpr,
                RDELTA: tl.constexpr, NSTEP: tl.constexpr, USE_MAD: tl.constexpr, W_ABS: tl.constexpr):
    """make_qkx2_quants / make_qkx3_quants: (scale, the_min, iscale and min that give the levels)."""
    zero = tl.zeros(offs.shape, tl.float32)
    x0, w0 = _ld_w(xt, wt, row0, NB, offs, mask, W_ABS)
    mn = x0
    mx = x0
    sum_w = w0
    sum_x = sum_w * x0
    for i in range(1, N):
        x, w = _ld_w(xt, wt, row0 + i, NB, offs, mask, W_ABS)
        mn = tl.where(x < mn, x, mn)
        mx = tl.where(x > mx, x, mx)
        sum_w = sum_w + w
        sum_x = sum_x + w * x
    mn = tl.where(mn > 0.0, 0.0, mn)
    flat = mx == mn
    iscale = _div(zero + NMAX, mx - mn)
    scale = _div(zero + 1.0, iscale)
    best = _affine_error(xt, wt, row0, NB, offs, mask, iscale, mn, scale, mn, N, NMAX, USE_MAD, W_ABS)
    best_iscale = iscale
    best_mn = mn
    for step in range(NSTEP + 1):
        factor = RMIN + RDELTA * (zero + step)       # C: rmin + rdelta*is + nmax, each op rounded
        factor = factor + NMAX
        iscale = _div(zero + factor, mx - mn)
        sum_l = zero
        sum_l2 = zero
        sum_xl = zero
        for i in range(N):
            x, w = _ld_w(xt, wt, row0 + i, NB, offs, mask, W_ABS)
            lf = _clamp(_nearest_int(iscale * (x - mn)), 0, NMAX).to(tl.float32)
            wl = w * lf
            sum_l = sum_l + wl
            sum_l2 = sum_l2 + wl * lf
            sum_xl = sum_xl + wl * x
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = _div(sum_w * sum_xl - sum_x * sum_l, D)
        this_min = _div(sum_l2 * sum_x - sum_l * sum_xl, D)
        clamp = this_min > 0.0
        this_min = tl.where(clamp, 0.0, this_min)
        this_scale = tl.where(clamp, _div(sum_xl, sum_l2), this_scale)
        cur = _affine_error(xt, wt, row0, NB, offs, mask, iscale, mn, this_scale, this_min,
                            N, NMAX, USE_MAD, W_ABS)
        better = (D > 0.0) & (cur < best) & (~flat)
        best_iscale = tl.where(better, iscale, best_iscale)
        best_mn = tl.where(better, mn, best_mn)
        best = tl.where(better, cur, best)
        scale = tl.where(better, this_scale, scale)
        mn = tl.where(better, this_min, mn)
    # flat sub-blocks: levels 0 (a zero iscale gives them: x - min is 0 there)
    best_iscale = tl.where(flat, 0.0, best_iscale)
    scale = tl.where(flat, 0.0, scale)
    return scale, -mn, best_iscale, best_mn


@triton.jit
def _affine_level(x, d, dm, isc, mn, NMAX: tl.constexpr):
    """Second pass of Q2_K/Q4_K/Q5_K: clamp(nearest_int((x+dm)/d)), or the fit's level where d == 0."""
    fit = _clamp(_nearest_int(isc * (x - mn)), 0, NMAX)
    q = _clamp(_nearest_int(_div(x + dm, d)), 0, NMAX)
    return tl.where(d == 0.0, fit, q)


# ----------------------------------------------------------------------------- make_qx_quants


@triton.jit
def _sym_sums(xt, wt, row0, NB, offs, mask, iscale, N: tl.constexpr, NMAX: tl.constexpr,
              WEIGHTED: tl.constexpr):
    sumlx = tl.zeros(offs.shape, tl.float32)
    suml2 = tl.zeros(offs.shape, tl.float32)
    for i in range(N):
        x = _ld(xt, row0 + i, NB, offs, mask)
        if WEIGHTED:
            w = _ld(wt, row0 + i, NB, offs, mask)
        else:
            w = x * x
        lf = _clamp(_nearest_int(iscale * x), -NMAX, NMAX - 1).to(tl.float32)
        sumlx = sumlx + (w * x) * lf
        suml2 = suml2 + (w * lf) * lf
    return sumlx, suml2


@triton.jit
def _signed_max(xt, row0, N: tl.constexpr, NB, offs, mask):
    """(max |x|, the signed x that first had it), starting from +0 with strict >."""
    amax = tl.zeros(offs.shape, tl.float32)
    vmax = tl.zeros(offs.shape, tl.float32)
    for i in range(N):
        x = _ld(xt, row0 + i, NB, offs, mask)
        ax = tl.abs(x)
        take = ax > amax
        amax = tl.where(take, ax, amax)
        vmax = tl.where(take, x, vmax)
    return amax, vmax


@triton.jit
def _fit_sym(xt, wt, row0, NB, offs, mask, N: tl.constexpr, NMAX: tl.constexpr, WEIGHTED: tl.constexpr):
    """make_qx_quants(rmse_type=1): (scale, iscale that gives the levels, all-zero flag)."""
    zero = tl.zeros(offs.shape, tl.float32)
    amax, vmax = _signed_max(xt, row0, N, NB, offs, mask)
    allzero = amax < 1e-15
    best_iscale = _div(zero - NMAX, vmax)
    sumlx, suml2 = _sym_sums(xt, wt, row0, NB, offs, mask, best_iscale, N, NMAX, WEIGHTED)
    scale = tl.where(suml2 != 0.0, _div(sumlx, suml2), 0.0)
    best = scale * sumlx
    for k in range(18):
        step = zero + (k - 9)
        step = tl.where(step >= 0.0, step + 1.0, step)               # -9..9 without 0
        factor = NMAX + 0.1 * step
        iscale = _div(zero - factor, vmax)
        sumlx, suml2 = _sym_sums(xt, wt, row0, NB, offs, mask, iscale, N, NMAX, WEIGHTED)
        take = (suml2 > 0.0) & (sumlx * sumlx > best * suml2)
        new_scale = _div(sumlx, suml2)
        best_iscale = tl.where(take, iscale, best_iscale)
        scale = tl.where(take, new_scale, scale)
        best = tl.where(take, new_scale * sumlx, best)
    return tl.where(allzero, 0.0, scale), best_iscale, allzero


@triton.jit
def _sym_level(isc, az, x, NMAX: tl.constexpr):
    """The level make_qx_quants chose (offset by nmax; 0 for an all-zero sub-block)."""
    return tl.where(az, 0, _clamp(_nearest_int(isc * x), -NMAX, NMAX - 1) + NMAX)


# ----------------------------------------------------------------------------- make_qp_quants


@triton.jit
def _qp_mse(vp, wp, row0, wrow0, NB, offs, mask, iscale, scale, FIRST: tl.constexpr,
            N: tl.constexpr, NMAX: tl.constexpr):
    acc = tl.zeros(offs.shape, tl.float32)
    for i in range(N):
        x = _ld(vp, row0 + i, NB, offs, mask)
        w = _ld(wp, wrow0 + i, NB, offs, mask)
        if FIRST:
            l = _nearest_int(iscale * x) & 0xFF
        else:
            l = tl.minimum(_nearest_int(iscale * x), NMAX)
        diff = x - scale * l.to(tl.float32)
        acc = acc + (w * diff) * diff
    return acc


@triton.jit
def _fit_qp(vp, wp, row0, wrow0, lp, lrow0, NB, offs, mask, N: tl.constexpr, NMAX: tl.constexpr):
    """make_qp_quants over the N values in rows row0.. of ``vp`` (weights in ``wp``): the scale; the
    levels (uint8 values) go to rows lrow0.. of the int scratch ``lp``."""
    zero = tl.zeros(offs.shape, tl.float32)
    mx = zero
    for i in range(N):
        x = _ld(vp, row0 + i, NB, offs, mask)
        mx = tl.where(mx > x, mx, x)
    allzero = mx < 1e-15
    iscale = _div(zero + NMAX, mx)
    best = _qp_mse(vp, wp, row0, wrow0, NB, offs, mask, iscale, _div(zero + 1.0, iscale), True, N, NMAX)
    for k in range(8):
        step = zero + (k - 4)
        step = tl.where(step >= 0.0, step + 1.0, step)               # -4..4 without 0
        factor = 0.1 * step
        factor = factor + NMAX
        iscale_is = _div(zero + factor, mx)
        cur = _qp_mse(vp, wp, row0, wrow0, NB, offs, mask, iscale_is, _div(zero + 1.0, iscale_is), False,
                      N, NMAX)
        take = cur < best
        best = tl.where(take, cur, best)
        iscale = tl.where(take, iscale_is, iscale)
    sumlx = zero
    suml2 = zero
    for i in range(N):
        x = _ld(vp, row0 + i, NB, offs, mask)
        w = _ld(wp, wrow0 + i, NB, offs, mask)
        l = tl.minimum(_nearest_int(iscale * x), NMAX)
        lf = l.to(tl.float32)
        sumlx = sumlx + (w * x) * lf
        suml2 = suml2 + (w * lf) * lf
        _st(lp, lrow0 + i, NB, offs, mask, l & 0xFF)
    for _it in range(5):
        for i in range(N):
            x = _ld(vp, row0 + i, NB, offs, mask)
            w = _ld(wp, wrow0 + i, NB, offs, mask)
            li = tl.load(lp + (lrow0 + i) * NB + offs, mask=mask, other=0)
            lf = li.to(tl.float32)
            wx = w * x
            slx = sumlx - wx * lf
            sl2 = suml2 - (w * lf) * lf
            new_l = tl.minimum(_nearest_int(_div(x * sl2, slx)), NMAX)
            nl = new_l.to(tl.float32)
            slx_new = slx + wx * nl
            sl2_new = sl2 + (w * nl) * nl
            accept = ((slx > 0.0) & (sl2 > 0.0) & (new_l != li)
                      & ((slx_new * slx_new) * suml2 > (sumlx * sumlx) * sl2_new) & (~allzero))
            _st(lp, lrow0 + i, NB, offs, mask, tl.where(accept, new_l & 0xFF, li))
            sumlx = tl.where(accept, slx_new, sumlx)
            suml2 = tl.where(accept, sl2_new, suml2)
    for i in range(N):      # all-zero inputs: levels 0
        li = tl.load(lp + (lrow0 + i) * NB + offs, mask=mask, other=0)
        _st(lp, lrow0 + i, NB, offs, mask, tl.where(allzero, 0, li))
    scale = tl.where(suml2 > 0.0, _div(sumlx, suml2), 0.0)
    return tl.where(allzero, 0.0, scale)


# ----------------------------------------------------------------------------- Q4_K / Q5_K


@triton.jit
def _k4_kernel(xt, wt, imp, fs, si, out, NB, blk0, BPR, BPE, COLS,
               NMAX: tl.constexpr, RMIN: tl.constexpr, RDELTA: tl.constexpr, NSTEP: tl.constexpr,
               WEIGHTED: tl.constexpr, CLAMP_W: tl.constexpr, Q5: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NB
    zero = tl.zeros([BLOCK], tl.float32)
    # per-sub-block phase: one lane per (sub-block, super-block)
    jj, offs2, mask2 = _sub_lanes(offs, 8, NB)
    zero2 = tl.zeros(offs2.shape, tl.float32)
    if WEIGHTED:
        sigma2 = _div(2.0 * _sum_x2(xt, NB, offs2, mask2), zero2 + 256.0)
        _weights_sigma(xt, wt, imp, _imp_base(blk0, offs2, BPR, BPE, COLS), sigma2, jj * 32, 32, NB, offs2, mask2)
    else:
        s = zero2
        for i in range(32):
            x = _ld(xt, jj * 32 + i, NB, offs2, mask2)
            s = s + x * x
        av_x = tl.math.sqrt_rn(_div(s, zero2 + 32.0))
        for i in range(32):
            x = _ld(xt, jj * 32 + i, NB, offs2, mask2)
            _st(wt, jj * 32 + i, NB, offs2, mask2, av_x + tl.abs(x))
    scale, the_min, isc, mn = _fit_affine(xt, wt, jj * 32, NB, offs2, mask2, 32, NMAX, RMIN, RDELTA, NSTEP,
                                          False, False)
    _st(fs, _R_SCALE + jj, NB, offs2, mask2, scale)
    _st(fs, _R_MIN + jj, NB, offs2, mask2, the_min)
    _st(fs, _R_ISC + jj, NB, offs2, mask2, isc)
    _st(fs, _R_MN + jj, NB, offs2, mask2, mn)
    if WEIGHTED:
        _st(fs, _R_SW + jj, NB, offs2, mask2, _seq_sum_rows(wt, jj * 32, 32, NB, offs2, mask2))
    tl.debug_barrier()
    # per-super-block phase: one lane per super-block
    if WEIGHTED:
        d_block = _fit_qp(fs, fs, _R_SCALE, _R_SW, si, 0, NB, offs, mask, 8, 63)
        m_block = _fit_qp(fs, fs, _R_MIN, _R_SW, si, 16, NB, offs, mask, 8, 63)
        d_bits, d_val = _fp16(d_block)
        m_bits, m_val = _fp16(m_block)
    else:
        max_scale = zero
        max_min = zero
        for j in range(8):
            sj = _ld(fs, _R_SCALE + j, NB, offs, mask)
            mj = _ld(fs, _R_MIN + j, NB, offs, mask)
            max_scale = tl.where(sj > max_scale, sj, max_scale)
            max_min = tl.where(mj > max_min, mj, max_min)
        inv_scale = tl.where(max_scale > 0.0, _div(zero + 63.0, max_scale), 0.0)
        inv_min = tl.where(max_min > 0.0, _div(zero + 63.0, max_min), 0.0)
        for j in range(8):
            ls = tl.minimum(_nearest_int(inv_scale * _ld(fs, _R_SCALE + j, NB, offs, mask)) & 0xFF, 63)
            lm = tl.minimum(_nearest_int(inv_min * _ld(fs, _R_MIN + j, NB, offs, mask)) & 0xFF, 63)
            _st(si, j, NB, offs, mask, ls)
            _st(si, 16 + j, NB, offs, mask, lm)
        d_bits, d_val = _fp16(_div(max_scale, zero + 63.0))
        m_bits, m_val = _fp16(_div(max_min, zero + 63.0))
    tl.debug_barrier()
    _st_fp16(out, 0, NB, offs, mask, d_bits)
    _st_fp16(out, 2, NB, offs, mask, m_bits)
    for j in range(4):
        ls_lo = tl.load(si + j * NB + offs, mask=mask, other=0)
        ls_hi = tl.load(si + (j + 4) * NB + offs, mask=mask, other=0)
        lm_lo = tl.load(si + (16 + j) * NB + offs, mask=mask, other=0)
        lm_hi = tl.load(si + (16 + j + 4) * NB + offs, mask=mask, other=0)
        if WEIGHTED and CLAMP_W:   # quantize_row_q5_K_impl clamps to 63, q4_K_impl does not
            ls_lo = tl.minimum(ls_lo, 63)
            ls_hi = tl.minimum(ls_hi, 63)
            lm_lo = tl.minimum(lm_lo, 63)
            lm_hi = tl.minimum(lm_hi, 63)
        b_s = ((ls_lo & 0xFF) | ((ls_hi >> 4) << 6)) & 0xFF
        b_m = ((lm_lo & 0xFF) | ((lm_hi >> 4) << 6)) & 0xFF
        b_h = ((ls_hi & 0xF) | ((lm_hi & 0xF) << 4)) & 0xFF
        _st_u8(out, 4 + j, NB, offs, mask, b_s)
        _st_u8(out, 8 + j, NB, offs, mask, b_m)
        _st_u8(out, 12 + j, NB, offs, mask, b_h)
        # get_scale_min_k4 on the bytes just packed
        _st(fs, _R_D + j, NB, offs, mask, d_val * (b_s & 63).to(tl.float32))
        _st(fs, _R_DM + j, NB, offs, mask, m_val * (b_m & 63).to(tl.float32))
        _st(fs, _R_D + j + 4, NB, offs, mask, d_val * ((b_h & 0xF) | ((b_s >> 6) << 4)).to(tl.float32))
        _st(fs, _R_DM + j + 4, NB, offs, mask, m_val * ((b_h >> 4) | ((b_m >> 6) << 4)).to(tl.float32))
    tl.debug_barrier()
    QS: tl.constexpr = 48 if Q5 else 16
    for c in tl.static_range(4):
        d0 = _ld(fs, _R_D + 2 * c, NB, offs, mask)
        dm0 = _ld(fs, _R_DM + 2 * c, NB, offs, mask)
        isc0 = _ld(fs, _R_ISC + 2 * c, NB, offs, mask)
        mn0 = _ld(fs, _R_MN + 2 * c, NB, offs, mask)
        d1 = _ld(fs, _R_D + 2 * c + 1, NB, offs, mask)
        dm1 = _ld(fs, _R_DM + 2 * c + 1, NB, offs, mask)
        isc1 = _ld(fs, _R_ISC + 2 * c + 1, NB, offs, mask)
        mn1 = _ld(fs, _R_MN + 2 * c + 1, NB, offs, mask)
        for l in range(32):
            L0 = _affine_level(_ld(xt, 64 * c + l, NB, offs, mask), d0, dm0, isc0, mn0, NMAX)
            L1 = _affine_level(_ld(xt, 64 * c + 32 + l, NB, offs, mask), d1, dm1, isc1, mn1, NMAX)
            _st_u8(out, QS + 32 * c + l, NB, offs, mask, (L0 & 0xF) | ((L1 & 0xF) << 4))
            if Q5:
                hb = (((L0 >> 4) & 1) << (2 * c)) | (((L1 >> 4) & 1) << (2 * c + 1))
                if c > 0:
                    hb = hb | tl.load(out + (16 + l) * NB + offs, mask=mask, other=0).to(tl.int32)
                _st_u8(out, 16 + l, NB, offs, mask, hb)


# ----------------------------------------------------------------------------- Q6_K


@triton.jit
def _q6_kernel(xt, wt, imp, fs, out, NB, blk0, BPR, BPE, COLS, WEIGHTED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NB
    zero = tl.zeros([BLOCK], tl.float32)
    jj, offs2, mask2 = _sub_lanes(offs, 16, NB)
    if WEIGHTED:
        ibase = _imp_base(blk0, offs2, BPR, BPE, COLS) + jj * 16
        for i in range(16):
            _st(wt, jj * 16 + i, NB, offs2, mask2, tl.load(imp + ibase + i, mask=mask2, other=0.0))
    scale, isc, az = _fit_sym(xt, wt, jj * 16, NB, offs2, mask2, 16, 32, WEIGHTED)
    _st(fs, _R_SCALE + jj, NB, offs2, mask2, scale)
    _st(fs, _R_ISC + jj, NB, offs2, mask2, isc)
    _st(fs, _R_AZ + jj, NB, offs2, mask2, az.to(tl.float32))
    tl.debug_barrier()
    amax, vmax = _signed_max(fs, _R_SCALE, 16, NB, offs, mask)
    zero_block = amax < 1e-15
    iscale = _div(zero - 128.0, vmax)
    d_bits, d_val = _fp16(_div(zero + 1.0, iscale))
    for j in range(16):
        sc = tl.minimum(_nearest_int(iscale * _ld(fs, _R_SCALE + j, NB, offs, mask)), 127)
        sc = ((sc + 128) & 0xFF) - 128                                    # int8_t
        _st(fs, _R_D + j, NB, offs, mask, d_val * sc.to(tl.float32))
        _st_u8(out, 192 + j, NB, offs, mask, tl.where(zero_block, 0, sc))
    _st_fp16(out, 208, NB, offs, mask, tl.where(zero_block, 0, d_bits))
    tl.debug_barrier()
    for h in tl.static_range(2):
        for l in range(32):
            half = l // 16
            L0 = _q6_level(xt, fs, 128 * h + l, 8 * h + half, NB, offs, mask, zero_block)
            L1 = _q6_level(xt, fs, 128 * h + 32 + l, 8 * h + 2 + half, NB, offs, mask, zero_block)
            L2 = _q6_level(xt, fs, 128 * h + 64 + l, 8 * h + 4 + half, NB, offs, mask, zero_block)
            L3 = _q6_level(xt, fs, 128 * h + 96 + l, 8 * h + 6 + half, NB, offs, mask, zero_block)
            _st_u8(out, 64 * h + l, NB, offs, mask, (L0 & 15) | ((L2 & 15) << 4))
            _st_u8(out, 64 * h + 32 + l, NB, offs, mask, (L1 & 15) | ((L3 & 15) << 4))
            _st_u8(out, 128 + 32 * h + l, NB, offs, mask,
                   (L0 >> 4) | ((L1 >> 4) << 2) | ((L2 >> 4) << 4) | ((L3 >> 4) << 6))


@triton.jit
def _q6_level(xt, fs, p, j, NB, offs, mask, zero_block):
    x = _ld(xt, p, NB, offs, mask)
    d = _ld(fs, _R_D + j, NB, offs, mask)
    fit = _sym_level(_ld(fs, _R_ISC + j, NB, offs, mask), _ld(fs, _R_AZ + j, NB, offs, mask) != 0.0, x, 32)
    q = _clamp(_nearest_int(_div(x, d)), -32, 31) + 32
    return tl.where(zero_block, 0, tl.where(d == 0.0, fit, q))


# ----------------------------------------------------------------------------- Q2_K


@triton.jit
def _q2_kernel(xt, wt, imp, fs, si, out, NB, blk0, BPR, BPE, COLS, WEIGHTED: tl.constexpr,
               BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NB
    zero = tl.zeros([BLOCK], tl.float32)
    jj, offs2, mask2 = _sub_lanes(offs, 16, NB)
    zero2 = tl.zeros(offs2.shape, tl.float32)
    if WEIGHTED:
        sigma2 = _div(_sum_x2(xt, NB, offs2, mask2), zero2 + 256.0)
        _weights_sigma(xt, wt, imp, _imp_base(blk0, offs2, BPR, BPE, COLS), sigma2, jj * 16, 16, NB, offs2, mask2)
        scale, the_min, isc, mn = _fit_affine(xt, wt, jj * 16, NB, offs2, mask2, 16, 3, -0.9, 0.05, 36,
                                              False, False)
        _st(fs, _R_SW + jj, NB, offs2, mask2, _seq_sum_rows(wt, jj * 16, 16, NB, offs2, mask2))
    else:
        scale, the_min, isc, mn = _fit_affine(xt, wt, jj * 16, NB, offs2, mask2, 16, 3, -0.5, 0.1, 15,
                                              True, True)
    _st(fs, _R_SCALE + jj, NB, offs2, mask2, scale)
    _st(fs, _R_MIN + jj, NB, offs2, mask2, the_min)
    _st(fs, _R_ISC + jj, NB, offs2, mask2, isc)
    _st(fs, _R_MN + jj, NB, offs2, mask2, mn)
    tl.debug_barrier()
    if WEIGHTED:
        dm = _fit_qp(fs, fs, _R_SCALE, _R_SW, si, 0, NB, offs, mask, 16, 15)
        mm = _fit_qp(fs, fs, _R_MIN, _R_SW, si, 16, NB, offs, mask, 16, 15)
        d_bits, d_val = _fp16(dm)
        m_bits, m_val = _fp16(mm)
    else:
        max_scale = zero
        max_min = zero
        for j in range(16):
            sj = _ld(fs, _R_SCALE + j, NB, offs, mask)
            mj = _ld(fs, _R_MIN + j, NB, offs, mask)
            max_scale = tl.where(sj > max_scale, sj, max_scale)
            max_min = tl.where(mj > max_min, mj, max_min)
        has_s = max_scale > 0.0
        has_m = max_min > 0.0
        inv_s = _div(zero + 15.0, max_scale)
        inv_m = _div(zero + 15.0, max_min)
        for j in range(16):
            ls = tl.where(has_s, _nearest_int(inv_s * _ld(fs, _R_SCALE + j, NB, offs, mask)), 0)
            lm = tl.where(has_m, _nearest_int(inv_m * _ld(fs, _R_MIN + j, NB, offs, mask)), 0)
            _st(si, j, NB, offs, mask, ls)
            _st(si, 16 + j, NB, offs, mask, lm)
        d_bits, d_val = _fp16(tl.where(has_s, _div(max_scale, zero + 15.0), 0.0))
        m_bits, m_val = _fp16(tl.where(has_m, _div(max_min, zero + 15.0), 0.0))
    tl.debug_barrier()
    for j in range(16):
        ls = tl.load(si + j * NB + offs, mask=mask, other=0)
        lm = tl.load(si + (16 + j) * NB + offs, mask=mask, other=0)
        byte = (ls | (lm << 4)) & 0xFF
        _st_u8(out, j, NB, offs, mask, byte)
        _st(fs, _R_D + j, NB, offs, mask, d_val * (byte & 0xF).to(tl.float32))
        _st(fs, _R_DM + j, NB, offs, mask, m_val * (byte >> 4).to(tl.float32))
    _st_fp16(out, 80, NB, offs, mask, d_bits)
    _st_fp16(out, 82, NB, offs, mask, m_bits)
    tl.debug_barrier()
    for h in tl.static_range(2):
        for l in range(32):
            half = l // 16
            acc = tl.zeros([BLOCK], tl.int32)
            for k in tl.static_range(4):
                j = 8 * h + 2 * k + half
                x = _ld(xt, 128 * h + 32 * k + l, NB, offs, mask)
                L = _affine_level(x, _ld(fs, _R_D + j, NB, offs, mask), _ld(fs, _R_DM + j, NB, offs, mask),
                                  _ld(fs, _R_ISC + j, NB, offs, mask), _ld(fs, _R_MN + j, NB, offs, mask), 3)
                acc = acc | (L << (2 * k))
            _st_u8(out, 16 + 32 * h + l, NB, offs, mask, acc)


# ----------------------------------------------------------------------------- Q3_K


@triton.jit
def _fit_q3(xt, lt, row0, NB, offs, mask):
    """make_q3_quants(16, 4, x, L, do_rmse=true): (scale, all-zero flag); signed levels go to ``lt``."""
    zero = tl.zeros(offs.shape, tl.float32)
    amax, vmax = _signed_max(xt, row0, 16, NB, offs, mask)
    allzero = amax < 1e-15
    iscale = _div(zero - 4.0, vmax)
    sumlx = zero
    suml2 = zero
    for i in range(16):
        x = _ld(xt, row0 + i, NB, offs, mask)
        l = _clamp(_nearest_int(iscale * x), -4, 3)
        _st(lt, row0 + i, NB, offs, mask, l)
        w = x * x
        lf = l.to(tl.float32)
        sumlx = sumlx + (w * x) * lf
        suml2 = suml2 + (w * lf) * lf
    for _it in range(5):
        for i in range(16):
            x = _ld(xt, row0 + i, NB, offs, mask)
            li = tl.load(lt + (row0 + i) * NB + offs, mask=mask, other=0)
            lf = li.to(tl.float32)
            w = x * x
            wx = w * x
            slx = sumlx - wx * lf
            sl2 = suml2 - (w * lf) * lf
            new_l = _clamp(_nearest_int(_div(x * sl2, slx)), -4, 3)
            nl = new_l.to(tl.float32)
            slx_new = slx + wx * nl
            sl2_new = sl2 + (w * nl) * nl
            accept = ((slx > 0.0) & (new_l != li) & (sl2_new > 0.0)
                      & ((slx_new * slx_new) * suml2 > (sumlx * sumlx) * sl2_new) & (~allzero))
            _st(lt, row0 + i, NB, offs, mask, tl.where(accept, new_l, li))
            sumlx = tl.where(accept, slx_new, sumlx)
            suml2 = tl.where(accept, sl2_new, suml2)
    scale = tl.where(suml2 > 0.0, _div(sumlx, suml2), 0.0)
    return tl.where(allzero, 0.0, scale), allzero


@triton.jit
def _q3_kernel(xt, wt, lt, imp, fs, si, out, NB, blk0, BPR, BPE, COLS, WEIGHTED: tl.constexpr,
               BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NB
    zero = tl.zeros([BLOCK], tl.float32)
    jj, offs2, mask2 = _sub_lanes(offs, 16, NB)
    zero2 = tl.zeros(offs2.shape, tl.float32)
    if WEIGHTED:
        sigma2 = _div(2.0 * _sum_x2(xt, NB, offs2, mask2), zero2 + 256.0)
        _weights_sigma(xt, wt, imp, _imp_base(blk0, offs2, BPR, BPE, COLS), sigma2, jj * 16, 16, NB, offs2, mask2)
        scale, isc, az = _fit_sym(xt, wt, jj * 16, NB, offs2, mask2, 16, 4, True)
        _st(fs, _R_SCALE + jj, NB, offs2, mask2, scale)
        _st(fs, _R_ISC + jj, NB, offs2, mask2, isc)
        _st(fs, _R_AZ + jj, NB, offs2, mask2, az.to(tl.float32))
        _st(fs, _R_SW + jj, NB, offs2, mask2, _seq_sum_rows(wt, jj * 16, 16, NB, offs2, mask2))
        tl.debug_barrier()
        # the sub-block scales with weights sw: row _R_SCALE + i of fs, weight row _R_SW + i
        d_block, isc_s, az_s = _fit_sym(fs, fs + (_R_SW - _R_SCALE) * NB, _R_SCALE, NB, offs, mask, 16, 32, True)
        for j in range(16):
            s = _ld(fs, _R_SCALE + j, NB, offs, mask)
            _st(si, j, NB, offs, mask, _sym_level(isc_s, az_s, s, 32))
        d_bits, d_val = _fp16(d_block)
    else:
        scale, az = _fit_q3(xt, lt, jj * 16, NB, offs2, mask2)
        _st(fs, _R_SCALE + jj, NB, offs2, mask2, scale)
        _st(fs, _R_AZ + jj, NB, offs2, mask2, az.to(tl.float32))
        tl.debug_barrier()
        amax, vmax = _signed_max(fs, _R_SCALE, 16, NB, offs, mask)
        has = vmax != 0.0
        iscale = _div(zero - 32.0, vmax)
        for j in range(16):
            lv = _nearest_int(iscale * _ld(fs, _R_SCALE + j, NB, offs, mask))
            lv = ((lv + 128) & 0xFF) - 128                                    # int8_t
            _st(si, j, NB, offs, mask, tl.where(has, _clamp(lv, -32, 31) + 32, 0))
        d_bits, d_val = _fp16(tl.where(has, _div(zero + 1.0, iscale), 0.0))
    tl.debug_barrier()
    for j in range(16):
        lv = tl.load(si + j * NB + offs, mask=mask, other=0)
        _st(fs, _R_D + j, NB, offs, mask, d_val * (lv - 32).to(tl.float32))
    for j in range(8):
        lo = tl.load(si + j * NB + offs, mask=mask, other=0)
        hi = tl.load(si + (j + 8) * NB + offs, mask=mask, other=0)
        _st_u8(out, 96 + j, NB, offs, mask, (lo & 0xF) | ((hi & 0xF) << 4))
    for k4 in range(4):
        acc = tl.zeros([BLOCK], tl.int32)
        for q4 in tl.static_range(4):
            lj = tl.load(si + (k4 + 4 * q4) * NB + offs, mask=mask, other=0)
            acc = acc | ((lj >> 4) << (2 * q4))
        _st_u8(out, 104 + k4, NB, offs, mask, acc)
    _st_fp16(out, 108, NB, offs, mask, d_bits)
    tl.debug_barrier()
    for l in range(32):
        half = l // 16
        hmask = tl.zeros([BLOCK], tl.int32)
        qs0 = tl.zeros([BLOCK], tl.int32)
        qs1 = tl.zeros([BLOCK], tl.int32)
        for k in tl.static_range(8):
            jk = 2 * k + half
            pk = 32 * k + l
            xk = _ld(xt, pk, NB, offs, mask)
            dk = _ld(fs, _R_D + jk, NB, offs, mask)
            azk = _ld(fs, _R_AZ + jk, NB, offs, mask) != 0.0
            if WEIGHTED:
                fit = _sym_level(_ld(fs, _R_ISC + jk, NB, offs, mask), azk, xk, 4)
            else:
                fit = tl.where(azk, 0, tl.load(lt + pk * NB + offs, mask=mask, other=0) + 4)
            lq = _clamp(_nearest_int(_div(xk, dk)), -4, 3) + 4
            L = tl.where(dk == 0.0, fit, lq)
            high = (L > 3).to(tl.int32)
            hmask = hmask | (high << k)
            low = L - (high << 2)
            if k < 4:
                qs0 = qs0 | (low << (2 * k))
            else:
                qs1 = qs1 | (low << (2 * (k - 4)))
        _st_u8(out, l, NB, offs, mask, hmask)
        _st_u8(out, 32 + l, NB, offs, mask, qs0)
        _st_u8(out, 64 + l, NB, offs, mask, qs1)


# ----------------------------------------------------------------------------- Q8_0


@triton.jit
def _q8_0_kernel(x, out, NBLK, BLOCK: tl.constexpr):
    """quantize_row_q8_0_ref for BLOCK blocks of 32: d = amax/127, id = d ? 1/d : 0, roundf(x*id) (half
    away from zero: trunc, then the exact fraction decides), fp16 d then the 32 int8 levels."""
    blk = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = blk < NBLK
    cols = tl.arange(0, 32)
    m2 = mask[:, None]
    v = tl.load(x + blk[:, None] * 32 + cols[None, :], mask=m2, other=0.0)
    amax = tl.max(tl.abs(v), axis=1)
    d = _div(amax, tl.full(amax.shape, 127.0, tl.float32))
    nz = d != 0.0
    inv = _div(tl.full(amax.shape, 1.0, tl.float32), tl.where(nz, d, 1.0))
    p = v * tl.where(nz, inv, 0.0)[:, None]
    t = p.to(tl.int32)                      # toward zero
    frac = p - t.to(tl.float32)             # exact for |p| <= 127
    q = t + (frac >= 0.5).to(tl.int32) - (frac <= -0.5).to(tl.int32)
    q = tl.where(tl.abs(p) < 1e30, q, 0)    # id overflowed (subnormal d): x86 stores int8 0 for inf/NaN
    base = blk * 34
    tl.store(out + base[:, None] + 2 + cols[None, :], (q & 0xFF).to(tl.uint8), mask=m2)
    bits, _dv = _fp16(d)
    tl.store(out + base, (bits & 0xFF).to(tl.uint8), mask=mask)
    tl.store(out + base + 1, (bits >> 8).to(tl.uint8), mask=mask)


_Q8_BLOCK = 128     # blocks of 32 per program


@triton.jit
def _first_value(lo, hi, target, cols):
    """The first of the 32 values (lo = 0..15, hi = 16..31) equal to ``target`` (per block), with its sign
    bits (C's running min/max/argmax with strict comparisons keeps the first one)."""
    i_lo = tl.min(tl.where(lo == target[:, None], cols[None, :], 32), axis=1)
    i_hi = tl.min(tl.where(hi == target[:, None], cols[None, :] + 16, 32), axis=1)
    first = tl.minimum(i_lo, i_hi)
    b_lo = tl.sum(tl.where(cols[None, :] == first[:, None], lo.to(tl.int32, bitcast=True), 0), axis=1)
    b_hi = tl.sum(tl.where(cols[None, :] + 16 == first[:, None], hi.to(tl.int32, bitcast=True), 0), axis=1)
    return (b_lo + b_hi).to(tl.float32, bitcast=True)


@triton.jit
def _trunc_level(f, NMAX: tl.constexpr, CLAMP: tl.constexpr):
    """C's ``(int8_t)f`` / ``(uint8_t)f`` (toward zero; inf and NaN give 0 on x86), then MIN(NMAX, .)."""
    q = tl.where(tl.abs(f) < 1e30, f.to(tl.int32), 0)
    if CLAMP:
        q = tl.minimum(q, NMAX)
    return q & 0xFF


@triton.jit
def _legacy_kernel(x, out, NBLK, NMAX: tl.constexpr, AFFINE: tl.constexpr, FIVE: tl.constexpr,
                   CLAMP: tl.constexpr, BB: tl.constexpr, BLOCK: tl.constexpr):
    """quantize_row_q4_0/q4_1/q5_0/q5_1_ref for BLOCK blocks of 32 (AFFINE: the _1 types with a min; FIVE:
    5-bit levels with the high bits in qh; CLAMP: MIN(NMAX, .), all but Q5_1). Bytes: d (fp16), [m (fp16)],
    [qh (4)], qs (16): qs at BB - 16, qh at BB - 20."""
    blk = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = blk < NBLK
    cols = tl.arange(0, 16)
    m2 = mask[:, None]
    lo = tl.load(x + blk[:, None] * 32 + cols[None, :], mask=m2, other=0.0)
    hi = tl.load(x + blk[:, None] * 32 + 16 + cols[None, :], mask=m2, other=0.0)
    one = tl.full([BLOCK], 1.0, tl.float32)
    if AFFINE:
        mn = _first_value(lo, hi, tl.minimum(tl.min(lo, axis=1), tl.min(hi, axis=1)), cols)
        mx = _first_value(lo, hi, tl.maximum(tl.max(lo, axis=1), tl.max(hi, axis=1)), cols)
        d = _div(mx - mn, one * NMAX)
    else:   # C: the first v with |v| > the running amax, from amax = max = +0
        a_lo, a_hi = tl.abs(lo), tl.abs(hi)
        amax = tl.maximum(tl.max(a_lo, axis=1), tl.max(a_hi, axis=1))
        first = tl.minimum(tl.min(tl.where(a_lo == amax[:, None], cols[None, :], 32), axis=1),
                           tl.min(tl.where(a_hi == amax[:, None], cols[None, :] + 16, 32), axis=1))
        bits = tl.sum(tl.where(cols[None, :] == first[:, None], lo.to(tl.int32, bitcast=True), 0), axis=1) \
            + tl.sum(tl.where(cols[None, :] + 16 == first[:, None], hi.to(tl.int32, bitcast=True), 0), axis=1)
        mx = tl.where(amax > 0.0, bits.to(tl.float32, bitcast=True), 0.0)
        d = _div(mx, one * (-(NMAX + 1) // 2))
    nz = d != 0.0
    inv = tl.where(nz, _div(one, tl.where(nz, d, 1.0)), 0.0)
    if AFFINE:
        f_lo = (lo - mn[:, None]) * inv[:, None] + 0.5
        f_hi = (hi - mn[:, None]) * inv[:, None] + 0.5
    else:
        f_lo = lo * inv[:, None] + (NMAX + 2) / 2
        f_hi = hi * inv[:, None] + (NMAX + 2) / 2
    q_lo = _trunc_level(f_lo, NMAX, CLAMP)
    q_hi = _trunc_level(f_hi, NMAX, CLAMP)
    base = blk * BB
    d_bits, _dv = _fp16(d)
    tl.store(out + base, (d_bits & 0xFF).to(tl.uint8), mask=mask)
    tl.store(out + base + 1, (d_bits >> 8).to(tl.uint8), mask=mask)
    if AFFINE:
        m_bits, _mv = _fp16(mn)
        tl.store(out + base + 2, (m_bits & 0xFF).to(tl.uint8), mask=mask)
        tl.store(out + base + 3, (m_bits >> 8).to(tl.uint8), mask=mask)
    if FIVE:
        qh = tl.sum(((q_lo >> 4) & 1) << cols[None, :], axis=1) \
            | tl.sum(((q_hi >> 4) & 1) << (cols[None, :] + 16), axis=1)
        for k in tl.static_range(4):
            tl.store(out + base + (BB - 20) + k, ((qh >> (8 * k)) & 0xFF).to(tl.uint8), mask=mask)
    qs = (q_lo & 0xF) | ((q_hi & 0xF) << 4)
    tl.store(out + base[:, None] + (BB - 16) + cols[None, :], qs.to(tl.uint8), mask=m2)


# type: (levels max, affine, 5-bit, block bytes)
_LEGACY = {T.Q4_0: (15, False, False, 18), T.Q4_1: (15, True, False, 20), T.Q5_0: (31, False, True, 22),
           T.Q5_1: (31, True, True, 24)}
LEGACY_TYPES_TRITON: tuple[T, ...] = tuple(_LEGACY)


def quantize_legacy_device(x: torch.Tensor, qtype: T) -> torch.Tensor:
    """Q4_0/Q4_1/Q5_0/Q5_1 bytes (ggml's ``quantize_row_*_ref``, no importance) of a float32 tensor whose
    element count is a multiple of 32, as flat uint8 on its device."""
    nmax, affine, five, bb = _LEGACY[qtype]
    flat = x.detach().to(torch.float32).reshape(-1).contiguous()
    if flat.numel() % 32:
        raise ValueError(f"{flat.numel()} values are not a multiple of {qtype.name}'s block of 32")
    nblk = flat.numel() // 32
    out = torch.empty((nblk * bb,), dtype=torch.uint8, device=flat.device)
    if nblk:
        _legacy_kernel[(triton.cdiv(nblk, _Q8_BLOCK),)](flat, out, nblk, NMAX=nmax, AFFINE=affine, FIVE=five,
                                                         CLAMP=not (affine and five), BB=bb, BLOCK=_Q8_BLOCK,
                                                         num_warps=4, enable_fp_fusion=False)
    return out


def quantize_q8_0_device(x: torch.Tensor) -> torch.Tensor:
    """Q8_0 bytes of a contiguous float32 tensor (any device Triton runs on; element count a multiple of
    32), as ``(n / 32 * 34,)`` uint8 on the same device: ggml's ``quantize_row_q8_0_ref`` bytes."""
    flat = x.detach().to(torch.float32).reshape(-1).contiguous()
    if flat.numel() % 32:
        raise ValueError(f"{flat.numel()} values are not a multiple of Q8_0's block of 32")
    nblk = flat.numel() // 32
    out = torch.empty((nblk * 34,), dtype=torch.uint8, device=flat.device)
    if nblk:
        _q8_0_kernel[(triton.cdiv(nblk, _Q8_BLOCK),)](flat, out, nblk, BLOCK=_Q8_BLOCK, num_warps=4,
                                                       enable_fp_fusion=False)
    return out


# ----------------------------------------------------------------------------- host side

_K4_PARAMS = {T.Q4_K: (15, -1.0, 0.1, 20, False, False), T.Q5_K: (31, -0.5, 0.1, 15, True, True)}
# super-blocks per program; measured on an H100 (triton 3.6): Q4_K 32 (48 GB/s; 16: 27, 64: 34), Q6_K 64
# (94 GB/s; 32: 74). LLMFORGE_KQUANT_BLOCK overrides for every type.
_BLOCK = {T.Q2_K: 32, T.Q3_K: 32, T.Q4_K: 32, T.Q5_K: 32, T.Q6_K: 64}
_BLOCK_ENV = os.environ.get("LLMFORGE_KQUANT_BLOCK")
_NSUB = {T.Q2_K: 16, T.Q3_K: 16, T.Q4_K: 8, T.Q5_K: 8, T.Q6_K: 16}
K_TYPES_TRITON: tuple[T, ...] = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)


def _launch_opts(qtype: T, block: int) -> dict:
    """One thread per (sub-block, super-block) lane of the fit phase, at most 8 warps."""
    warps = max(1, min(8, _NSUB[qtype] * block // 32))
    return {"num_warps": warps, "num_stages": 1, "enable_fp_fusion": False}


def quantize_blocks_triton(qtype: T, blocks: torch.Tensor, importance: torch.Tensor | None = None,
                           block0: int = 0, blocks_per_row: int = 1, blocks_per_expert: int = 1,
                           block: int | None = None) -> torch.Tensor:
    """Quantize device-resident (nb, 256) float32 super-blocks into (nb, block_bytes) uint8 on the device.

    ``importance``: the (n_expert * cols,) importance values on the device; super-block ``block0 + b``
    uses the 256 values of column block ``(block0 + b) % blocks_per_row`` of expert
    ``(block0 + b) // blocks_per_expert``.
    """
    if qtype not in K_TYPES_TRITON:
        raise ValueError(f"{qtype.name} is not a K-quant type")
    dev = blocks.device
    nb = int(blocks.shape[0])
    out_t = torch.empty((BLOCK_BYTES[qtype], nb), dtype=torch.uint8, device=dev)
    if nb == 0:
        return out_t.T.contiguous()
    xt = blocks.to(torch.float32).T.contiguous()
    weighted = importance is not None
    imp = importance if weighted else xt        # unused pointer when not weighted
    cols = blocks_per_row * QK_K
    fs = torch.empty((_FS_ROWS, nb), dtype=torch.float32, device=dev)
    si = torch.empty((_IS_ROWS, nb), dtype=torch.int32, device=dev)
    block = block or (int(_BLOCK_ENV) if _BLOCK_ENV else _BLOCK[qtype])
    grid = (triton.cdiv(nb, block),)
    common = (nb, block0, blocks_per_row, blocks_per_expert, cols)
    if qtype in _K4_PARAMS:
        nmax, rmin, rdelta, nstep, clamp_w, q5 = _K4_PARAMS[qtype]
        if weighted:    # quantize_row_q*_K_impl: make_qkx3_quants(..., -0.9f, 0.05f, 36, false)
            rmin, rdelta, nstep = -0.9, 0.05, 36
        wt = torch.empty((QK_K, nb), dtype=torch.float32, device=dev)
        _k4_kernel[grid](xt, wt, imp, fs, si, out_t, *common, NMAX=nmax, RMIN=rmin, RDELTA=rdelta,
                         NSTEP=nstep, WEIGHTED=weighted, CLAMP_W=clamp_w, Q5=q5, BLOCK=block, **_launch_opts(qtype, block))
    elif qtype == T.Q6_K:
        wt = torch.empty((QK_K, nb), dtype=torch.float32, device=dev) if weighted else xt
        _q6_kernel[grid](xt, wt, imp, fs, out_t, *common, WEIGHTED=weighted, BLOCK=block, **_launch_opts(qtype, block))
    elif qtype == T.Q2_K:
        wt = torch.empty((QK_K, nb), dtype=torch.float32, device=dev) if weighted else xt
        _q2_kernel[grid](xt, wt, imp, fs, si, out_t, *common, WEIGHTED=weighted, BLOCK=block, **_launch_opts(qtype, block))
    else:
        wt = torch.empty((QK_K, nb), dtype=torch.float32, device=dev) if weighted else xt
        lt = xt if weighted else torch.empty((QK_K, nb), dtype=torch.int32, device=dev)
        _q3_kernel[grid](xt, wt, lt, imp, fs, si, out_t, *common, WEIGHTED=weighted, BLOCK=block,
                         **_launch_opts(qtype, block))
    return out_t.T.contiguous()


def quantize_k_device(data: torch.Tensor, qtype: T, importance: torch.Tensor | np.ndarray | None = None,
                      chunk_blocks: int = 1 << 20) -> torch.Tensor:
    """Quantize a device-resident float32 tensor (..., cols); returns (..., row_bytes) uint8 on the device.

    ``importance`` (cols,) or (n_expert, cols) for a 3-D tensor, as :func:`llmforge.quant.kquants.quantize_k`.
    """
    cols = int(data.shape[-1])
    if cols % QK_K:
        raise ValueError(f"row length {cols} is not a multiple of {QK_K}")
    x = data.detach().to(torch.float32).reshape(-1, cols)
    blocks = x.reshape(-1, QK_K)
    bpr = cols // QK_K
    imp = None
    bpe = blocks.shape[0] or 1
    if importance is not None:
        imp = torch.as_tensor(np.asarray(importance, dtype=np.float32) if not isinstance(importance, torch.Tensor)
                              else importance, dtype=torch.float32).to(data.device).reshape(-1, cols)
        if imp.shape[-1] != cols:
            raise ValueError(f"importance has {imp.shape[-1]} columns, the tensor {cols}")
        bpe = max(1, blocks.shape[0] // imp.shape[0])
        imp = imp.reshape(-1).contiguous()
    parts = []
    for start in range(0, blocks.shape[0], chunk_blocks):
        stop = min(start + chunk_blocks, blocks.shape[0])
        parts.append(quantize_blocks_triton(qtype, blocks[start:stop], imp, start, bpr, bpe))
    out = torch.cat(parts) if len(parts) != 1 else parts[0]
    return out.reshape(*data.shape[:-1], bpr * BLOCK_BYTES[qtype])


class _Staging:
    """Pinned host slots, device input buffers, a copy stream and events for the two-slot transfer pipeline
    (pinning memory is slow, so one set per device and chunk size is kept for the session)."""

    def __init__(self, dev: torch.device, chunk: int):
        big = max(BLOCK_BYTES.values())
        self.pin_in = [torch.empty((chunk, QK_K), dtype=torch.float32, pin_memory=True) for _ in range(2)]
        self.pin_out = [torch.empty((chunk * big,), dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.dev_in = [torch.empty((chunk, QK_K), dtype=torch.float32, device=dev) for _ in range(2)]
        self.copy_stream = torch.cuda.Stream(dev)
        self.h2d = [torch.cuda.Event() for _ in range(2)]     # slot's input is on the device
        self.done = [torch.cuda.Event() for _ in range(2)]    # slot's kernel and output copy finished


_STAGING: dict[tuple[int, int], _Staging] = {}


def _staging(dev: torch.device, chunk: int) -> _Staging:
    key = (dev.index if dev.index is not None else torch.cuda.current_device(), chunk)
    if key not in _STAGING:
        _STAGING[key] = _Staging(dev, chunk)
    return _STAGING[key]


def _quantize_host_pipelined(blocks: np.ndarray, qtype: T, imp: torch.Tensor | None, bpr: int, bpe: int,
                             dev: torch.device, chunk: int) -> np.ndarray:
    """Host (nb, 256) float32 -> host (nb, block_bytes) bytes, in chunks through two pinned slots: chunk i+1
    is copied into pinned memory (torch's multi-threaded CPU copy) and sent on a side stream while chunk i
    quantizes; only the packed bytes come back."""
    nb, bb = blocks.shape[0], BLOCK_BYTES[qtype]
    st = _staging(dev, chunk)
    out = np.empty((nb, bb), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # read-only inputs (GGUF memmaps) are only read here
        src = torch.from_numpy(blocks)
    comp = torch.cuda.current_stream(dev)
    inflight: list[tuple[int, int] | None] = [None, None]

    def drain(slot: int) -> None:
        s, e = inflight[slot]
        st.done[slot].synchronize()
        out[s:e] = st.pin_out[slot][:(e - s) * bb].numpy().reshape(e - s, bb)
        inflight[slot] = None

    for i, s in enumerate(range(0, nb, chunk)):
        slot = i % 2
        e = min(s + chunk, nb)
        n = e - s
        if inflight[slot] is not None:
            drain(slot)                           # also means the slot's input and device buffer are free
        st.pin_in[slot][:n].copy_(src[s:e])
        with torch.cuda.stream(st.copy_stream):
            st.dev_in[slot][:n].copy_(st.pin_in[slot][:n], non_blocking=True)
            st.h2d[slot].record(st.copy_stream)
        comp.wait_event(st.h2d[slot])
        res = quantize_blocks_triton(qtype, st.dev_in[slot][:n], imp, s, bpr, bpe)
        st.pin_out[slot][:n * bb].view(n, bb).copy_(res, non_blocking=True)
        st.done[slot].record(comp)
        inflight[slot] = (s, e)
    for slot in range(2):
        if inflight[slot] is not None:
            drain(slot)
    return out


HOST_CHUNK_BLOCKS = int(os.environ.get("LLMFORGE_KQUANT_CHUNK", str(1 << 15)))


def quantize_k_triton(data: np.ndarray | torch.Tensor, qtype: T, importance: np.ndarray | None = None,
                      device: str | torch.device = "cuda", chunk_blocks: int | None = None) -> np.ndarray:
    """Same contract and bytes as :func:`llmforge.quant.kquants.quantize_k` (numpy in, numpy out).

    On CUDA the input goes through the pinned two-slot pipeline in chunks of ``chunk_blocks`` super-blocks
    (default ``HOST_CHUNK_BLOCKS``); elsewhere (Triton's interpreter) in plain chunks.
    """
    if isinstance(data, torch.Tensor) and data.device.type != "cpu":     # already on the device: no round trip
        if qtype not in K_TYPES_TRITON:
            raise ValueError(f"{qtype.name} is not a K-quant type")
        return quantize_k_device(data.reshape(1, -1) if data.ndim == 1 else data, qtype, importance).cpu().numpy()
    if isinstance(data, torch.Tensor):
        data = data.detach().to("cpu", torch.float32).numpy()
    data, importance = _check(data, qtype, importance)
    dev = torch.device(device)
    cols = data.shape[-1]
    blocks = data.reshape(-1, QK_K)
    bpr = cols // QK_K
    imp = None
    bpe = blocks.shape[0] or 1
    if importance is not None:
        imp2 = importance.reshape(-1, cols)
        bpe = max(1, blocks.shape[0] // imp2.shape[0])
        imp = torch.from_numpy(np.ascontiguousarray(imp2.reshape(-1))).to(dev)
    chunk_blocks = chunk_blocks or HOST_CHUNK_BLOCKS
    if dev.type == "cuda":
        with torch.no_grad():
            out = _quantize_host_pipelined(blocks, qtype, imp, bpr, bpe, dev, chunk_blocks)
        return out.reshape(*data.shape[:-1], bpr * BLOCK_BYTES[qtype])
    out = np.empty((blocks.shape[0], BLOCK_BYTES[qtype]), dtype=np.uint8)
    with torch.no_grad():
        for start in range(0, blocks.shape[0], chunk_blocks):
            stop = min(start + chunk_blocks, blocks.shape[0])
            xb = torch.from_numpy(np.ascontiguousarray(blocks[start:stop])).to(dev)
            out[start:stop] = quantize_blocks_triton(qtype, xb, imp, start, bpr, bpe).cpu().numpy()
    return out.reshape(*data.shape[:-1], bpr * BLOCK_BYTES[qtype])
