"""Gated MLP activations ``act(e) * g``: SwiGLU (SiLU) and GeGLU with the tanh-approximate GELU that
Gemma uses. Triton kernels recompute the activation in backward instead of saving it."""

from __future__ import annotations

import math

import torch

from llmforge.kernels._backend import triton_importable, use_triton

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
BLOCK = 1024

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _act_and_grad(e, KIND: tl.constexpr):
        """Activation value and derivative at ``e`` (fp32). KIND 0 = SiLU, 1 = tanh GELU."""
        if KIND == 0:
            s = tl.sigmoid(e)
            value = e * s
            grad = s * (1.0 + e * (1.0 - s))
        else:
            inner = 0.7978845608028654 * (e + 0.044715 * e * e * e)  # sqrt(2 / pi) * (...)
            t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0  # tanh, portable to the interpreter
            value = 0.5 * e * (1.0 + t)
            grad = 0.5 * (1.0 + t) + 0.5 * e * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * e * e)
        return value, grad

    @triton.jit
    def _gated_fwd(E, G, H, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        e = tl.load(E + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        a, _ = _act_and_grad(e, KIND)
        # round the activation to the storage dtype first, as the unfused module does
        a = a.to(H.dtype.element_ty).to(tl.float32)
        tl.store(H + offs, (a * g).to(H.dtype.element_ty), mask=mask)

    @triton.jit
    def _gated_bwd(DH, E, G, DE, DG, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
        e = tl.load(E + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        a, da = _act_and_grad(e, KIND)
        tl.store(DE + offs, (dh * g * da).to(DE.dtype.element_ty), mask=mask)
        tl.store(DG + offs, (dh * a).to(DG.dtype.element_ty), mask=mask)


ACTIVATION_KINDS = {"silu": 0, "swish": 0, "gelu_pytorch_tanh": 1, "gelu_tanh": 1}


def gated_reference(e: torch.Tensor, g: torch.Tensor, kind: str) -> torch.Tensor:
    """``act(e) * g`` in plain torch (the fallback and the test reference)."""
    if ACTIVATION_KINDS[kind] == 0:
        return torch.nn.functional.silu(e) * g
    return torch.nn.functional.gelu(e, approximate="tanh") * g


def gated_forward_raw(e: torch.Tensor, g: torch.Tensor, kind: int) -> torch.Tensor:
    """Triton forward on contiguous tensors, no autograd (used inside the fused LoRA MLP)."""
    h = torch.empty_like(e)
    n = e.numel()
    if n:
        _gated_fwd[(triton.cdiv(n, BLOCK),)](e, g, h, n, KIND=kind, BLOCK=BLOCK)
    return h


def gated_backward_raw(dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor, kind: int, in_place: bool = False):
    """Triton backward on contiguous tensors: returns (de, dg); ``in_place`` writes them over e and g
    (each element is read before it is overwritten by the same program)."""
    de, dg = (e, g) if in_place else (torch.empty_like(e), torch.empty_like(g))
    n = e.numel()
    if n:
        _gated_bwd[(triton.cdiv(n, BLOCK),)](dh.contiguous(), e, g, de, dg, n, KIND=kind, BLOCK=BLOCK)
    return de, dg


class _TritonGated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, e, g, kind):
        e, g = e.contiguous(), g.contiguous()
        ctx.save_for_backward(e, g)
        ctx.kind = kind
        return gated_forward_raw(e, g, kind)

    @staticmethod
    def backward(ctx, dh):
        e, g = ctx.saved_tensors
        de, dg = gated_backward_raw(dh, e, g, ctx.kind)
        return de, dg, None


def gated_activation(e: torch.Tensor, g: torch.Tensor, kind: str) -> torch.Tensor:
    """``act(e) * g`` for ``kind`` in ACTIVATION_KINDS (``silu``: SwiGLU, ``gelu_pytorch_tanh``: GeGLU)."""
    if e.shape != g.shape or e.dtype != g.dtype or not use_triton(e, g):
        return gated_reference(e, g, kind)
    return _TritonGated.apply(e, g, ACTIVATION_KINDS[kind])


def swiglu(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``silu(e) * g``."""
    return gated_activation(e, g, "silu")


def geglu_tanh(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(e) * g`` (Gemma's MLP)."""
    return gated_activation(e, g, "gelu_pytorch_tanh")
