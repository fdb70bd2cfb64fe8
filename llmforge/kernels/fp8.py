"""FP8 (e4m3) operands for the frozen base matmuls of LoRA training (opt-in: ``patch_model(fp8_base=True)``).

Hopper tensor cores run e4m3 matmuls at twice the bf16 rate. With ``fp8_base`` the fused LoRA functions
(``fast_lora.py``; ``patch_model`` asks it of the MLP node only) compute every ``x @ W.T`` (forward and recompute)
and ``dy @ W`` (input gradient) of the frozen base weights as ``torch._scaled_mm`` on e4m3 operands; the LoRA matmuls, the adapters' gradients and
everything else stay in the compute dtype. This changes the numbers (3 mantissa bits per operand), unlike the
default path, which matches Hugging Face + PEFT within bf16 rounding.

Scales are powers of two, so scaling is exact and the only rounding is the one to e4m3 (round to nearest,
ties to even), done the same way by the Triton kernels and by the torch fallbacks (same bytes):

- activations and gradients: one scale per row (``quantize_rows``), the row's largest magnitude landing in
  [128, 256);
- weights: one scale per group of weights multiplied by the same input (Q/K/V, gate/up), from the group's
  largest magnitude, which for NF4 is known without reading the weight (largest block absmax x largest code)
  and is cached (the base is frozen). NF4 is dequantized straight to e4m3 (``nf4.py``), never through bf16.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from llmforge.kernels._backend import next_power_of_2, triton_importable, use_triton

E4M3 = torch.float8_e4m3fn
ROW_TOP_EXPONENT = 7          # a row's largest magnitude is scaled into [2**7, 2**8)
MIN_EXPONENT, MAX_EXPONENT = -126, 120   # 2**k and 2**-k stay normal fp32
MAX_INPUTS = 3                # quantize_rows takes up to three column blocks (dQ/dK/dV)


def fp8_supported(device: torch.device) -> tuple[bool, str]:
    """(True, "") when ``torch._scaled_mm`` can run e4m3 operands on ``device``, else (False, why)."""
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return False, f"torch {torch.__version__} has no FP8 matmul"
    if device.type == "cuda":
        # row-scaled FP8 matmuls (scale per token) run on Hopper's kernels in torch; Ada has tensor-wise scaling
        # only, and Blackwell's cuBLAS has no row-wise mode
        major, minor = torch.cuda.get_device_capability(device)
        if major != 9:
            return False, f"row-scaled FP8 matmuls need a Hopper GPU (compute capability 9.x); this one is {major}.{minor}"
    elif device.type != "cpu":
        return False, f"no FP8 matmul on {device.type}"
    return True, ""


def pow2_scale_exponent(amax: torch.Tensor) -> torch.Tensor:
    """int32 k with ``amax / 2**k`` in [128, 256) (k = 0 for a zero amax; clamped to [-126, 120])."""
    bits = amax.float().contiguous().view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) - 127 - ROW_TOP_EXPONENT
    exponent = exponent.clamp(MIN_EXPONENT, MAX_EXPONENT)
    return torch.where(amax == 0, torch.zeros_like(exponent), exponent)


def pow2(exponent: torch.Tensor) -> torch.Tensor:
    """2.0 ** exponent as float32, exactly (exponent in the normal range)."""
    return ((exponent.to(torch.int32) + 127) << 23).view(torch.float32)


# ------------------------------------------------------------------------------------------- torch
def _quantize_rows_torch(blocks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    x = blocks[0].float() if len(blocks) == 1 else torch.cat([b.float() for b in blocks], dim=1)
    amax = x.abs().amax(dim=1) if x.shape[1] else torch.zeros(x.shape[0], device=x.device)
    exponent = pow2_scale_exponent(amax)
    return (x * pow2(-exponent)[:, None]).to(E4M3), pow2(exponent)[:, None]


# ------------------------------------------------------------------------------------------ triton
if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def e4m3_bits(y):
        """The e4m3fn byte (as int32) of fp32 ``y`` (|y| <= 448), rounded to nearest, ties to even; NaN/Inf -> NaN.
        Built with integer ops: the GPU's own fp32 -> e4m3 conversion flushes subnormal results (seen on an
        H100), and the interpreter's carries mantissa overflow wrongly."""
        bits = y.to(tl.int32, bitcast=True)
        exponent = ((bits >> 23) & 0xFF) - 127
        ulp_exponent = tl.maximum(exponent, -6) - 3           # e4m3: 3 mantissa bits, subnormals below 2**-6
        inv_ulp = ((127 - ulp_exponent) << 23).to(tl.float32, bitcast=True)
        t = tl.abs(y) * inv_ulp                                # < 16: the magic number rounds half to even
        q = ((t + 12582912.0) - 12582912.0).to(tl.int32)      # the value in units of its ulp, 0..16
        carry = (q >= 16).to(tl.int32)                        # rounded up into the next binade
        normal = q >= 8
        field = tl.where(normal, ((ulp_exponent + 10 + carry) << 3) | ((q >> carry) - 8), q)
        field = tl.where(exponent == 128, 0x7F, field)         # NaN and Inf
        return tl.where(bits < 0, field | 0x80, field)

    @triton.jit
    def _row_amax(X, row, stride, width, amax, BLOCK: tl.constexpr):
        for start in range(0, width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            v = tl.load(X + row * stride + cols, mask=cols < width, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(v), axis=0))
        return amax

    @triton.jit
    def _row_store(X, row, stride, width, OUT, out_row, col0, inv, BLOCK: tl.constexpr):
        for start in range(0, width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            v = tl.load(X + row * stride + cols, mask=cols < width, other=0.0).to(tl.float32)
            q = e4m3_bits(v * inv)
            tl.store(OUT + out_row + col0 + cols, q.to(tl.uint8), mask=cols < width)

    @triton.jit
    def _transpose_kernel(SRC, DST, rows, cols, TILE: tl.constexpr):
        r = tl.program_id(0) * TILE + tl.arange(0, TILE)
        c = tl.program_id(1) * TILE + tl.arange(0, TILE)
        mask = (r[:, None] < rows) & (c[None, :] < cols)
        tile = tl.load(SRC + r[:, None].to(tl.int64) * cols + c[None, :], mask=mask, other=0)
        tl.store(DST + c[:, None].to(tl.int64) * rows + r[None, :], tl.trans(tile), mask=tl.trans(mask))

    @triton.jit
    def _quantize_rows_kernel(X0, X1, X2, S0, S1, S2, W0, W1, W2, OUT, SCALE, out_stride,
                              N_IN: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        amax = _row_amax(X0, row, S0, W0, tl.max(tl.zeros([BLOCK], tl.float32), axis=0), BLOCK)   # a tensor, not a constexpr
        if N_IN > 1:
            amax = _row_amax(X1, row, S1, W1, amax, BLOCK)
        if N_IN > 2:
            amax = _row_amax(X2, row, S2, W2, amax, BLOCK)
        bits = amax.to(tl.int32, bitcast=True)
        exponent = tl.minimum(tl.maximum(((bits >> 23) & 0xFF) - 127 - 7, -126), 120)
        exponent = tl.where(amax == 0.0, 0, exponent)
        inv = ((127 - exponent) << 23).to(tl.float32, bitcast=True)
        tl.store(SCALE + row, ((127 + exponent) << 23).to(tl.float32, bitcast=True))
        out_row = row * out_stride
        _row_store(X0, row, S0, W0, OUT, out_row, 0, inv, BLOCK)
        if N_IN > 1:
            _row_store(X1, row, S1, W1, OUT, out_row, W0, inv, BLOCK)
        if N_IN > 2:
            _row_store(X2, row, S2, W2, OUT, out_row, W0 + W1, inv, BLOCK)


def transposed(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of the transpose of the contiguous 2-D ``t``: a tiled Triton kernel (torch's strided copy
    reads a 1-byte transpose uncoalesced), or torch's copy."""
    if not (use_triton(t) and t.dim() == 2 and t.is_contiguous() and t.numel()):
        return t.t().contiguous()
    rows, cols = t.shape
    raw = t.view(torch.uint8) if t.element_size() == 1 else t
    out = torch.empty(cols, rows, dtype=raw.dtype, device=t.device)
    tile = 64
    _transpose_kernel[(triton.cdiv(rows, tile), triton.cdiv(cols, tile))](raw, out, rows, cols, TILE=tile)
    return out.view(t.dtype)


def quantize_rows(*blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 rows of ``torch.cat(blocks, dim=1)`` (1-3 2-D blocks, same rows) and their fp32 scales, shape (M, 1):
    ``out.float() * scale`` approximates the input. The concatenation is never built in the compute dtype."""
    if not 0 < len(blocks) <= MAX_INPUTS:
        raise ValueError(f"quantize_rows takes 1 to {MAX_INPUTS} blocks, got {len(blocks)}")
    rows = blocks[0].shape[0]
    if any(b.dim() != 2 or b.shape[0] != rows for b in blocks):
        raise ValueError("quantize_rows: blocks must be 2-D with the same number of rows")
    if not (use_triton(*blocks) and rows):
        return _quantize_rows_torch(blocks)
    blocks = tuple(b if b.stride(-1) == 1 else b.contiguous() for b in blocks)
    widths = [b.shape[1] for b in blocks]
    out = torch.empty(rows, sum(widths), dtype=E4M3, device=blocks[0].device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=blocks[0].device)
    padded = list(blocks) + [blocks[0]] * (MAX_INPUTS - len(blocks))
    strides = [b.stride(0) for b in padded]
    widths_padded = widths + [0] * (MAX_INPUTS - len(blocks))
    block = min(next_power_of_2(max(widths)), 2048)
    _quantize_rows_kernel[(rows,)](*padded, *strides, *widths_padded, out.view(torch.uint8), scale, out.stride(0),
                                   N_IN=len(blocks), BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return out, scale


class GroupScale:
    """A weight group's power-of-two scale (device scalars: no host sync) and the (1, n) rows of it that
    ``_scaled_mm`` takes, kept per n (frozen weights: callers cache one per group)."""
    __slots__ = ("scale", "inv", "_rows")

    def __init__(self, amax: torch.Tensor):
        exponent = pow2_scale_exponent(amax.reshape(1))
        self.scale, self.inv = pow2(exponent)[0], pow2(-exponent)
        self._rows: dict[int, torch.Tensor] = {}

    def row(self, n: int) -> torch.Tensor:
        row = self._rows.get(n)
        if row is None:
            row = self._rows[n] = self.scale.reshape(1, 1).expand(1, n).contiguous()
        return row


class Fp8Weights(NamedTuple):
    """A group of frozen weights (rows of one e4m3 buffer, ``views`` per weight) and their shared scale."""
    buffer: torch.Tensor         # (sum out, in) e4m3, row-major
    views: tuple                 # each weight's (out_i, in) rows of ``buffer``
    group: GroupScale            # weight ~= e4m3 * group.scale

    @property
    def scale(self) -> torch.Tensor:
        return self.group.scale

    @classmethod
    def stacked(cls, buffer: torch.Tensor, out_sizes: Sequence[int], group: GroupScale) -> "Fp8Weights":
        """The group whose weights are ``out_sizes`` consecutive rows of ``buffer``."""
        views, start = [], 0
        for rows in out_sizes:
            views.append(buffer[start:start + rows])
            start += rows
        return cls(buffer, tuple(views), group)

    def column_major(self) -> torch.Tensor:
        """The whole group as ``_scaled_mm``'s second operand for ``dy_cat @ W_cat``: (sum out, in), column-major."""
        return transposed(self.buffer).t()


def fp8_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: GroupScale,
           out_dtype: torch.dtype, out: torch.Tensor | None = None, fast_accum: bool = False) -> torch.Tensor:
    """``(a * a_scale) @ (b * b_scale)`` for e4m3 ``a`` (M, K), row-major with row scales (M, 1), and ``b`` (K, N),
    column-major with one scale; in ``out_dtype`` (into ``out`` when given). ``fast_accum``: cuBLAS's faster,
    less precise accumulation (torchao's choice for the forward matmul, not for the gradients')."""
    b_scales = b_scale.row(b.shape[1])
    if a.is_cuda and out_dtype != torch.bfloat16:     # cuBLAS's row-scaled FP8 matmul writes bf16 only
        result = fp8_mm(a, a_scale, b, b_scale, torch.bfloat16, fast_accum=fast_accum).to(out_dtype)
        return result if out is None else out.copy_(result)
    kwargs = dict(scale_a=a_scale, scale_b=b_scales, out_dtype=out_dtype, use_fast_accum=fast_accum and a.is_cuda)
    if out is not None:
        return torch._scaled_mm(a, b, **kwargs, out=out)
    return torch._scaled_mm(a, b, **kwargs)


def fp8_shapes_ok(*dims: int) -> bool:
    """cuBLAS's FP8 matmuls need every dimension a multiple of 16."""
    return all(d % 16 == 0 and d > 0 for d in dims)


def dense_fp8(weights: Sequence[torch.Tensor]) -> Fp8Weights:
    """A group of dense frozen weights (same input size) as e4m3 with one power-of-two scale (torch ops; the
    NF4 bases go through ``nf4.dequantize_nf4_fp8`` instead)."""
    w = weights[0].float() if len(weights) == 1 else torch.cat([t.float() for t in weights])
    group = GroupScale(w.abs().amax())
    return Fp8Weights.stacked((w * group.inv).to(E4M3), [t.shape[0] for t in weights], group)
