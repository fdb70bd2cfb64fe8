"""Rotary position embedding (rotate-half convention) applied to Q and K in place, forward and backward,
plus the frequency tables (default and Llama 3 scaled) and per-token cos/sin for packed sequences."""

from __future__ import annotations

import math

import torch

from llmforge.kernels._backend import next_power_of_2, triton_importable, use_triton

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _rope_rows(X, COS, SIN, row_b, row_t, n_heads, sxb, sxh, sxt, sxd, scb, sct, scd, half,
                   BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        d = tl.arange(0, BLOCK_D)
        dmask = d < half
        c_base = row_b * scb + row_t * sct
        c1 = tl.load(COS + c_base + d * scd, mask=dmask, other=0.0).to(tl.float32)
        c2 = tl.load(COS + c_base + (d + half) * scd, mask=dmask, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + c_base + d * scd, mask=dmask, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + c_base + (d + half) * scd, mask=dmask, other=0.0).to(tl.float32)
        for h0 in range(0, n_heads, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            mask = (h[:, None] < n_heads) & dmask[None, :]
            base = X + row_b * sxb + row_t * sxt + h[:, None] * sxh
            p1 = base + d[None, :] * sxd
            p2 = base + (d[None, :] + half) * sxd
            x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
            if BACKWARD:  # transpose of the rotation
                y1 = x1 * c1[None, :] + x2 * s2[None, :]
                y2 = x2 * c2[None, :] - x1 * s1[None, :]
            else:
                y1 = x1 * c1[None, :] - x2 * s1[None, :]
                y2 = x2 * c2[None, :] + x1 * s2[None, :]
            tl.store(p1, y1.to(X.dtype.element_ty), mask=mask)
            tl.store(p2, y2.to(X.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(X, COS, SIN, n_t, n_heads, sxb, sxh, sxt, sxd, scb, sct, scd, half,
                     BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        _rope_rows(X, COS, SIN, row // n_t, row % n_t, n_heads, sxb, sxh, sxt, sxd, scb, sct, scd, half,
                   BACKWARD, BLOCK_H, BLOCK_D)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Hugging Face's ``apply_rotary_pos_emb`` in plain torch (out of place)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _as_bhtd(x: torch.Tensor, unsqueeze_dim: int) -> torch.Tensor:
    """View q/k as (batch, heads, tokens, dim) whatever the layout (no copy)."""
    return x if unsqueeze_dim == 1 else x.transpose(1, 2)


def _launch(x, cos, sin, unsqueeze_dim: int, backward: bool) -> None:
    """Rotate ``x`` (q or k) in place; one program per (batch, token) covers all heads."""
    x4 = _as_bhtd(x, unsqueeze_dim)
    batch, heads, n_t, dim = x4.shape
    cos3 = cos.expand(batch, n_t, dim) if cos.shape[0] == 1 else cos
    sin3 = sin.expand(batch, n_t, dim) if sin.shape[0] == 1 else sin
    if sin3.stride() != cos3.stride():  # the kernel indexes both with one set of strides
        cos3, sin3 = cos3.contiguous(), sin3.contiguous()
    if batch * n_t * heads == 0:
        return
    half = dim // 2
    block_d = next_power_of_2(half)
    block_h = min(next_power_of_2(heads), max(1, 4096 // block_d))
    _rope_kernel[(batch * n_t,)](x4, cos3, sin3, n_t, heads, *x4.stride(), *cos3.stride(), half,
                                 BACKWARD=backward, BLOCK_H=block_h, BLOCK_D=block_d)


class _TritonRope(torch.autograd.Function):
    """In place on one tensor: autograd allows a Function that modifies a view in place to return only
    that tensor, so Q and K are two launches."""

    @staticmethod
    def forward(ctx, x, cos, sin, unsqueeze_dim):
        _launch(x, cos, sin, unsqueeze_dim, backward=False)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim = unsqueeze_dim
        return x

    @staticmethod
    def backward(ctx, dx):
        cos, sin = ctx.saved_tensors
        dx = dx.clone()  # the incoming gradient may be shared with other consumers
        _launch(dx, cos, sin, ctx.unsqueeze_dim, backward=True)
        return dx, None, None, None


def rope_fits(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int) -> bool:
    """Whether the kernel handles these shapes (full rotary, 4-D q/k, cos/sin of shape (B or 1, T, D))."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape or unsqueeze_dim not in (1, 2):
        return False
    q4, k4 = _as_bhtd(q, unsqueeze_dim), _as_bhtd(k, unsqueeze_dim)
    b, _, t, d = q4.shape
    return (k4.shape[0] == b and k4.shape[2] == t and k4.shape[3] == d and d % 2 == 0
            and cos.shape[-1] == d and cos.shape[1] == t and cos.shape[0] in (1, b)
            and q.dtype == k.dtype and not cos.requires_grad and not sin.requires_grad)


def apply_rope_(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Rotate q and k in place (Triton) and return them; falls back to the out-of-place torch reference
    when Triton cannot run or the shapes are not handled. Same contract as HF's ``apply_rotary_pos_emb``."""
    if use_triton(q, k, cos, sin) and rope_fits(q, k, cos, sin, unsqueeze_dim):
        return _TritonRope.apply(q, cos, sin, unsqueeze_dim), _TritonRope.apply(k, cos, sin, unsqueeze_dim)
    return rope_reference(q, k, cos, sin, unsqueeze_dim)


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """``1 / theta^(2i/d)`` for i < d/2."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def llama3_inv_freq(head_dim: int, theta: float, factor: float, low_freq_factor: float,
                    high_freq_factor: float, original_max_position_embeddings: int) -> torch.Tensor:
    """Llama 3.1's scaled frequencies: long wavelengths divided by ``factor``, short ones kept, a smooth
    blend in between."""
    inv_freq = default_inv_freq(head_dim, theta)
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0,
                 dtype: torch.dtype = torch.float32):
    """cos and sin of shape (batch, tokens, head_dim) for per-token positions (packed sequences restart
    their positions at 0)."""
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq.to(position_ids.device, torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)
