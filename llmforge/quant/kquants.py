"""K-quant packing (Q2_K..Q6_K), byte-identical to llama.cpp's reference quantizers.

Mirrors ``quantize_row_q*_K_ref`` (no importance) and ``quantize_row_q*_K_impl`` (with importance,
llama.cpp's imatrix path) of ggml ``src/ggml-quants.c`` as vendored in llama-cpp-python 0.3.36
(llama.cpp 0c1e570). Own code, written from the C source and ``shared/docs/gguf-and-kquants.md``.

Bit-exactness needs one float32 rounding per C operator in C's order, no fused multiply-add, and
sequential (left-to-right) sums. So the work is vectorised *across* sub-blocks while the 16/32
positions inside a sub-block are summed one after the other. Arrays are kept position-major,
shape ``(n, S)``: row ``i`` is position ``i`` of all ``S`` sub-blocks.

The algorithm is written once against a tiny array backend (:class:`NumpyOps` here, a torch one in
``kquants_torch``), so the numpy and torch paths cannot drift apart.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T

QK_K = 256
GROUP_MAX_EPS = 1e-15
_MAGIC = 12582912.0  # 1.5 * 2**23: llama.cpp's nearest_int reads the bits of f + this

F32 = np.float32


def f32(value: float) -> np.float32:
    """A float32 scalar, for computing C's scalar constant expressions with C's rounding."""
    return np.float32(value)


def _sum_rows(terms: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """C's ``s = 0; for i: s += t[i]`` over axis 0 of a C-contiguous array, strictly left to right. A reduction over
    the outer axis adds row after row (checked bitwise against a loop), except where the other axes hold a single
    element: numpy then sums the (contiguous) axis pairwise. There ``accumulate`` runs the sequential sum (from
    t[0] instead of 0 + t[0]: the same values but for the sign of an all-zero sum, which ``+ 0`` makes C's +0)."""
    if terms.shape[0] > 1 and terms.size == terms.shape[0]:
        total = np.add.accumulate(terms, axis=0)[-1] + np.float32(0.0)
        if out is None:
            return total
        out[...] = total
        return out
    return np.add.reduce(terms, axis=0, initial=np.float32(0.0), out=out)


class NumpyOps:
    """The array operations the quantizer core needs, on numpy float32/int32 arrays."""

    def const(self, value: Any) -> np.float32:
        return np.float32(value)

    def zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, dtype=np.float32)

    def izeros(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, dtype=np.int32)

    def asarray(self, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=np.float32)

    def tr(self, a: np.ndarray) -> np.ndarray:
        """Contiguous transpose of a 2-D array."""
        return np.ascontiguousarray(a.T)

    def nearest_int(self, f: np.ndarray) -> np.ndarray:
        """Consumes ``f``: every caller passes a fresh temporary, so the work is done in its buffer."""
        # numpy on x86 makes the same default NaN (0xFFC00000) as llama.cpp's x86 build: no NaN mapping needed
        np.add(f, np.float32(_MAGIC), out=f)
        bits = f.view(np.int32)
        bits &= 0x7FFFFF
        bits -= 0x400000
        return bits

    def seq_sum(self, terms: np.ndarray) -> np.ndarray:
        return _sum_rows(terms)

    def where(self, cond: np.ndarray, a: Any, b: Any) -> np.ndarray:
        return np.where(cond, a, b)

    def abs(self, a: np.ndarray) -> np.ndarray:
        return np.abs(a)

    def sqrt(self, a: np.ndarray) -> np.ndarray:
        return np.sqrt(a)  # float32 sqrt is correctly rounded in numpy

    def clip(self, a: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """In place in ``a`` (callers pass fresh integer temporaries); exact for integers."""
        # one np.clip pass: int32 maximum/minimum are ~6x slower than clip (numpy 2.4, measured)
        return np.clip(a, np.int32(lo), np.int32(hi), out=a)

    def put(self, dst: np.ndarray, cond: np.ndarray, src: np.ndarray) -> np.ndarray:
        """``where(cond, src, dst)``, in place in ``dst`` (which the caller owns)."""
        np.copyto(dst, src, where=cond)
        return dst

    def imin(self, a: np.ndarray, hi: int) -> np.ndarray:
        return np.clip(a, np.iinfo(a.dtype).min, hi)

    def round_clip(self, f: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """Round half to even, then clip, as float32, in place in the temporary ``f``."""
        np.rint(f, out=f)
        np.maximum(f, np.float32(lo), out=f)
        return np.minimum(f, np.float32(hi), out=f)

    def fl(self, a: np.ndarray) -> np.ndarray:
        return a.astype(np.float32)

    def fp16(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(fp16 bits as int32, the fp16 value back in float32): ggml's RNE conversion."""
        h = a.astype(np.float16)
        return h.view(np.uint16).astype(np.int32), h.astype(np.float32)

    def repeat(self, a: np.ndarray, k: int) -> np.ndarray:
        return np.repeat(a, k)

    def u8(self, a: np.ndarray) -> np.ndarray:
        return a.astype(np.uint8)

    def stack_cols(self, cols: list[np.ndarray]) -> np.ndarray:
        return np.stack(cols, axis=1)

    def cat(self, parts: list[np.ndarray], axis: int = 1) -> np.ndarray:
        return np.concatenate(parts, axis=axis)

    def stack(self, cols: list[np.ndarray]) -> np.ndarray:
        return np.stack(cols)

    def any(self, a: np.ndarray) -> bool:
        return bool(a.any())

    def nonzero(self, a: np.ndarray) -> np.ndarray:
        return np.flatnonzero(a)

    def to_numpy(self, a: np.ndarray, dtype: Any) -> np.ndarray:
        return np.asarray(a).astype(dtype)

    # --- optional fast paths (the core falls back to the generic code where a backend lacks them)

    def signed_max(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``_signed_max`` in two reductions: C keeps the first strictly larger |x| from amax = 0 (NaN never
        compares larger), which is the NaN-ignoring max or min, whichever is larger in size; only where
        both +a and -a reach it does the order matter (:meth:`_first_signed_max` on those columns)."""
        zero = np.float32(0.0)
        hi = np.fmax.reduce(x, axis=0)
        lo = np.fmin.reduce(x, axis=0)
        neg = np.negative(lo)
        amax = np.fmax(hi, neg)
        vmax = np.where(neg > hi, lo, hi)
        tie = np.flatnonzero((hi == neg) & (hi > zero))
        if tie.shape[0]:
            vmax[tie] = self._first_signed_max(x[:, tie])
        valid = amax > zero
        return np.where(valid, amax, zero), np.where(valid, vmax, zero)

    @staticmethod
    def _first_signed_max(x: np.ndarray) -> np.ndarray:
        """The x of the first NaN-ignoring largest |x| over axis 0 (any x if that is 0 or NaN)."""
        ax = np.abs(x)
        amax = np.fmax.reduce(ax, axis=0)
        # the first row where ax == amax: the largest of (n - row) over those rows (argmax along axis 0
        # is several times slower than these two contiguous passes)
        n = x.shape[0]
        rank = np.multiply((ax == amax).view(np.uint8), np.arange(n, 0, -1, dtype=np.uint8)[:, None])
        first = n - np.maximum.reduce(rank, axis=0).astype(np.intp)
        np.minimum(first, n - 1, out=first)                  # all-NaN: no such row
        first *= x.shape[1]
        first += np.arange(x.shape[1])
        return x.ravel()[first]

    # --- unweighted Q3_K as a whole (make_q3_quants, then the super-block step and the second pass)

    Q3_SLAB = 4096          # sub-blocks per slab of the dense passes: their ~6 (16, slab) arrays stay in L2

    def q3_k(self, blocks: np.ndarray) -> Packed:
        """Unweighted Q3_K of (nb, 256) super-blocks: the generic ``_q3_k``'s values, organised for numpy.

        make_q3_quants: only sub-blocks whose initial sumlx is > 0 can change. C tests ``slx > 0`` with
        slx = sumlx minus one of its own terms, and every term has the sign of -vmax (L's sign is
        -sign(x)*sign(vmax)), so a positive-max sub-block's slx is <= 0 (|sumlx| >= each term): half of
        them never refine. The first pass runs densely per slab (:meth:`_q3_sums`, :meth:`_q3_marks`) on
        float levels (C's nearest_int equals rint here, |iscale*x| <= 4; a NaN, where they differ, is
        redone exactly) and marks a superset of the positions where C's test could accept; the test
        itself and the later passes run in rounds over the whole chunk (:meth:`_q3_rounds`). The second
        pass is elementwise, so it runs on the sub-block-major input, giving the levels in block order;
        the fit's levels are only needed where a sub-block's scale d is 0, and are rebuilt there.
        """
        rows = blocks.reshape(-1, 16)                        # sub-block-major (S, 16)
        S, nmax = rows.shape[0], 4
        iscale = np.empty(S, dtype=np.float32)
        live = np.empty(S, dtype=bool)
        sumlx = np.empty(S, dtype=np.float32)
        suml2 = np.empty(S, dtype=np.float32)
        marks = np.empty(S, dtype=np.int64)
        for s0 in range(0, S, self.Q3_SLAB):
            s1 = min(S, s0 + self.Q3_SLAB)
            x = np.ascontiguousarray(rows[s0:s1].T)         # position-major (16, s): sums run over rows
            amax, vmax = self.signed_max(x)
            np.greater_equal(amax, np.float32(GROUP_MAX_EPS), out=live[s0:s1])
            np.divide(np.float32(-nmax), vmax, out=iscale[s0:s1])
            neg = vmax < np.float32(0.0)                    # the only ones that can refine (see above)
            for part, can_refine in ((np.flatnonzero(~neg), False), (np.flatnonzero(neg), True)):
                if not part.shape[0]:
                    continue
                xp, sub = np.take(x, part, axis=1), part + s0
                lf, t1, t2 = self._q3_sums(xp, iscale[sub], live[sub], nmax)
                sumlx[sub], suml2[sub] = t1[-1], t2[-1]
                marks[sub] = self._q3_marks(xp, lf, t1, t2, live[sub], nmax) if can_refine else 0
        act = np.flatnonzero(marks != 0)                    # the sub-blocks the first pass may change
        levels = np.empty((0, 16), dtype=np.float32)
        if act.shape[0]:
            levels, sumlx[act], suml2[act] = self._q3_rounds(rows, iscale, act, marks[act], sumlx[act], suml2[act],
                                                             nmax)
        zero = np.float32(0.0)
        scale = np.divide(sumlx, suml2, out=np.zeros(S, dtype=np.float32), where=suml2 > zero)
        np.copyto(scale, zero, where=~live)
        l, d_bits, d_val = _q3_scales(self, scale.reshape(-1, 16))
        d = _sub_major(self, d_val, l - 32)
        L = np.empty(rows.shape, dtype=np.uint8)
        for s0 in range(0, S, self.Q3_SLAB):                 # the second pass, in the input's order
            L[s0:s0 + self.Q3_SLAB] = self.requant(rows[s0:s0 + self.Q3_SLAB], None, d[s0:s0 + self.Q3_SLAB, None],
                                                   None, -4, 3, 4)
        zero_d = np.flatnonzero(d == zero)
        if zero_d.shape[0]:                                  # there the fit's levels (0 if all zero)
            fit = self.clip(self.nearest_int(iscale[zero_d][:, None] * rows[zero_d]), -nmax, nmax - 1)
            k = np.searchsorted(act, zero_d)
            refined = np.flatnonzero(np.take(act, k, mode="clip") == zero_d) if act.shape[0] else k[:0]
            fit[refined] = levels[k[refined]]
            fit += nmax
            fit[~live[zero_d]] = 0
            L[zero_d] = fit
        return Packed(L.reshape(-1, QK_K), d_bits, None, _pack_q3_scales(l))

    def _q3_sums(self, x: np.ndarray, iscale: np.ndarray, live: np.ndarray,
                 nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """make_q3_quants' initial levels of position-major sub-blocks and their terms w*x*l and w*l*l,
        each followed by its running sum (row -1: sumlx, suml2), C's sequential sums."""
        zero = np.float32(0.0)
        n, s = x.shape
        lf = np.multiply(iscale, x)
        np.rint(lf, out=lf)
        np.clip(lf, np.float32(-nmax), np.float32(nmax - 1), out=lf)
        w = x * x
        t1 = np.empty((n + 1, s), dtype=np.float32)
        t2 = np.empty((n + 1, s), dtype=np.float32)
        np.multiply(w, x, out=t1[:n])
        t1[:n] *= lf
        _sum_rows(t1[:n], out=t1[n])
        np.multiply(w, lf, out=t2[:n])
        t2[:n] *= lf
        _sum_rows(t2[:n], out=t2[n])
        # a NaN level (C's nearest_int reads its bits) makes a NaN sum, and one NaN sum a NaN total
        bad = np.flatnonzero(np.isnan(t1[n]) & live) if np.isnan(np.add.reduce(t1[n])) else None
        if bad is not None and bad.shape[0]:
            xb = x[:, bad]
            lb = self.clip(self.nearest_int(iscale[bad] * xb), -nmax, nmax - 1).astype(np.float32)
            wb = xb * xb
            t1[:n, bad], t2[:n, bad] = (wb * xb) * lb, (wb * lb) * lb
            t1[n, bad] = _sum_rows(t1[:n, bad])
            t2[n, bad] = _sum_rows(t2[:n, bad])
        # (those keep NaN sums, exactly too: a NaN level needs a NaN or infinite x; so they never refine,
        # and the levels of the sub-blocks that do are rint's)
        return lf, t1, t2

    def _q3_marks(self, x: np.ndarray, lf: np.ndarray, t1: np.ndarray, t2: np.ndarray, live: np.ndarray,
                  nmax: int) -> np.ndarray:
        """The first pass's candidates in position-major sub-blocks (levels ``lf``, terms and sums from
        :meth:`_q3_sums`, consumed) as a 16-bit mask per sub-block: a superset of C's, C's own where no
        new level is near 2**22 or NaN; none where sumlx <= 0 (nothing can refine there)."""
        n = x.shape[0]
        refine = t1[n] > np.float32(0.0)
        refine &= live
        slx = np.subtract(t1[n], t1[:n], out=t1[:n])
        q = np.subtract(t2[n], t2[:n], out=t2[:n])
        q *= x
        q /= slx
        np.rint(q, out=q)
        if -_RINT_SAFE < q.min() and q.max() < _RINT_SAFE:
            np.clip(q, np.float32(-nmax), np.float32(nmax - 1), out=q)
        cand = np.not_equal(q, lf)
        cand &= refine
        return _bit_masks(cand.T)

    def _q3_accepts(self, xv: np.ndarray, lv: np.ndarray, sumlx: np.ndarray, suml2: np.ndarray,
                    nmax: int) -> tuple[np.ndarray, ...]:
        """C's refinement step at single positions (x, current level, its sub-block's sums), operator by
        operator: (accept, new level, new sumlx, new suml2, new w*x*l term, new w*l*l term)."""
        zero = np.float32(0.0)
        w = xv * xv
        wx = w * xv
        slx = np.subtract(sumlx, wx * lv)
        sl2 = np.subtract(suml2, (w * lv) * lv)
        nl = self.nearest_int((xv * sl2) / slx)
        np.maximum(nl, -nmax, out=nl)                       # (np.clip costs ~5 us in Python on small arrays)
        np.minimum(nl, nmax - 1, out=nl)
        nl = nl.astype(np.float32)
        ok = slx > zero
        ok &= nl != lv
        t1 = wx * nl
        t2 = w * nl
        t2 *= nl
        slx_new = slx + t1
        sl2_new = sl2 + t2
        ok &= sl2_new > zero
        lhs = slx_new * slx_new
        lhs *= suml2
        rhs = sumlx * sumlx
        rhs *= sl2_new
        ok &= lhs > rhs
        return ok, nl, slx_new, sl2_new, t1, t2

    def _q3_rounds(self, rows: np.ndarray, iscale: np.ndarray, act: np.ndarray, marks: np.ndarray,
                   sumlx: np.ndarray, suml2: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """make_q3_quants' refinement of the ``act`` sub-blocks from their initial sums, given the first
        pass's candidate ``marks`` (bit i: position i): (their final levels (A, 16), sumlx, suml2).

        Positions count on across passes (t = 16 * pass + position). After an accept at a, C evaluates
        a + 1, a + 2, ... with the new state until the next accept; the state being fixed meanwhile, a
        position repeats its verdict 16 later, so without an accept in a + 1 .. a + 16 C's loop ends (it
        ends anyway after the fifth pass, t = 80; and after the first if that changes nothing). A round
        tests each sub-block's first marked position from ``t`` (the next to scan) up to that end exactly:
        an accept is applied, a rejection only moves ``t`` on. The marks of every round but the first
        come from a dense evaluation of all 16 positions with the current sums, a superset of C's
        candidates as in :meth:`_q3_marks`. Sub-block-major, with x, the levels and the cached w*x*l and
        w*l*l terms in one array, so that dropping finished sub-blocks is one gather.
        """
        A = act.shape[0]
        P = np.empty((4, A, 16), dtype=np.float32)
        X, LF, T1, T2 = P
        np.take(rows, act, axis=0, out=X)
        np.multiply(iscale[act][:, None], X, out=LF)        # the initial levels again, same operations
        np.rint(LF, out=LF)
        np.clip(LF, np.float32(-nmax), np.float32(nmax - 1), out=LF)
        np.multiply(X, X, out=T2)
        np.multiply(T2, X, out=T1)
        T1 *= LF
        T2 *= LF
        T2 *= LF
        s_lx, s_l2 = sumlx.copy(), suml2.copy()
        t = np.zeros(A, dtype=np.int64)
        end = np.full(A, 16, dtype=np.int64)                 # no accept yet: the first pass only
        home = np.arange(A)
        home_l, home_lx, home_l2 = np.empty((A, 16), dtype=np.float32), s_lx.copy(), s_l2.copy()
        going = np.ones(A, dtype=bool)
        m = marks.copy()
        while True:
            n_going = int(np.count_nonzero(going))
            if n_going < 0.6 * home.shape[0]:                 # drop the finished sub-blocks (one gather)
                done = np.flatnonzero(~going)
                home_l[home[done]] = P[1][done]
                home_lx[home[done]] = s_lx[done]
                home_l2[home[done]] = s_l2[done]
                if n_going == 0:
                    return home_l, home_lx, home_l2
                keep = np.flatnonzero(going)
                home, t, end = home[keep], t[keep], end[keep]
                P, s_lx, s_l2 = np.take(P, keep, axis=1), s_lx[keep], s_l2[keep]
                going = np.ones(keep.shape[0], dtype=bool)
            X, LF, T1, T2 = P
            if m is None:
                slx = np.subtract(s_lx[:, None], T1)
                q = np.subtract(s_l2[:, None], T2)
                q *= X
                q /= slx
                np.rint(q, out=q)
                # with no |q| near 2**22 (nor NaN) anywhere, nearest_int is rint, so C's clip makes the marks
                # exactly C's candidates; else they stay a superset
                if -_RINT_SAFE < q.min() and q.max() < _RINT_SAFE:
                    np.clip(q, np.float32(-nmax), np.float32(nmax - 1), out=q)
                m = _bit_masks(np.not_equal(q, LF))
                m |= m << 16
                m >>= t & 15                                    # bit k: position t + k
                m &= (1 << (end - t)) - 1
                m *= going
            r = np.flatnonzero(m != 0)
            bits = m[r]
            a = t[r] + _CTZ16[bits & -bits]                 # the first marked position
            p = a & 15
            ok, nl, slx_new, sl2_new, t1, t2 = self._q3_accepts(X[r, p], LF[r, p], s_lx[r], s_l2[r], nmax)
            t[r] = a + 1
            going[:] = False
            going[r] = True
            r, p = r[ok], p[ok]
            LF[r, p] = nl[ok]
            T1[r, p] = t1[ok]
            T2[r, p] = t2[ok]
            s_lx[r] = slx_new[ok]
            s_l2[r] = sl2_new[ok]
            end[r] = np.minimum(a[ok] + 17, 80)
            going &= t < end
            m = None

    def requant(self, x: np.ndarray, L: np.ndarray | None, d: np.ndarray, dm: np.ndarray | None, lo: int, hi: int,
                offset: int) -> np.ndarray:
        """``_requant`` in fewer passes: nearest_int's ``- 0x400000`` and the offset are one subtraction,
        the offset clip one ``np.clip``, and the ``d == 0`` fallback only where some d is 0 (none without
        ``L``: the caller's job then)."""
        num = np.divide(x, d) if dm is None else np.add(x, dm)
        if dm is not None:
            num /= d
        num += np.float32(_MAGIC)
        l = num.view(np.int32)
        l &= 0x7FFFFF
        l -= 0x400000 - offset
        np.clip(l, lo + offset, hi + offset, out=l)
        if L is not None:
            zero_d = d == np.float32(0.0)
            if zero_d.any():
                np.copyto(l, L, where=np.broadcast_to(zero_d, l.shape))
        return l

    def q3_bits(self, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``_q3_bits`` on 64-bit words of 8 levels (at most 7: no bit crosses into the next byte). Word
        j of 32-level group g (g = 0..7) holds levels 32g + 8j..+7, so with the groups made the outer axis
        (one transpose of 32-byte runs) every step is a long contiguous operation."""
        nb = L.shape[0]
        words = np.ascontiguousarray(np.ascontiguousarray(L).view(np.uint64).reshape(nb, 8, 4).transpose(1, 0, 2))
        ones = np.uint64(0x0101010101010101)
        high = words >> np.uint64(2)
        high &= ones
        words &= ones * np.uint64(3)
        hmask = high[0]
        for g in range(1, 8):                               # hmask[m] bit g: level 32g + m > 3
            hmask |= high[g] << np.uint64(g)
        qs = words[0:8:4].copy()                            # qs[32h + l] bits 2k: level 128h + 32k + l, low bits
        for k in range(1, 4):
            qs |= words[k:8:4] << np.uint64(2 * k)
        return hmask.view(np.uint8), np.concatenate((qs[0], qs[1]), axis=1).view(np.uint8)

    def qx_search(self, x: np.ndarray, w: np.ndarray, wx: np.ndarray, vmax: np.ndarray, nmax: int,
                  factors: list[np.float32]) -> tuple[np.ndarray, np.ndarray]:
        """make_qx_quants' trial loop: (scale, winning iscale). The trial sums go into (k, S) arrays
        through two reused buffers (the generic code's operations in its order), then one cheap
        sequential pass over the k trials replays C's comparisons and records the winner's index."""
        k, S = len(factors), x.shape[1]
        lf = np.empty(x.shape, dtype=np.float32)    # (per call: NumpyOps instances are shared by threads)
        t = np.empty(x.shape, dtype=np.float32)
        slx = np.empty((k, S), dtype=np.float32)
        sl2 = np.empty((k, S), dtype=np.float32)
        zero = np.float32(0.0)
        for j, factor in enumerate(factors):
            np.multiply(np.float32(factor) / vmax, x, out=lf)
            np.rint(lf, out=lf)
            np.clip(lf, np.float32(-nmax), np.float32(nmax - 1), out=lf)
            np.multiply(wx, lf, out=t)
            _sum_rows(t, out=slx[j])
            np.multiply(w, lf, out=t)
            t *= lf
            _sum_rows(t, out=sl2[j])
        new_scale = slx / sl2
        np.putmask(new_scale[0], sl2[0] == zero, zero)      # the first trial: scale 0 if suml2 == 0
        new_best = new_scale * slx
        sq = slx * slx
        np.putmask(sq, ~(sl2 > zero), np.float32(-np.inf))  # C's suml2 > 0 test: -inf > anything is False
        best = new_best[0].copy()
        take = np.zeros((k, S), dtype=bool)
        prod = np.empty(S, dtype=np.float32)
        for j in range(1, k):          # (putmask: ~4x faster than copyto with where=, numpy 2.4)
            np.multiply(best, sl2[j], out=prod)
            np.greater(sq[j], prod, out=take[j])
            np.putmask(best, take[j], new_best[j])
        idx = np.multiply(take, np.arange(k, dtype=np.int8)[:, None]).max(axis=0)   # the last trial taken
        scale = np.take_along_axis(new_scale, idx[None].astype(np.intp), axis=0)[0]
        return scale, np.asarray(factors, dtype=np.float32)[idx] / vmax

    # --- make_qkx2/qkx3_quants (Q2_K, Q4_K, Q5_K and weighted Q4_1/Q5_1)

    FIT_SLAB = 1 << 16      # elements per (n, s) array of the step loop: its five arrays stay in L2

    def fit_scale_min(self, x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                      use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``_fit_scale_min`` with its step loop (:meth:`_scale_min_steps`) on L2-sized slabs of sub-blocks."""
        zero = np.float32(0.0)
        lo, mx, sum_w, sum_x = _scale_min_stats(self, x, w)
        mn = np.where(lo > zero, zero, lo)
        flat = mx == mn
        S = x.shape[1]
        state = np.empty((5, S), dtype=np.float32)        # best_iscale, best_mn, best, scale, mn
        slab = max(1, self.FIT_SLAB // x.shape[0])
        for s0 in range(0, S, slab):
            c = slice(s0, min(S, s0 + slab))
            part = (x, w) if slab >= S else (np.ascontiguousarray(x[:, c]), np.ascontiguousarray(w[:, c]))
            state[:, c] = self._scale_min_steps(*part, mn[c], mx[c], flat[c], sum_w[c], sum_x[c], nmax, rmin, rdelta,
                                                nstep, use_mad)
        best_iscale, best_mn, scale, mn = state[0], state[1], state[3], state[4]
        # the winning step's levels, recomputed from its iscale and the min it used (same values)
        L = self.clip(self.nearest_int(best_iscale * (x - best_mn)), 0, nmax)
        return np.where(flat, zero, scale), -mn, np.where(flat, 0, L)

    def _scale_min_steps(self, x: np.ndarray, w: np.ndarray, mn: np.ndarray, mx: np.ndarray, flat: np.ndarray,
                         sum_w: np.ndarray, sum_x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                         use_mad: bool) -> np.ndarray:
        """The step loop of ``_fit_scale_min`` on three reused (n, s) arrays, in place: the same operations in
        the same order, minus the integer round trip of the levels. Where every ``iscale * (x - min)`` of a
        step is below 2**21 in size (its min and max say so, and are NaN otherwise), nearest_int plus the
        clip equal rint plus a float clip (a -0 level adds nothing different to the sums, which start at +0,
        nor to an error term, whose diff is then +-0 or -x exactly); else the step takes nearest_int. Flat
        sub-blocks get iscale 0 (their results are overwritten; C's levels there are nearest_int(NaN) = 0
        anyway), so that their inf * 0 does not force the slow step. Returns the final state (best_iscale,
        best_mn, best, scale, mn) as one (5, s) array, updated by one masked copy per step."""
        n, S = x.shape
        zero, fnmax = np.float32(0.0), f32(nmax)
        steady = ~flat
        f = np.empty((n, S), dtype=np.float32)            # x - mn, then the levels
        wl = np.empty((n, S), dtype=np.float32)
        t = np.empty((n, S), dtype=np.float32)
        state = np.empty((5, S), dtype=np.float32)
        new = np.empty((5, S), dtype=np.float32)          # iscale, mn, cur, this_scale, this_min
        iscale = np.divide(fnmax, mx - mn)
        state[0], state[1], state[4] = iscale, mn, mn
        np.divide(np.float32(1.0), iscale, out=state[3])
        for step in range(-1, nstep + 1):                 # step -1: the initial error, from the first fit
            if step >= 0:
                factor = f32(rmin) + f32(rdelta) * f32(step) + fnmax
                mn = state[4]
                iscale = np.subtract(mx, mn, out=new[0])
                np.divide(factor, iscale, out=iscale)
            np.putmask(iscale, flat, zero)                 # (flat: levels 0, as nearest_int(NaN) gives)
            np.subtract(x, mn, out=f)
            f *= iscale
            if -_RINT_SAFE < f.min() and f.max() < _RINT_SAFE:   # (False with any NaN)
                np.rint(f, out=f)
                np.clip(f, zero, fnmax, out=f)
            else:
                np.copyto(f, self.clip(self.nearest_int(f.copy()), 0, nmax))
            if step >= 0:
                np.multiply(w, f, out=wl)
                sum_l = _sum_rows(wl)
                np.multiply(wl, f, out=t)
                sum_l2 = _sum_rows(t)
                wl *= x
                sum_xl = _sum_rows(wl)
                D = sum_w * sum_l2 - sum_l * sum_l
                scale = np.divide(sum_w * sum_xl - sum_x * sum_l, D, out=new[3])
                the_min = np.divide(sum_l2 * sum_x - sum_l * sum_xl, D, out=new[4])
                clamp = the_min > zero
                np.putmask(the_min, clamp, zero)
                np.putmask(scale, clamp, sum_xl / sum_l2)
            else:
                scale, the_min = state[3], mn
            np.multiply(scale, f, out=t)                  # the error of these levels
            t += the_min
            t -= x
            if use_mad:
                np.abs(t, out=t)
            else:
                t *= t
            t *= w
            if step < 0:
                _sum_rows(t, out=state[2])
                continue
            _sum_rows(t, out=new[2])
            new[1] = mn
            better = D > zero
            better &= new[2] < state[2]
            better &= steady
            for row in range(5):                          # (putmask: 2x faster than copyto with where=)
                np.putmask(state[row], better, new[row])
        return state

    # --- make_qp_quants' refinement (the weighted Q2_K/Q4_K/Q5_K super-block scales)

    def qp_refine(self, x: np.ndarray, w: np.ndarray, wx: np.ndarray, L: np.ndarray, sumlx: np.ndarray,
                  suml2: np.ndarray, allzero: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``_fit_qp``'s 5 refinement passes in rounds, as :meth:`_q3_rounds` does for make_q3_quants: each
        round evaluates every position of every open column with its current sums (C's operations), and
        applies the first accept at or after the column's next position ``t`` (positions count on across
        passes; C's would be the same, as no accept came between). A column with no accept in the next n
        positions would see the same verdicts for ever (C's loop ends after the next unchanged pass), and
        none is applied at position 5n or later. Most columns are done after the first round.
        ``L`` (int levels as stored: ``& 0xFF``), ``sumlx`` and ``suml2`` are updated in place."""
        n = x.shape[0]
        zero = np.float32(0.0)
        act = np.flatnonzero(~allzero)
        X, W, WX = x[:, act], w[:, act], wx[:, act]
        LF = L[:, act].astype(np.float32)
        s_lx, s_l2 = sumlx[act], suml2[act]
        t = np.zeros(act.shape[0], dtype=np.int64)
        rows = np.arange(n)[:, None]
        while act.shape[0]:
            slx = s_lx - WX * LF
            sl2 = W * LF
            sl2 *= LF
            np.subtract(s_l2, sl2, out=sl2)
            q = X * sl2
            q /= slx
            new_l = self.nearest_int(q)
            np.minimum(new_l, nmax, out=new_l)
            nl = new_l.astype(np.float32)
            slx_new = WX * nl
            slx_new += slx
            sl2_new = W * nl
            sl2_new *= nl
            sl2_new += sl2
            ok = slx > zero
            ok &= sl2 > zero
            ok &= nl != LF                                # (exact: |new_l| <= 2**22)
            lhs = slx_new * slx_new
            lhs *= s_l2
            rhs = s_lx * s_lx
            rhs = sl2_new * rhs
            ok &= lhs > rhs
            key = np.subtract(rows, t)                    # offset of each position from t, cyclic
            key %= n
            key[~ok] = n
            k = np.min(key, axis=0)
            a = t + k
            hit = k < n
            hit &= a < 5 * n
            h = np.flatnonzero(hit)
            p = a[h] % n
            LF[p, h] = (new_l[p, h] & 0xFF).astype(np.float32)
            s_lx[h] = slx_new[p, h]
            s_l2[h] = sl2_new[p, h]
            done = np.flatnonzero(~hit)
            L[:, act[done]] = LF[:, done].astype(np.int32)
            sumlx[act[done]] = s_lx[done]
            suml2[act[done]] = s_l2[done]
            act, t = act[h], a[h] + 1
            X, W, WX, LF, s_lx, s_l2 = X[:, h], W[:, h], WX[:, h], LF[:, h], s_lx[h], s_l2[h]
        return L, sumlx, suml2


_RINT_SAFE = np.float32(1 << 21)                         # |f| below this: nearest_int(f) == rint(f)
_CTZ16 = np.zeros(1 << 16, dtype=np.uint8)              # trailing zeros of a 16-bit power of two
_CTZ16[1 << np.arange(16)] = np.arange(16)


_BYTE_BITS = np.uint64(0x0102040810204080)                # (8 bytes of 0/1) * this >> 56: their 8 bits


def _bit_masks(mask: np.ndarray) -> np.ndarray:
    """A (k, 16) boolean array as k 16-bit masks (bit j = column j), int64 (np.packbits is ~10x slower)."""
    words = np.ascontiguousarray(mask).view(np.uint64) * _BYTE_BITS
    words >>= np.uint64(56)
    m = words.view(np.int64)
    m[:, 1] <<= 8
    return m[:, 0] | m[:, 1]


# ----------------------------------------------------------------------------- shared helpers


def _seq_sum(ops: Any, terms: Any) -> Any:
    """C's ``s = 0; for i: s += t[i]`` over axis 0, strictly left to right."""
    return ops.seq_sum(terms)


def _first_max(ops: Any, values: Any, key: Any) -> tuple[Any, Any]:
    """Over axis 0: the largest ``key`` (start +0, strict >) and the ``values`` entry that first had it."""
    best_key = ops.zeros(tuple(key.shape[1:]))
    best_val = ops.zeros(tuple(key.shape[1:]))
    for i in range(key.shape[0]):
        take = key[i] > best_key
        best_key = ops.put(best_key, take, key[i])     # both are this function's own arrays
        best_val = ops.put(best_val, take, values[i])
    return best_key, best_val


def _scale_min_stats(ops: Any, x: Any, w: Any) -> tuple[Any, Any, Any, Any]:
    """make_qkx2/qkx3's first loop over axis 0: (min, max, sum of w, sum of w*x), C's comparisons and order."""
    mn, mx = x[0], x[0]
    sum_w = w[0]
    sum_x = sum_w * x[0]
    for i in range(1, x.shape[0]):
        mn = ops.where(x[i] < mn, x[i], mn)
        mx = ops.where(x[i] > mx, x[i], mx)
        sum_w = sum_w + w[i]
        sum_x = sum_x + w[i] * x[i]
    return mn, mx, sum_w, sum_x


def _fit_scale_min(ops: Any, x: Any, w: Any, nmax: int, rmin: float, rdelta: float, nstep: int,
                   use_mad: bool) -> tuple[Any, Any, Any]:
    """``make_qkx2_quants`` / ``make_qkx3_quants`` (weights given): scale, the_min, L per sub-block."""
    fast = getattr(ops, "fit_scale_min", None)
    if fast is not None:
        return fast(x, w, nmax, rmin, rdelta, nstep, use_mad)
    zero, one = ops.const(0.0), ops.const(1.0)
    mn, mx, sum_w, sum_x = _scale_min_stats(ops, x, w)
    mn = ops.where(mn > zero, zero, mn)
    flat = mx == mn

    def error(scale: Any, lf: Any, the_min: Any) -> Any:
        diff = scale * lf          # then in place: the same roundings in the same order, fewer temporaries
        diff += the_min
        diff -= x
        if use_mad:
            diff = ops.abs(diff)
        else:
            diff *= diff
        diff *= w
        return _seq_sum(ops, diff)

    fnmax = f32(nmax)
    iscale = ops.const(fnmax) / (mx - mn)
    scale = one / iscale
    best_iscale, best_mn = iscale, mn
    best = error(scale, ops.fl(ops.clip(ops.nearest_int(iscale * (x - mn)), 0, nmax)), mn)
    for step in range(nstep + 1):
        factor = f32(rmin) + f32(rdelta) * f32(step) + fnmax
        iscale = ops.const(factor) / (mx - mn)
        laux = ops.clip(ops.nearest_int(iscale * (x - mn)), 0, nmax)
        lf = ops.fl(laux)
        wl = w * lf
        sum_l = _seq_sum(ops, wl)
        sum_l2 = _seq_sum(ops, wl * lf)
        wl *= x
        sum_xl = _seq_sum(ops, wl)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        clamp = this_min > zero
        this_min = ops.where(clamp, zero, this_min)
        this_scale = ops.where(clamp, sum_xl / sum_l2, this_scale)
        cur = error(this_scale, lf, this_min)
        better = (D > zero) & (cur < best) & ~flat
        best_iscale = ops.where(better, iscale, best_iscale)
        best_mn = ops.where(better, mn, best_mn)
        best = ops.where(better, cur, best)
        scale = ops.where(better, this_scale, scale)
        mn = ops.where(better, this_min, mn)
    # the winning step's levels, recomputed from its iscale and the min it used (same values)
    L = ops.clip(ops.nearest_int(best_iscale * (x - best_mn)), 0, nmax)
    scale = ops.where(flat, zero, scale)
    L = ops.where(flat, 0, L)
    return scale, -mn, L


def _signed_max(ops: Any, x: Any) -> tuple[Any, Any]:
    """(amax, the signed x with the first largest |x|) over axis 0."""
    fast = getattr(ops, "signed_max", None)
    if fast is not None:
        return fast(x)
    return _first_max(ops, x, ops.abs(x))


def _qx_search(ops: Any, x: Any, w: Any, wx: Any, vmax: Any, nmax: int, factors: list[Any]) -> tuple[Any, Any]:
    """make_qx_quants' trial loop over ``iscale = factor / vmax``: (scale, the winning iscale)."""
    zero = ops.const(0.0)

    def fit(iscale: Any) -> tuple[Any, Any]:
        # |iscale * x| <= ~nmax + 1 wherever the sub-block is not all zero (|x| <= |vmax|), so
        # nearest_int equals round-half-even there and the levels can stay float (same values; a
        # +-0 level adds nothing different to sums that start at +0). All-zero sub-blocks are
        # overwritten at the end, whatever their sums.
        lf = ops.round_clip(iscale * x, -nmax, nmax - 1)
        return _seq_sum(ops, wx * lf), _seq_sum(ops, (w * lf) * lf)

    best_iscale = ops.const(factors[0]) / vmax
    sumlx, suml2 = fit(best_iscale)
    scale = ops.where(suml2 != zero, sumlx / suml2, zero)
    best = scale * sumlx
    for factor in factors[1:]:
        iscale = ops.const(factor) / vmax
        sumlx, suml2 = fit(iscale)
        take = (suml2 > zero) & (sumlx * sumlx > best * suml2)
        new_scale = sumlx / suml2
        best_iscale = ops.where(take, iscale, best_iscale)
        scale = ops.where(take, new_scale, scale)
        best = ops.where(take, new_scale * sumlx, best)
    return scale, best_iscale


def _fit_symmetric(ops: Any, x: Any, nmax: int, qw: Any | None) -> tuple[Any, Any]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)``: scale and L (offset by nmax; 0 if all zero)."""
    zero = ops.const(0.0)
    amax, vmax = _signed_max(ops, x)
    allzero = amax < ops.const(GROUP_MAX_EPS)
    w = qw if qw is not None else x * x
    wx = w * x

    # the first trial is -nmax, then the 18 steps -9..9 (C's order)
    factors = [f32(-nmax)] + [-(f32(nmax) + f32(0.1) * f32(step)) for step in range(-9, 10) if step != 0]
    search = getattr(ops, "qx_search", None)
    if search is not None:
        scale, best_iscale = search(x, w, wx, vmax, nmax, factors)
    else:
        scale, best_iscale = _qx_search(ops, x, w, wx, vmax, nmax, factors)
    # the winning step's levels, recomputed from its iscale with the same operations (same values)
    L = ops.clip(ops.nearest_int(best_iscale * x), -nmax, nmax - 1) + nmax
    return ops.where(allzero, zero, scale), ops.where(allzero, 0, L)


def _fit_q3(ops: Any, x: Any, nmax: int) -> tuple[Any, Any]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)``: scale and L (offset by nmax; 0 if all zero)."""
    zero = ops.const(0.0)
    amax, vmax = _signed_max(ops, x)
    allzero = amax < ops.const(GROUP_MAX_EPS)
    L = ops.clip(ops.nearest_int((ops.const(f32(-nmax)) / vmax) * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    lf = ops.fl(L)
    sumlx = _seq_sum(ops, wx * lf)
    suml2 = _seq_sum(ops, (w * lf) * lf)
    # C leaves a sub-block's loop after a pass that changes nothing, and such a pass would change
    # nothing again; so each pass runs only over the sub-blocks the previous pass changed (gathered).
    idx = None
    for _ in range(5):
        if idx is None:
            xa, wa, wxa, La, slxa, sl2a, aza = x, w, wx, L, sumlx, suml2, allzero
        else:
            xa, wa, wxa, La = x[:, idx], w[:, idx], wx[:, idx], L[:, idx]
            slxa, sl2a, aza = sumlx[idx], suml2[idx], allzero[idx]
        live = ~aza
        changed = None
        for i in range(xa.shape[0]):
            li = ops.fl(La[i])
            slx = slxa - wxa[i] * li
            sl2 = sl2a - (wa[i] * li) * li
            new_l = ops.clip(ops.nearest_int((xa[i] * sl2) / slx), -nmax, nmax - 1)
            nl = ops.fl(new_l)
            slx_new = slx + wxa[i] * nl
            sl2_new = sl2 + (wa[i] * nl) * nl
            accept = ((slx > zero) & (new_l != La[i]) & (sl2_new > zero)
                      & ((slx_new * slx_new) * sl2a > (slxa * slxa) * sl2_new) & live)
            changed = accept if changed is None else changed | accept
            if ops.any(accept):     # in place: La, slxa, sl2a are this pass's own arrays
                La[i] = ops.put(La[i], accept, new_l)
                slxa = ops.put(slxa, accept, slx_new)
                sl2a = ops.put(sl2a, accept, sl2_new)
        if idx is None:
            L, sumlx, suml2 = La, slxa, sl2a
            idx = ops.nonzero(changed)
        else:
            L[:, idx], sumlx[idx], suml2[idx] = La, slxa, sl2a
            idx = idx[changed]
        if idx.shape[0] == 0:
            break
    scale = ops.where(suml2 > zero, sumlx / suml2, zero)
    return ops.where(allzero, zero, scale), ops.where(allzero, 0, L + nmax)


def _fit_qp(ops: Any, x: Any, w: Any, nmax: int) -> tuple[Any, Any]:
    """``make_qp_quants``: scale and L (as uint8 bytes) for non-negative x with weights."""
    zero, one = ops.const(0.0), ops.const(1.0)
    mx = ops.zeros(tuple(x.shape[1:]))
    for i in range(x.shape[0]):
        mx = ops.where(mx > x[i], mx, x[i])
    allzero = mx < ops.const(GROUP_MAX_EPS)

    def mse(scale: Any, lf: Any) -> Any:
        diff = x - scale * lf
        return _seq_sum(ops, (w * diff) * diff)

    iscale = ops.const(f32(nmax)) / mx
    best = mse(one / iscale, ops.fl(ops.nearest_int(iscale * x) & 0xFF))
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = ops.const(f32(0.1) * f32(step) + f32(nmax)) / mx
        cur = mse(one / iscale_is, ops.fl(ops.imin(ops.nearest_int(iscale_is * x), nmax)))
        take = cur < best
        best = ops.where(take, cur, best)
        iscale = ops.where(take, iscale_is, iscale)
    l = ops.imin(ops.nearest_int(iscale * x), nmax)
    lf = ops.fl(l)
    wx = w * x
    sumlx = _seq_sum(ops, wx * lf)
    suml2 = _seq_sum(ops, (w * lf) * lf)
    L = l & 0xFF
    refine = getattr(ops, "qp_refine", None)
    if refine is not None:
        L, sumlx, suml2 = refine(x, w, wx, L, sumlx, suml2, allzero, nmax)
    for _ in range(0 if refine is not None else 5):
        changed = False
        for i in range(x.shape[0]):
            li = ops.fl(L[i])
            slx = sumlx - wx[i] * li
            sl2 = suml2 - (w[i] * li) * li
            new_l = ops.imin(ops.nearest_int((x[i] * sl2) / slx), nmax)
            nl = ops.fl(new_l)
            slx_new = slx + wx[i] * nl
            sl2_new = sl2 + (w[i] * nl) * nl
            accept = ((slx > zero) & (sl2 > zero) & (new_l != L[i])
                      & ((slx_new * slx_new) * suml2 > (sumlx * sumlx) * sl2_new) & ~allzero)
            if ops.any(accept):
                changed = True
                L[i] = ops.where(accept, new_l & 0xFF, L[i])
                sumlx = ops.where(accept, slx_new, sumlx)
                suml2 = ops.where(accept, sl2_new, suml2)
        if not changed:
            break
    scale = ops.where(suml2 > zero, sumlx / suml2, zero)
    return ops.where(allzero, zero, scale), ops.where(allzero, 0, L)


def _sub_blocks(ops: Any, blocks: Any, n: int) -> Any:
    """(nb, 256) super-blocks -> position-major (n, nb*256/n) sub-blocks."""
    return ops.tr(blocks.reshape(-1, n))


def _per_sub(ops: Any, values: Any, n: int) -> Any:
    """A per-super-block (nb,) value repeated for each of its 256/n sub-blocks: (nb*256/n,)."""
    return ops.repeat(values, QK_K // n)


def _block_sum_x2(ops: Any, blocks: Any) -> Any:
    xt = ops.tr(blocks)
    return _seq_sum(ops, xt * xt)


def _requant(ops: Any, x: Any, L: Any, d: Any, dm: Any | None, lo: int, hi: int, offset: int) -> Any:
    """Second pass: re-quantize each sub-block with its decoded scale ``d`` (keep L where d == 0)."""
    fast = getattr(ops, "requant", None)
    if fast is not None:
        return fast(x, L, d, dm, lo, hi, offset)
    num = x if dm is None else x + dm
    l = ops.clip(ops.nearest_int(num / d), lo, hi) + offset
    return ops.where(d == ops.const(0.0), L, l)


# ----------------------------------------------------------------------------- scale packing


def _pack_k4_scales(ls: Any, lm: Any) -> list[Any]:
    """The 12 packed 6-bit scale/min bytes of Q4_K/Q5_K, from (nb, 8) integer arrays."""
    out = [None] * 12
    for j in range(4):
        out[j] = ls[:, j] & 0xFF
        out[j + 4] = lm[:, j] & 0xFF
    for j in range(4, 8):
        out[j + 4] = ((ls[:, j] & 0xF) | ((lm[:, j] & 0xF) << 4)) & 0xFF
        out[j - 4] = (out[j - 4] | ((ls[:, j] >> 4) << 6)) & 0xFF
        out[j] = (out[j] | ((lm[:, j] >> 4) << 6)) & 0xFF
    return out


def _unpack_k4_scales(q: list[Any]) -> tuple[list[Any], list[Any]]:
    """``get_scale_min_k4`` for j = 0..7."""
    sc, mn = [], []
    for j in range(8):
        if j < 4:
            sc.append(q[j] & 63)
            mn.append(q[j + 4] & 63)
        else:
            sc.append((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4))
            mn.append((q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    return sc, mn


def _pack_q3_scales(l: Any) -> list[Any]:
    """The 12 Q3_K scale bytes from (nb, 16) 6-bit values (already offset by 32)."""
    out = [None] * 12
    for j in range(16):
        lo = l[:, j] & 0xF
        if j < 8:
            out[j] = lo
        else:
            out[j - 8] = out[j - 8] | (lo << 4)
    for k in range(4):
        acc = (l[:, k] >> 4)
        for j in (k + 4, k + 8, k + 12):
            acc = acc | ((l[:, j] >> 4) << (2 * (j // 4)))
        out[8 + k] = acc
    return out


# ----------------------------------------------------------------------------- the five types


@dataclass
class Packed:
    """Backend arrays describing quantized super-blocks, before byte packing."""

    L: Any                 # (nb, 256) quant levels
    d: Any                 # (nb,) fp16 bits
    dmin: Any = None       # (nb,) fp16 bits
    scales: Any = None     # list of (nb,) scale bytes


def _affine_blocks(ops: Any, blocks: Any, qw: Any | None, n: int, nmax: int,
                   ref_fit: tuple[float, float, int, bool], weight_sigma2_factor: float) -> tuple[Any, Any, Any, Any, Any]:
    """Sub-block fits shared by Q2_K/Q4_K/Q5_K: (xs, scales (nb, k), mins (nb, k), L (n, S), sw)."""
    xs = _sub_blocks(ops, blocks, n)
    if qw is None:
        if n == 16:      # Q2_K: w = |x|
            w = ops.abs(xs)
        else:            # Q4_K/Q5_K: w = av_x + |x|, av_x = sqrtf(sum_x2/32)
            av_x = ops.sqrt(_seq_sum(ops, xs * xs) / ops.const(f32(32)))
            w = av_x + ops.abs(xs)
        rmin, rdelta, nstep, use_mad = ref_fit
        sw = None
    else:
        sum_x2 = _block_sum_x2(ops, blocks)
        if weight_sigma2_factor == 1.0:
            sigma2 = sum_x2 / ops.const(f32(QK_K))
        else:
            sigma2 = (ops.const(f32(weight_sigma2_factor)) * sum_x2) / ops.const(f32(QK_K))
        qws = _sub_blocks(ops, qw, n)
        w = qws * ops.sqrt(_per_sub(ops, sigma2, n) + xs * xs)
        sw = _seq_sum(ops, w)
        rmin, rdelta, nstep, use_mad = -0.9, 0.05, 36, False
    scale, the_min, L = _fit_scale_min(ops, xs, w, nmax, rmin, rdelta, nstep, use_mad)
    k = QK_K // n
    return xs, scale.reshape(-1, k), the_min.reshape(-1, k), L, sw


def _q2_k(ops: Any, blocks: Any, qw: Any | None) -> Packed:
    xs, scales, mins, L, sw = _affine_blocks(ops, blocks, qw, 16, 3, (-0.5, 0.1, 15, True), 1.0)
    zero = ops.const(0.0)
    if qw is None:
        max_scale, _ = _first_max(ops, ops.tr(scales), ops.tr(scales))
        max_min, _ = _first_max(ops, ops.tr(mins), ops.tr(mins))
        has_s, has_m = max_scale > zero, max_min > zero
        q15 = ops.const(f32(15))
        ls = ops.where(has_s[:, None], ops.nearest_int((q15 / max_scale)[:, None] * scales), 0)
        lm = ops.where(has_m[:, None], ops.nearest_int((q15 / max_min)[:, None] * mins), 0)
        d_bits, d_val = ops.fp16(ops.where(has_s, max_scale / q15, zero))
        m_bits, m_val = ops.fp16(ops.where(has_m, max_min / q15, zero))
    else:
        swt = sw.reshape(-1, 16)
        dm, ls = _fit_qp(ops, ops.tr(scales), ops.tr(swt), 15)
        mm, lm = _fit_qp(ops, ops.tr(mins), ops.tr(swt), 15)
        ls, lm = ops.tr(ls), ops.tr(lm)
        d_bits, d_val = ops.fp16(dm)
        m_bits, m_val = ops.fp16(mm)
    byte = (ls | (lm << 4)) & 0xFF
    d, dmn = _sub_major(ops, d_val, byte & 0xF), _sub_major(ops, m_val, byte >> 4)
    L = _requant(ops, xs, L, d, dmn, 0, 3, 0)
    return Packed(ops.tr(L).reshape(-1, QK_K), d_bits, m_bits, [byte[:, j] for j in range(16)])


def _sub_major(ops: Any, super_val: Any, sub_int: Any) -> Any:
    """``fp16_value(super) * sub_scale`` as a (S,) row matching the sub-block order of ``_sub_blocks``."""
    return (super_val[:, None] * ops.fl(sub_int)).reshape(-1)


def _k4(ops: Any, blocks: Any, qw: Any | None, nmax: int, ref_fit: tuple[float, float, int, bool],
        clamp_weighted: bool) -> Packed:
    """Q4_K (nmax 15) and Q5_K (nmax 31): 8 sub-blocks of 32 with 6-bit scales and mins."""
    xs, scales, mins, L, sw = _affine_blocks(ops, blocks, qw, 32, nmax, ref_fit, 2.0)
    zero = ops.const(0.0)
    c63 = ops.const(f32(63))
    if qw is None:
        max_scale, _ = _first_max(ops, ops.tr(scales), ops.tr(scales))
        max_min, _ = _first_max(ops, ops.tr(mins), ops.tr(mins))
        inv_scale = ops.where(max_scale > zero, c63 / max_scale, zero)
        inv_min = ops.where(max_min > zero, c63 / max_min, zero)
        ls = ops.imin(ops.nearest_int(inv_scale[:, None] * scales) & 0xFF, 63)
        lm = ops.imin(ops.nearest_int(inv_min[:, None] * mins) & 0xFF, 63)
        d_bits, d_val = ops.fp16(max_scale / c63)
        m_bits, m_val = ops.fp16(max_min / c63)
    else:
        swt = sw.reshape(-1, 8)
        d_block, ls = _fit_qp(ops, ops.tr(scales), ops.tr(swt), 63)
        m_block, lm = _fit_qp(ops, ops.tr(mins), ops.tr(swt), 63)
        ls, lm = ops.tr(ls), ops.tr(lm)
        if clamp_weighted:  # quantize_row_q5_K_impl clamps, q4_K_impl does not
            ls, lm = ops.imin(ls, 63), ops.imin(lm, 63)
        d_bits, d_val = ops.fp16(d_block)
        m_bits, m_val = ops.fp16(m_block)
    packed = _pack_k4_scales(ls, lm)
    sc, mn = _unpack_k4_scales(packed)
    sc_all = _stack_int(ops, sc)
    mn_all = _stack_int(ops, mn)
    L = _requant(ops, xs, L, _sub_major(ops, d_val, sc_all), _sub_major(ops, m_val, mn_all), 0, nmax, 0)
    return Packed(ops.tr(L).reshape(-1, QK_K), d_bits, m_bits, packed)


def _stack_int(ops: Any, cols: list[Any]) -> Any:
    """List of (nb,) int columns -> (nb, len)."""
    return ops.tr(ops.stack(cols))


def _q3_scales(ops: Any, scales: Any) -> tuple[Any, Any, Any]:
    """Unweighted Q3_K's super-block step from (nb, 16) sub-block scales: the 6-bit sub-scales (offset
    by 32), the fp16 bits of d and their value."""
    zero = ops.const(0.0)
    _, max_scale = _signed_max(ops, ops.tr(scales))
    has = max_scale != zero
    iscale = ops.const(f32(-32)) / max_scale
    l = ops.nearest_int(iscale[:, None] * scales)
    l = ((l + 128) & 0xFF) - 128                          # through int8_t
    l = ops.where(has[:, None], ops.clip(l, -32, 31) + 32, 0)
    d_bits, d_val = ops.fp16(ops.where(has, ops.const(1.0) / iscale, zero))
    return l, d_bits, d_val


def _q3_k(ops: Any, blocks: Any, qw: Any | None) -> Packed:
    fast = getattr(ops, "q3_k", None)
    if qw is None and fast is not None:
        return fast(blocks)
    xs = _sub_blocks(ops, blocks, 16)
    if qw is None:
        scale, L = _fit_q3(ops, xs, 4)
        l, d_bits, d_val = _q3_scales(ops, scale.reshape(-1, 16))
    else:
        sum_x2 = _block_sum_x2(ops, blocks)
        sigma2 = (ops.const(f32(2)) * sum_x2) / ops.const(f32(QK_K))
        w = _sub_blocks(ops, qw, 16) * ops.sqrt(_per_sub(ops, sigma2, 16) + xs * xs)
        sw = _seq_sum(ops, w)
        scale, L = _fit_symmetric(ops, xs, 4, w)
        d_block, l = _fit_symmetric(ops, ops.tr(scale.reshape(-1, 16)), 32, ops.tr(sw.reshape(-1, 16)))
        l = ops.tr(l)
        d_bits, d_val = ops.fp16(d_block)
    packed = _pack_q3_scales(l)
    d = _sub_major(ops, d_val, l - 32)
    L = _requant(ops, xs, L, d, None, -4, 3, 4)
    return Packed(ops.tr(L).reshape(-1, QK_K), d_bits, None, packed)


def _q6_k(ops: Any, blocks: Any, qw: Any | None) -> Packed:
    xs = _sub_blocks(ops, blocks, 16)
    scale, L = _fit_symmetric(ops, xs, 32, None if qw is None else _sub_blocks(ops, qw, 16))
    scales = scale.reshape(-1, 16)
    max_abs, max_scale = _signed_max(ops, ops.tr(scales))
    zero_block = max_abs < ops.const(GROUP_MAX_EPS)
    iscale = ops.const(f32(-128)) / max_scale
    d_bits, d_val = ops.fp16(ops.const(1.0) / iscale)
    sc = ops.imin(ops.nearest_int(iscale[:, None] * scales), 127)
    sc = ((sc + 128) & 0xFF) - 128                        # stored as int8_t
    L = _requant(ops, xs, L, _sub_major(ops, d_val, sc), None, -32, 31, 32)
    L = ops.tr(L).reshape(-1, QK_K)
    L = ops.where(zero_block[:, None], 0, L)
    sc = ops.where(zero_block[:, None], 0, sc)
    d_bits = ops.where(zero_block, 0, d_bits)
    return Packed(L, d_bits, None, [sc[:, j] & 0xFF for j in range(16)])


_CORE: dict[T, Callable[[Any, Any, Any], Packed]] = {
    T.Q2_K: _q2_k,
    T.Q3_K: _q3_k,
    T.Q4_K: lambda ops, b, qw: _k4(ops, b, qw, 15, (-1.0, 0.1, 20, False), False),
    T.Q5_K: lambda ops, b, qw: _k4(ops, b, qw, 31, (-0.5, 0.1, 15, False), True),
    T.Q6_K: _q6_k,
}

K_TYPES: tuple[T, ...] = tuple(_CORE)
BLOCK_BYTES: dict[T, int] = {T.Q2_K: 84, T.Q3_K: 110, T.Q4_K: 144, T.Q5_K: 176, T.Q6_K: 210}


# ----------------------------------------------------------------------------- byte layout (numpy)


def _fp16_bytes(ops: Any, bits: Any) -> Any:
    """(nb,) fp16 bit patterns -> (nb, 2) little-endian bytes."""
    return ops.stack_cols([ops.u8(bits & 0xFF), ops.u8((bits >> 8) & 0xFF)])


def _crumbs(L: Any) -> Any:
    """Q2_K/Q3_K qs: 4 two-bit values per byte, in halves of 128: qs[32h + l] from L[128h + 32k + l]."""
    q = L.reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _q3_bits(ops: Any, L: Any) -> tuple[Any, Any]:
    """Q3_K's hmask (nb, 32) and qs (nb, 64) bytes from (nb, 256) levels 0..7."""
    high = ops.u8(L > 3)                                  # bit j//32 of hmask[j%32]
    hmask = high[:, 0:32]
    for k in range(1, 8):
        hmask = hmask | (high[:, 32 * k:32 * (k + 1)] << k)
    return hmask, _crumbs(L - (high << 2))


def _layout(ops: Any, qtype: T, p: Packed) -> Any:
    """Assemble the block bytes of ``qtype`` from a :class:`Packed`, on the backend's device."""
    L = ops.u8(p.L)
    d = _fp16_bytes(ops, p.d)
    scales = ops.stack_cols([ops.u8(s & 0xFF) for s in p.scales])
    if qtype == T.Q2_K:
        return ops.cat([scales, _crumbs(L), d, _fp16_bytes(ops, p.dmin)])
    if qtype == T.Q3_K:
        fast = getattr(ops, "q3_bits", None)
        hmask, qs = fast(L) if fast is not None else _q3_bits(ops, L)
        return ops.cat([hmask, qs, scales, d])
    if qtype in (T.Q4_K, T.Q5_K):
        dmin = _fp16_bytes(ops, p.dmin)
        q = L.reshape(-1, 4, 2, 32)                       # L[64c + 32h + l]
        qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
        if qtype == T.Q4_K:
            return ops.cat([d, dmin, scales, qs])
        hi = (q >> 4) & 1                                  # (nb, c, h, l)
        qh = hi[:, 0, 0] | (hi[:, 0, 1] << 1)
        for c in range(1, 4):
            qh = qh | (hi[:, c, 0] << (2 * c)) | (hi[:, c, 1] << (2 * c + 1))
        return ops.cat([d, dmin, scales, qh, qs])
    # Q6_K
    q = L.reshape(-1, 2, 4, 32)                            # L[128h + 32k + l]
    ql = ops.cat([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4),
                  (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)], axis=2).reshape(-1, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4)
          | ((q[:, :, 3] >> 4) << 6)).reshape(-1, 64)
    return ops.cat([ql, qh, scales, d])


# ----------------------------------------------------------------------------- public entry points


def quantize_blocks(ops: Any, qtype: T, blocks: Any, qw: Any | None = None) -> np.ndarray:
    """Quantize (nb, 256) float32 super-blocks (backend arrays) into (nb, block_bytes) uint8."""
    packed = _CORE[qtype](ops, blocks, qw)
    return ops.to_numpy(_layout(ops, qtype, packed), np.uint8)


_NUMPY = NumpyOps()
CHUNK_BLOCKS = 512
# unweighted Q3_K (NumpyOps.q3_k) runs its dense passes in L2-sized slabs itself, and its refinement rounds
# (many small ops over few sub-blocks) gain from more sub-blocks per op: 2048-8192 blocks ~10% faster than
# 1024 (measured 1-core); the others are slower with larger chunks (Q3_K imatrix included, 15%). make_qx_quants'
# 19 trials (Q6_K, imatrix Q3_K) keep their (16, 16 * blocks) arrays in L2 with 256 blocks: 7-14% faster than
# 512 (1 thread, interleaved runs); the fit_scale_min types slab their step loop themselves (no difference)
_CHUNK_SCALE: dict[tuple[T, bool], float] = {(T.Q3_K, False): 8, (T.Q3_K, True): 0.5, (T.Q6_K, False): 0.5,
                                             (T.Q6_K, True): 0.5}
_MALLOC_TUNED = False


def _keep_temporaries_on_the_heap() -> None:
    """Raise glibc's mmap threshold once: the core allocates many ~0.5 MB temporaries, and with the default
    dynamic threshold each one can be a fresh mmap with page faults (2-3x slower, measured). Linux only."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)   # M_MMAP_THRESHOLD: 32 MiB (glibc's maximum for the dynamic one)
        libc.mallopt(-1, 64 << 20)   # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _check(data: np.ndarray, qtype: T, importance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    if qtype not in _CORE:
        raise ValueError(f"{qtype.name} is not a K-quant type")
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.ndim == 1:
        data = data.reshape(1, -1)
    if data.shape[-1] % QK_K:
        raise ValueError(f"row length {data.shape[-1]} is not a multiple of {QK_K}")
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        if importance.shape[-1] != data.shape[-1]:
            raise ValueError(f"importance has {importance.shape[-1]} columns, the tensor {data.shape[-1]}")
    return data, importance


def _block_weights(importance: np.ndarray | None, data_shape: tuple[int, ...]) -> np.ndarray | None:
    """Per-column importance repeated for every row, as (rows * blocks_per_row, 256)."""
    if importance is None:
        return None
    cols = data_shape[-1]
    rows = int(np.prod(data_shape[:-1]))
    imp = importance.reshape(-1, cols)
    per_row = np.broadcast_to(imp.reshape(imp.shape[0], 1, cols), (imp.shape[0], rows // imp.shape[0], cols))
    return per_row.reshape(-1, QK_K)


@dataclass
class _BlockWeights:
    """The per-block importance rows of :func:`_block_weights`, gathered per chunk instead of materialised."""

    imp: np.ndarray              # (n_expert, blocks_per_row, 256)
    rows_per_expert: int

    @classmethod
    def of(cls, importance: np.ndarray | None, data_shape: tuple[int, ...]) -> _BlockWeights | None:
        if importance is None:
            return None
        cols = data_shape[-1]
        rows = int(np.prod(data_shape[:-1]))
        imp = importance.reshape(-1, cols // QK_K, QK_K)
        return cls(imp, rows // imp.shape[0])

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Weights of blocks ``start:stop`` (flat block indices of the whole tensor), (n, 256) contiguous."""
        b = np.arange(start, stop)
        row, col = np.divmod(b, self.imp.shape[1])
        return self.imp[row // self.rows_per_expert, col]


def _quantize_range(qtype: T, blocks: np.ndarray, weights: _BlockWeights | None, chunk: int,
                    first: int = 0, out: np.ndarray | None = None) -> np.ndarray:
    """Quantize a run of super-blocks (block ``first`` on of the tensor) ``chunk`` at a time, into ``out``."""
    if out is None:
        out = np.empty((blocks.shape[0], BLOCK_BYTES[qtype]), dtype=np.uint8)
    chunk = max(1, int(chunk * _CHUNK_SCALE.get((qtype, weights is not None), 1)))
    with np.errstate(all="ignore"):
        for start in range(0, blocks.shape[0], chunk):
            stop = min(start + chunk, blocks.shape[0])
            qw = None if weights is None else weights.rows(first + start, first + stop)
            out[start:stop] = quantize_blocks(_NUMPY, qtype, np.ascontiguousarray(blocks[start:stop]), qw)
    return out


# helper processes read their input and write their output through two memfds that live as long as this
# process: one memcpy each way onto pages that stay allocated between calls, instead of pickling through pipes
# (~25 ms per 16 MB tensor) or fresh tmpfs files (their page allocation: 6-46 ms per 16 MB, measured)


class _SharedBuffer:
    """An anonymous shared-memory file (memfd), mapped here and grown as needed. It is created before the
    pool's helpers are forked, so they hold the same descriptor."""

    KEEP = 256 << 20                     # bigger ones are given back after each call

    def __init__(self, name: str) -> None:
        self.fd = os.memfd_create(name)
        self.size = 0
        self.map: mmap.mmap | None = None

    def array(self, n: int, row: int, dtype: Any) -> np.ndarray:
        """The first ``n`` rows of ``row`` items, growing the file if needed (no array of an earlier call
        may be alive then)."""
        nbytes = n * row * np.dtype(dtype).itemsize
        if nbytes > self.size:
            self.trim(0)
            os.ftruncate(self.fd, nbytes)
            self.size = nbytes
            self.map = mmap.mmap(self.fd, nbytes)
        return np.frombuffer(self.map, dtype=dtype, count=n * row).reshape(n, row)

    def trim(self, keep: int = KEEP) -> None:
        """Give the memory back if the file is bigger than ``keep`` bytes."""
        if self.size > keep:
            if self.map is not None:
                self.map.close()
                self.map = None
            os.ftruncate(self.fd, 0)
            self.size = 0


_BUFFERS: tuple[_SharedBuffer, _SharedBuffer] | None = None
_BUFFERS_LOCK = threading.Lock()      # one call at a time uses them (a concurrent one pickles its tasks)


def _shared_buffers() -> tuple[_SharedBuffer, _SharedBuffer] | None:
    """The (input, output) memfds, made on first use; None where there is no memfd (then tasks are pickled)."""
    global _BUFFERS
    if _BUFFERS is None and hasattr(os, "memfd_create"):
        try:
            _BUFFERS = (_SharedBuffer("llmforge-kq-in"), _SharedBuffer("llmforge-kq-out"))
        except OSError:
            pass
    return _BUFFERS


def _quantize_shared(qtype: T, in_fd: int, out_fd: int, start: int, stop: int, weights: _BlockWeights | None,
                     chunk: int) -> None:
    """Helper task: blocks ``start:stop`` of the shared input (just those pages, mapped and populated in one
    call) into the shared output (one positioned write)."""
    row = QK_K * 4
    offset = start * row // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
    m = mmap.mmap(in_fd, stop * row - offset, prot=mmap.PROT_READ, offset=offset,
                  flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    blocks = np.frombuffer(m, dtype=np.float32, offset=start * row - offset).reshape(stop - start, QK_K)
    out = _quantize_range(qtype, blocks, weights, chunk, start)
    del blocks
    m.close()
    view = memoryview(out).cast("B")
    at = start * BLOCK_BYTES[qtype]
    while view.nbytes:
        written = os.pwrite(out_fd, view, at)
        view, at = view[written:], at + written


class _Helpers:
    """Tasks for the pool's helper processes, in block order: each task's input is copied into the shared
    input buffer just before it is submitted (so a helper starts as soon as its blocks are there), or,
    without shared buffers, pickled; the helpers write their outputs into the shared output buffer."""

    def __init__(self, qtype: T, blocks: np.ndarray, weights: _BlockWeights | None, out: np.ndarray,
                 helpers: int) -> None:
        self.qtype, self.blocks, self.weights, self.out = qtype, blocks, weights, out
        self.pool = worker_pool(helpers)
        self.futures: list[tuple[Any, int, int]] = []
        self.input = None
        self.locked = _BUFFERS_LOCK.acquire(blocking=False)
        self.buffers = _shared_buffers() if self.locked else None
        try:
            if self.buffers is not None:                    # (sized before any helper writes)
                self.input = self.buffers[0].array(blocks.shape[0], QK_K, np.float32)
                self.buffers[1].array(out.shape[0], out.shape[1], np.uint8)
        except BaseException:
            self.close()
            raise

    def busy(self) -> int:
        """Tasks submitted and not finished."""
        return sum(not f.done() for f, _, _ in self.futures)

    def submit(self, start: int, stop: int) -> None:
        if self.buffers is None:
            f = self.pool.submit(_quantize_range, self.qtype, self.blocks[start:stop], self.weights, CHUNK_BLOCKS,
                                 start)
        else:
            self.input[start:stop] = self.blocks[start:stop]
            f = self.pool.submit(_quantize_shared, self.qtype, self.buffers[0].fd, self.buffers[1].fd, start, stop,
                                 self.weights, CHUNK_BLOCKS)
        self.futures.append((f, start, stop))

    def collect(self) -> None:
        """Wait for every task and put its blocks into ``out``."""
        for f, start, stop in self.futures:
            result = f.result()
            if self.buffers is None:
                self.out[start:stop] = result
        if self.buffers is not None and self.futures:
            end = self.futures[-1][2]
            self.out[:end] = self.buffers[1].array(end, self.out.shape[1], np.uint8)

    def close(self) -> None:
        for f, _, _ in self.futures:       # (after an error here: the helpers must be done with the buffers)
            f.exception()
        self.input = None
        if self.locked:
            if self.buffers is not None:
                for buffer in self.buffers:
                    buffer.trim()
            _BUFFERS_LOCK.release()


def _quantize_workers(qtype: T, blocks: np.ndarray, weights: _BlockWeights | None, workers: int) -> np.ndarray:
    """``workers`` processes: this one and ``workers - 1`` pool helpers. The helpers take tasks from the
    front, each getting its next one while it has fewer than two in hand, and this process takes them
    from the back: its share is never copied, and it does not idle while the helpers work."""
    n_blocks = blocks.shape[0]
    step = max(CHUNK_BLOCKS, -(-n_blocks // (workers * 4)))
    tasks = [(s, min(s + step, n_blocks)) for s in range(0, n_blocks, step)]
    out = np.empty((n_blocks, BLOCK_BYTES[qtype]), dtype=np.uint8)
    helpers = _Helpers(qtype, blocks, weights, out, workers - 1)
    try:
        front, back = 0, len(tasks)
        while front < back:
            if helpers.busy() < 2 * (workers - 1) and front < back - 1:
                helpers.submit(*tasks[front])
                front += 1
                continue
            back -= 1
            start, stop = tasks[back]
            _quantize_range(qtype, blocks[start:stop], weights, CHUNK_BLOCKS, start, out[start:stop])
        helpers.collect()
    except BrokenProcessPool:
        drop_worker_pool()     # a helper died (e.g. the OOM killer): the next call forks a fresh pool
        raise
    finally:
        helpers.close()
    return out


_POOL: tuple[int, ProcessPoolExecutor] | None = None


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool of ``workers`` helpers kept for the session (a call with another count replaces it):
    numpy's per-op overhead holds the GIL, so threads would not scale. Its processes are forked after the
    shared buffers are made, so they hold their descriptors."""
    global _POOL
    _shared_buffers()
    if _POOL is None or _POOL[0] != workers:
        if _POOL is not None:
            _POOL[1].shutdown()
        _POOL = (workers, ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")))
    return _POOL[1]


def drop_worker_pool() -> None:
    """Forget the pool without waiting (after a helper died: the next call forks a fresh one)."""
    global _POOL
    if _POOL is not None:
        _POOL[1].shutdown(wait=False, cancel_futures=True)
        _POOL = None


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def quantize_k(data: np.ndarray, qtype: T, importance: np.ndarray | None = None,
               threads: int | None = None) -> np.ndarray:
    """Quantize float32 ``data`` (..., cols) to ``qtype`` bytes, shaped (..., row_bytes) like gguf-py.

    ``importance`` (cols,) -- or (n_expert, cols) for a 3-D tensor -- switches to llama.cpp's weighted
    quantizers. Large inputs are split over ``threads`` worker processes (default: all usable cores);
    rows are independent, so the split never changes the bytes.
    """
    data, importance = _check(data, qtype, importance)
    _keep_temporaries_on_the_heap()
    blocks = data.reshape(-1, QK_K)
    weights = _BlockWeights.of(importance, data.shape)
    workers = threads or default_workers()
    if workers == 1 or blocks.shape[0] < 4 * CHUNK_BLOCKS:
        out = _quantize_range(qtype, blocks, weights, CHUNK_BLOCKS)
    else:
        out = _quantize_workers(qtype, blocks, weights, workers)
    row_bytes = data.shape[-1] // QK_K * BLOCK_BYTES[qtype]
    return out.reshape(*data.shape[:-1], row_bytes)
