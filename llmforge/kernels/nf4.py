"""NF4 dequantization for bitsandbytes' storage layout: blocks of 64 along the flattened (out x in)
weight, two 4-bit codes per byte (element 2i in the high nibble), absmax per block either fp32 or
double-quantized (uint8 codes into a 256-entry map, an fp32 scale per 256 blocks, plus an offset)."""

from __future__ import annotations

import torch

from llmforge.kernels._backend import triton_importable, use_triton

BYTES_PER_PROGRAM = 1024

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _nf4_dequant(PACKED, ABSMAX, CODE2, ABSMAX2, NF4, OUT, n_bytes, OFFSET,
                     blocksize: tl.constexpr, blocksize2: tl.constexpr, DOUBLE: tl.constexpr,
                     BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n_bytes
        byte = tl.load(PACKED + i, mask=mask, other=0).to(tl.int32)
        block = (2 * i) // blocksize  # both nibbles of a byte share a block (blocksize is even)
        if DOUBLE:
            q = tl.load(ABSMAX + block, mask=mask, other=0).to(tl.int32)
            offset = tl.load(OFFSET)  # a device scalar: reading it on the host would synchronize
            scale = tl.load(CODE2 + q, mask=mask, other=0.0) * tl.load(ABSMAX2 + block // blocksize2,
                                                                          mask=mask, other=0.0) + offset
        else:
            scale = tl.load(ABSMAX + block, mask=mask, other=0.0)
        hi = tl.load(NF4 + (byte >> 4), mask=mask, other=0.0) * scale
        lo = tl.load(NF4 + (byte & 15), mask=mask, other=0.0) * scale
        tl.store(OUT + 2 * i, hi.to(OUT.dtype.element_ty), mask=mask)
        tl.store(OUT + 2 * i + 1, lo.to(OUT.dtype.element_ty), mask=mask)


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


def _dequantize_triton(packed: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    n = quant_state.shape.numel()
    out = torch.empty(n + (n & 1), dtype=dtype, device=packed.device)
    n_bytes = packed.numel()
    nested = bool(getattr(quant_state, "nested", False))
    if nested:
        state2 = quant_state.state2
        code2, absmax2, blocksize2 = state2.code, state2.absmax, state2.blocksize
        offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=packed.device)
    else:  # unused pointers: the kernel reads the fp32 absmax directly
        code2, absmax2, blocksize2, offset = quant_state.absmax, quant_state.absmax, 1, quant_state.absmax
    if n_bytes:
        _nf4_dequant[(triton.cdiv(n_bytes, BYTES_PER_PROGRAM),)](
            packed, quant_state.absmax, code2, absmax2, quant_state.code, out, n_bytes, offset,
            blocksize=quant_state.blocksize, blocksize2=blocksize2, DOUBLE=nested, BLOCK=BYTES_PER_PROGRAM)
    return out[:n].reshape(quant_state.shape)


def dequantize_nf4(packed: torch.Tensor, quant_state, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight (``quant_state.shape``) from bitsandbytes' packed NF4 storage and its QuantState."""
    dtype = dtype or quant_state.dtype
    if quant_state.quant_type != "nf4" and quant_state.quant_type != "fp4":
        raise ValueError(f"not a 4-bit quant state: {quant_state.quant_type}")
    if use_triton(packed) and quant_state.blocksize % 2 == 0:
        return _dequantize_triton(packed.reshape(-1), quant_state, dtype)
    return dequantize_nf4_reference(packed, quant_state, dtype)
