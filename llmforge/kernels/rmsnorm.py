"""RMSNorm forward and backward (input and weight gradients), Llama style ``w * norm(x)`` and Gemma
style ``(1 + w) * norm(x)``, as a Triton kernel with a torch fallback."""

from __future__ import annotations

import functools

import torch

from llmforge.kernels._backend import next_power_of_2, triton_importable, use_triton

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _rmsnorm_fwd(X, W, Y, RSTD, stride_x, stride_y, n_cols, eps,
                     GEMMA: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        normed = x * rstd
        if GEMMA:
            y = normed * (1.0 + w)
        else:
            # Llama rounds the normalized activations to the input dtype before scaling
            y = normed.to(X.dtype.element_ty).to(tl.float32) * w
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rmsnorm_bwd(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, n_rows, n_cols,
                     rows_per_program, GEMMA: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if GEMMA:
            w = w + 1.0
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        start = pid * rows_per_program
        for i in range(0, rows_per_program):
            row = start + i
            if row < n_rows:
                x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                rstd = tl.load(RSTD + row)
                normed = x * rstd
                dw += dy * normed
                dn = dy * w
                dx = rstd * (dn - normed * (tl.sum(dn * normed, axis=0) / n_cols))
                tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    """The Hugging Face computation, in plain torch (the fallback and the test reference)."""
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (normed * (1.0 + weight.float())).to(x.dtype)
    return weight * normed.to(x.dtype)


class _TritonRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, gemma):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        n_rows, n_cols = x2.shape
        out_dtype = x.dtype if gemma else torch.result_type(weight, x2)
        y_full = torch.empty(shape, dtype=out_dtype, device=x.device)  # returned as is: never a view
        y = y_full.view(n_rows, n_cols)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block = next_power_of_2(n_cols)
        if n_rows:
            _rmsnorm_fwd[(n_rows,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), n_cols, eps,
                                    GEMMA=gemma, BLOCK=block, num_warps=_warps(block))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.gemma, ctx.shape = gemma, shape
        return y_full

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(-1, n_cols).contiguous()
        dx = torch.empty_like(x2)
        programs = max(1, min(n_rows, 4 * _sm_count(x2.device)))
        rows_per_program = -(-n_rows // programs) if n_rows else 0
        dw_partial = torch.zeros((programs, n_cols), dtype=torch.float32, device=x2.device)
        block = next_power_of_2(n_cols)
        if n_rows:
            _rmsnorm_bwd[(programs,)](dy2, x2, weight, rstd, dx, dw_partial, dy2.stride(0), x2.stride(0),
                                      dx.stride(0), n_rows, n_cols, rows_per_program, GEMMA=ctx.gemma,
                                      BLOCK=block, num_warps=_warps(block))
        dw = dw_partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.reshape(ctx.shape), dw, None, None


def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    """RMSNorm over the last dimension; ``gemma=True`` scales by ``1 + weight``."""
    if use_triton(x, weight):
        return _TritonRMSNorm.apply(x, weight, float(eps), bool(gemma))
    return rms_norm_reference(x, weight, eps, gemma)
