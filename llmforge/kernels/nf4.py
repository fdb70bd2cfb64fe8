"""NF4 dequantization for bitsandbytes' storage layout: blocks of 64 along the flattened (out x in)
weight, two 4-bit codes per byte (element 2i in the high nibble), absmax per block either fp32 or
double-quantized (uint8 codes into a 256-entry map, an fp32 scale per 256 blocks, plus an offset).

``dequantize_nf4_many`` dequantizes up to three weights (Q/K/V, gate/up) in one Triton launch into one
buffer: each launch costs host time, and a training step dequantizes every weight three times."""

from __future__ import annotations

from typing import Sequence

import torch

from llmforge.kernels._backend import triton_importable, use_triton

BYTES_PER_PROGRAM = 1024  # rounded to whole quantization blocks


def _rows_per_program(blocksize: int) -> int:
    return max(1, BYTES_PER_PROGRAM // (blocksize // 2))


def _kernel_blocksize(blocksize: int) -> bool:
    """The kernel tiles quantization blocks: a power of two of at least 2 (bitsandbytes uses 64..4096)."""
    return blocksize >= 2 and blocksize & (blocksize - 1) == 0
MAX_SEGMENTS = 3
# bitsandbytes rounds code2[q] * absmax2 to fp32 before adding the offset (two ops); a fused multiply-add
# changes the last bit of some block scales, which e4m3's rounding then shows (36 bytes in 117M on an H100)
LAUNCH_OPTIONS = dict(enable_fp_fusion=False)

if triton_importable():
    import triton
    import triton.language as tl

    from llmforge.kernels.fp8 import e4m3_bits

    @triton.jit
    def _nf4_segment(PACKED, ABSMAX, CODE2, ABSMAX2, OFFSET, NF4, OUT, pid, n_bytes, INV,
                     blocksize: tl.constexpr, blocksize2: tl.constexpr, DOUBLE: tl.constexpr, ROWS: tl.constexpr,
                     FP8: tl.constexpr):
        """``ROWS`` quantization blocks of one weight as a (ROWS, blocksize / 2) tile of bytes: one absmax per
        row, and the two nibbles of each byte interleaved into contiguous output rows. ``FP8``: the values
        times the device scalar ``INV`` (a power of two), rounded to e4m3."""
        half: tl.constexpr = blocksize // 2
        rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
        idx = rows[:, None] * half + tl.arange(0, half)[None, :]
        byte = tl.load(PACKED + idx, mask=idx < n_bytes, other=0).to(tl.int32)
        row_mask = rows * half < n_bytes
        if DOUBLE:
            q = tl.load(ABSMAX + rows, mask=row_mask, other=0).to(tl.int32)
            offset = tl.load(OFFSET)  # a device scalar: reading it on the host would synchronize
            scale = tl.load(CODE2 + q, mask=row_mask, other=0.0) * tl.load(ABSMAX2 + rows // blocksize2,
                                                                             mask=row_mask, other=0.0) + offset
        else:
            scale = tl.load(ABSMAX + rows, mask=row_mask, other=0.0)
        hi = tl.load(NF4 + (byte >> 4)) * scale[:, None]  # codes are always in [0, 16)
        lo = tl.load(NF4 + (byte & 15)) * scale[:, None]
        out_idx = rows[:, None] * blocksize + tl.arange(0, blocksize)[None, :]
        if FP8:   # OUT is the e4m3 buffer viewed as bytes
            inv = tl.load(INV)
            tl.store(OUT + out_idx, tl.interleave(e4m3_bits(hi * inv), e4m3_bits(lo * inv)).to(tl.uint8),
                     mask=out_idx < 2 * n_bytes)
        else:
            tl.store(OUT + out_idx, tl.interleave(hi, lo).to(OUT.dtype.element_ty), mask=out_idx < 2 * n_bytes)

    # one kernel per segment count: a launch's host cost grows with its argument count
    @triton.jit
    def _nf4_dequant(P0, A0, C0, M0, F0, Q0, O0, n0, INV, blocksize: tl.constexpr, blocksize2: tl.constexpr,
                     DOUBLE: tl.constexpr, ROWS: tl.constexpr, FP8: tl.constexpr):
        _nf4_segment(P0, A0, C0, M0, F0, Q0, O0, tl.program_id(0), n0, INV, blocksize, blocksize2, DOUBLE, ROWS, FP8)

    @triton.jit
    def _nf4_dequant2(P0, A0, C0, M0, F0, Q0, O0, n0, P1, A1, C1, M1, F1, Q1, O1, n1, start1, INV,
                      blocksize: tl.constexpr, blocksize2: tl.constexpr, DOUBLE: tl.constexpr, ROWS: tl.constexpr,
                      FP8: tl.constexpr):
        """Two weights: programs [0, start1) dequantize the first, the rest the second."""
        pid = tl.program_id(0)
        if pid < start1:
            _nf4_segment(P0, A0, C0, M0, F0, Q0, O0, pid, n0, INV, blocksize, blocksize2, DOUBLE, ROWS, FP8)
        else:
            _nf4_segment(P1, A1, C1, M1, F1, Q1, O1, pid - start1, n1, INV, blocksize, blocksize2, DOUBLE, ROWS, FP8)

    @triton.jit
    def _nf4_dequant3(P0, A0, C0, M0, F0, Q0, O0, n0, P1, A1, C1, M1, F1, Q1, O1, n1, start1,
                      P2, A2, C2, M2, F2, Q2, O2, n2, start2, INV,
                      blocksize: tl.constexpr, blocksize2: tl.constexpr, DOUBLE: tl.constexpr, ROWS: tl.constexpr,
                      FP8: tl.constexpr):
        """Three weights: programs [0, start1), [start1, start2) and the rest."""
        pid = tl.program_id(0)
        if pid < start1:
            _nf4_segment(P0, A0, C0, M0, F0, Q0, O0, pid, n0, INV, blocksize, blocksize2, DOUBLE, ROWS, FP8)
        elif pid < start2:
            _nf4_segment(P1, A1, C1, M1, F1, Q1, O1, pid - start1, n1, INV, blocksize, blocksize2, DOUBLE, ROWS, FP8)
        else:
            _nf4_segment(P2, A2, C2, M2, F2, Q2, O2, pid - start2, n2, INV, blocksize, blocksize2, DOUBLE, ROWS, FP8)


def _absmax_fp32(quant_state) -> torch.Tensor:
    """Per-64-block absmax as fp32, undoing the double quantization when present."""
    if not getattr(quant_state, "nested", False):
        return quant_state.absmax.float()
    nested = quant_state.state2
    codes = nested.code.to(quant_state.absmax.device)[quant_state.absmax.long()]
    scales = nested.absmax.float().repeat_interleave(nested.blocksize)[: codes.numel()]
    return codes * scales + torch.as_tensor(quant_state.offset, dtype=torch.float32, device=codes.device)


def dequantize_nf4_reference(packed: torch.Tensor, quant_state, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-torch dequantization (the fallback and the test reference)."""
    dtype = dtype or quant_state.dtype
    flat = packed.reshape(-1)
    codes = torch.stack(((flat >> 4) & 15, flat & 15), dim=1).reshape(-1).long()
    n = quant_state.shape.numel()
    absmax = _absmax_fp32(quant_state).repeat_interleave(quant_state.blocksize)[:n]
    values = quant_state.code.float().to(packed.device)[codes[:n]] * absmax
    return values.to(dtype).reshape(quant_state.shape)


def _kernel_args(packed: torch.Tensor, quant_state) -> tuple:
    """(pointers..., blocksize2, nested) for one weight, built once per quant state: the device scalar for
    the offset is created on the first call, not on every dequantization."""
    cached = getattr(quant_state, "_llmforge_nf4", None)
    if cached is not None and cached[0] is quant_state.absmax and cached[1] == packed.device:
        return cached[2]
    nested = bool(getattr(quant_state, "nested", False))
    absmax = quant_state.absmax
    if nested:
        state2 = quant_state.state2
        offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=packed.device)
        args = (absmax, state2.code, state2.absmax, offset, quant_state.code, state2.blocksize, True)
    else:  # unused pointers: the kernel reads the fp32 absmax directly
        args = (absmax, absmax, absmax, absmax, quant_state.code, 1, False)
    try:
        quant_state._llmforge_nf4 = (absmax, packed.device, args)
    except AttributeError:  # a quant state with __slots__: no caching
        pass
    return args


def _launchable(weights: Sequence[tuple[torch.Tensor, object]]) -> bool:
    """One launch needs the same block sizes and double-quant flag (they are constexprs of the kernel)."""
    if not 0 < len(weights) <= MAX_SEGMENTS:
        return False
    first = weights[0][1]
    for packed, qs in weights:
        if not use_triton(packed) or not _kernel_blocksize(qs.blocksize) or qs.blocksize != first.blocksize:
            return False
        if bool(getattr(qs, "nested", False)) != bool(getattr(first, "nested", False)):
            return False
        if getattr(qs, "nested", False) and qs.state2.blocksize != first.state2.blocksize:
            return False
    return True


def _dequantize_triton_many(weights: Sequence[tuple[torch.Tensor, object]], dtype: torch.dtype,
                            inv_scale: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``inv_scale`` (a device scalar, with ``dtype`` e4m3): the values times it, rounded to e4m3."""
    device = weights[0][0].device
    blocksize = weights[0][1].blocksize
    rows = _rows_per_program(blocksize)
    sizes = [packed.numel() for packed, _ in weights]
    out = torch.empty(2 * sum(sizes), dtype=dtype, device=device)
    segments, views, start, programs = [], [], 0, [0]
    for (packed, qs), n_bytes in zip(weights, sizes):
        absmax, code2, absmax2, offset, code, blocksize2, nested = _kernel_args(packed, qs)
        seg_out = out[start: start + 2 * n_bytes]  # two elements per byte: an odd count leaves one pad element
        target = seg_out.view(torch.uint8) if inv_scale is not None else seg_out
        segments.append((packed, absmax, code2, absmax2, offset, code, target, n_bytes))
        n = qs.shape.numel()
        views.append(seg_out.view(qs.shape) if n == 2 * n_bytes else seg_out[:n].view(qs.shape))
        start += 2 * n_bytes
        programs.append(programs[-1] + triton.cdiv(triton.cdiv(n_bytes, blocksize // 2), rows))
    n_seg = len(segments)
    if programs[-1]:
        meta = dict(blocksize=blocksize, blocksize2=blocksize2, DOUBLE=nested, ROWS=rows, FP8=inv_scale is not None,
                    **LAUNCH_OPTIONS)
        grid = (programs[-1],)
        inv = out if inv_scale is None else inv_scale       # unused pointer without FP8
        if n_seg == 1:
            _nf4_dequant[grid](*segments[0], inv, **meta)
        elif n_seg == 2:
            _nf4_dequant2[grid](*segments[0], *segments[1], programs[1], inv, **meta)
        else:
            _nf4_dequant3[grid](*segments[0], *segments[1], programs[1], *segments[2], programs[2], inv, **meta)
    return views


def _dequantize_triton(packed: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    return _dequantize_triton_many([(packed.reshape(-1), quant_state)], dtype)[0]


def _check(quant_state) -> None:
    if quant_state.quant_type != "nf4" and quant_state.quant_type != "fp4":
        raise ValueError(f"not a 4-bit quant state: {quant_state.quant_type}")


def dequantize_nf4(packed: torch.Tensor, quant_state, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight (``quant_state.shape``) from bitsandbytes' packed NF4 storage and its QuantState."""
    dtype = dtype or quant_state.dtype
    _check(quant_state)
    if use_triton(packed) and _kernel_blocksize(quant_state.blocksize):
        return _dequantize_triton_many([(packed if packed.is_contiguous() else packed.reshape(-1), quant_state)],
                                       dtype)[0]
    return dequantize_nf4_reference(packed, quant_state, dtype)


def dequantize_nf4_many(weights: Sequence[tuple[torch.Tensor, object]], dtype: torch.dtype) -> list[torch.Tensor]:
    """Dense weights of several (packed, QuantState) pairs; one Triton launch for up to three of them when
    their block layouts agree (they are rows of one buffer then), else one dequantization each."""
    for _, qs in weights:
        _check(qs)
    if _launchable(weights):
        return _dequantize_triton_many([(packed if packed.is_contiguous() else packed.reshape(-1), qs)
                                        for packed, qs in weights], dtype)
    return [dequantize_nf4(packed, qs, dtype) for packed, qs in weights]


# --------------------------------------------------------------------------------------------- FP8
def nf4_amax(quant_state) -> torch.Tensor:
    """A device scalar bounding the weight's largest magnitude: largest block absmax x largest code (exact for
    NF4, whose codes reach +-1)."""
    return _absmax_fp32(quant_state).abs().max() * quant_state.code.float().abs().max().to(quant_state.absmax.device)


def nf4_group_scale(quant_states: Sequence[object]):
    """The e4m3 scale (``fp8.GroupScale``) of a group of NF4 weights, cached on the first quant state: the frozen
    base never changes, so the amax reductions run once, not at every pass."""
    from llmforge.kernels.fp8 import GroupScale

    key = tuple(qs.absmax for qs in quant_states)
    cached = getattr(quant_states[0], "_llmforge_fp8", None)
    if cached is not None and len(cached[0]) == len(key) and all(a is b for a, b in zip(cached[0], key)):
        return cached[1]
    amaxes = [nf4_amax(qs) for qs in quant_states]
    group = GroupScale(torch.stack(amaxes).max() if len(amaxes) > 1 else amaxes[0])
    try:
        quant_states[0]._llmforge_fp8 = (key, group)
    except AttributeError:  # a quant state with __slots__: no caching
        pass
    return group


def dequantize_nf4_fp8(weights: Sequence[tuple[torch.Tensor, object]]):
    """The weights of ``weights`` (1-3 (packed, QuantState) pairs with the same input size) as one e4m3 buffer
    with one power-of-two scale for the group (``fp8.Fp8Weights``), dequantized straight to e4m3."""
    from llmforge.kernels.fp8 import E4M3, Fp8Weights

    for _, qs in weights:
        _check(qs)
    group = nf4_group_scale([qs for _, qs in weights])
    flat = [(packed if packed.is_contiguous() else packed.reshape(-1), qs) for packed, qs in weights]
    if _launchable(flat) and all(qs.shape.numel() % 2 == 0 for _, qs in flat):
        views = _dequantize_triton_many(flat, E4M3, inv_scale=group.inv)
        # even sizes: the views are consecutive rows of the kernel's one output buffer
        buffer = views[0].as_strided((sum(v.shape[0] for v in views), views[0].shape[1]), views[0].stride())
        return Fp8Weights(buffer, tuple(views), group)
    with torch.autocast(flat[0][0].device.type, enabled=False):   # CPU autocast's cat cannot take float8
        buffer = torch.cat([(dequantize_nf4_reference(p, qs, torch.float32) * group.inv).to(E4M3) for p, qs in flat])
    return Fp8Weights.stacked(buffer, [qs.shape[0] for _, qs in flat], group)
