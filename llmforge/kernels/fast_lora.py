"""Fused LoRA autograd functions over a frozen (optionally NF4-quantized) base weight.

``y = x @ W.T + s * (x @ A.T) @ B.T``. W is dequantized on the fly in forward and again in backward and
is never saved; only x, A, B (and for the MLP the gate/up pre-activations) are kept for backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmforge.kernels._backend import compute_dtype, use_triton
from llmforge.kernels.activations import (ACTIVATION_KINDS, gated_backward_raw, gated_forward_raw,
                                          gated_reference)
from llmforge.kernels.nf4 import dequantize_nf4


@dataclass(frozen=True)
class LoRAWeights:
    """One projection: frozen base weight (dense or packed NF4 with its quant state) and the adapter."""
    base: torch.Tensor
    quant_state: object | None
    lora_a: torch.Tensor  # (r, in)
    lora_b: torch.Tensor  # (out, r)
    scale: float

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        if self.quant_state is None:
            return self.base.to(dtype)
        return dequantize_nf4(self.base, self.quant_state, dtype)


def _lora_forward(x: torch.Tensor, p: LoRAWeights, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """2-D ``x``; writes into ``out`` (a 2-D view) when given."""
    out = torch.mm(x, p.dense(dtype).t(), out=out)
    return out.addmm_(x @ p.lora_a.to(dtype).t(), p.lora_b.to(dtype).t(), alpha=p.scale)


def _output(shape: torch.Size, n_out: int, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fresh (non-view) output tensor: callers may rotate views of it in place (RoPE)."""
    return torch.empty(*shape[:-1], n_out, dtype=dtype, device=like.device)


def _lora_backward(dy: torch.Tensor, x: torch.Tensor, p: LoRAWeights, dtype: torch.dtype, need_a: bool,
                   need_b: bool, dx: torch.Tensor | None = None):
    """Returns (dx, dA, dB); accumulates into ``dx`` when given."""
    a, b = p.lora_a.to(dtype), p.lora_b.to(dtype)
    dy_b = dy @ b  # (N, r)
    da = (dy_b.t() @ x).mul_(p.scale).to(p.lora_a.dtype) if need_a else None
    db = (dy.t() @ (x @ a.t())).mul_(p.scale).to(p.lora_b.dtype) if need_b else None
    w = p.dense(dtype)
    if dx is None:
        dx = dy @ w
    else:
        dx.addmm_(dy, w)
    dx.addmm_(dy_b, a, alpha=p.scale)
    return dx, da, db


class LoRALinearFunction(torch.autograd.Function):
    """One LoRA projection (Q, K, V or O; any frozen-base LoRA linear)."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, base, quant_state, scale):
        dtype = compute_dtype(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        p = LoRAWeights(base, quant_state, lora_a, lora_b, scale)
        out = _output(shape, lora_b.shape[0], x, dtype)
        with torch.autocast(x.device.type, enabled=False):
            _lora_forward(x2, p, dtype, out=out.view(-1, out.shape[-1]))
        ctx.save_for_backward(x2, lora_a, lora_b)
        ctx.base, ctx.quant_state, ctx.scale, ctx.dtype, ctx.x_dtype = base, quant_state, scale, dtype, x.dtype
        return out

    @staticmethod
    def backward(ctx, dy):
        x2, lora_a, lora_b = ctx.saved_tensors
        p = LoRAWeights(ctx.base, ctx.quant_state, lora_a, lora_b, ctx.scale)
        dy2 = dy.reshape(-1, dy.shape[-1]).to(ctx.dtype)
        with torch.autocast(dy.device.type, enabled=False):
            dx, da, db = _lora_backward(dy2, x2, p, ctx.dtype, ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        dx = dx.reshape(*dy.shape[:-1], x2.shape[-1]).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return dx, da, db, None, None, None


def lora_linear(x: torch.Tensor, p: LoRAWeights) -> torch.Tensor:
    """``x @ W.T + s * (x @ A.T) @ B.T`` with W dequantized on the fly."""
    return LoRALinearFunction.apply(x, p.lora_a, p.lora_b, p.base, p.quant_state, p.scale)


def _gated(e, g, kind):
    if use_triton(e):
        return gated_forward_raw(e.contiguous(), g.contiguous(), ACTIVATION_KINDS[kind])
    return gated_reference(e, g, kind)


def _gated_grad(dh, e, g, kind):
    """(de, dg); the Triton path overwrites e and g, which the caller no longer needs."""
    if use_triton(e) and e.is_contiguous() and g.is_contiguous():
        return gated_backward_raw(dh, e, g, ACTIVATION_KINDS[kind], in_place=True)
    if use_triton(e):
        return gated_backward_raw(dh, e.contiguous(), g.contiguous(), ACTIVATION_KINDS[kind])
    with torch.enable_grad():
        e_, g_ = e.detach().float().requires_grad_(), g.detach().float().requires_grad_()
        de, dg = torch.autograd.grad(gated_reference(e_, g_, kind), (e_, g_), dh.float())
    return de.to(e.dtype), dg.to(g.dtype)


class LoRAMLPFunction(torch.autograd.Function):
    """``down(act(gate(x)) * up(x))`` with LoRA on all three projections, one autograd node."""

    @staticmethod
    def forward(ctx, x, ga, gb, ua, ub, da, db, gate_base, gate_qs, gate_s, up_base, up_qs, up_s,
                down_base, down_qs, down_s, kind):
        dtype = compute_dtype(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        gate = LoRAWeights(gate_base, gate_qs, ga, gb, gate_s)
        up = LoRAWeights(up_base, up_qs, ua, ub, up_s)
        down = LoRAWeights(down_base, down_qs, da, db, down_s)
        out = _output(shape, db.shape[0], x, dtype)
        with torch.autocast(x.device.type, enabled=False):
            e = _lora_forward(x2, gate, dtype)
            g = _lora_forward(x2, up, dtype)
            _lora_forward(_gated(e, g, kind), down, dtype, out=out.view(-1, out.shape[-1]))
        ctx.save_for_backward(x2, e, g, ga, gb, ua, ub, da, db)
        ctx.bases = (gate_base, gate_qs, gate_s), (up_base, up_qs, up_s), (down_base, down_qs, down_s)
        ctx.kind, ctx.dtype, ctx.x_dtype = kind, dtype, x.dtype
        return out

    @staticmethod
    def backward(ctx, dy):
        x2, e, g, ga, gb, ua, ub, da, db = ctx.saved_tensors
        (gw, gq, gs), (uw, uq, us), (dw, dq, ds) = ctx.bases
        gate, up, down = LoRAWeights(gw, gq, ga, gb, gs), LoRAWeights(uw, uq, ua, ub, us), LoRAWeights(dw, dq, da, db, ds)
        need = ctx.needs_input_grad
        dtype = ctx.dtype
        dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)
        with torch.autocast(dy.device.type, enabled=False):
            h = _gated(e, g, ctx.kind)  # recomputed rather than saved
            dh, d_da, d_db = _lora_backward(dy2, h, down, dtype, need[5], need[6])
            del h
            de, dg = _gated_grad(dh, e, g, ctx.kind)  # reuses e's and g's memory
            del dh, e, g
            dx, d_ga, d_gb = _lora_backward(de, x2, gate, dtype, need[1], need[2])
            dx, d_ua, d_ub = _lora_backward(dg, x2, up, dtype, need[3], need[4], dx=dx)
        dx = dx.reshape(*dy.shape[:-1], x2.shape[-1]).to(ctx.x_dtype) if need[0] else None
        return (dx, d_ga, d_gb, d_ua, d_ub, d_da, d_db) + (None,) * 10


def lora_mlp(x: torch.Tensor, gate: LoRAWeights, up: LoRAWeights, down: LoRAWeights, kind: str) -> torch.Tensor:
    """Gated LoRA MLP; ``kind`` is ``silu`` (SwiGLU) or ``gelu_pytorch_tanh`` (GeGLU)."""
    return LoRAMLPFunction.apply(x, gate.lora_a, gate.lora_b, up.lora_a, up.lora_b, down.lora_a, down.lora_b,
                                 gate.base, gate.quant_state, gate.scale, up.base, up.quant_state, up.scale,
                                 down.base, down.quant_state, down.scale, kind)


def lora_reference(x: torch.Tensor, p: LoRAWeights) -> torch.Tensor:
    """Unfused torch reference (what PEFT computes with dropout 0)."""
    dtype = x.dtype
    return x @ p.dense(dtype).t() + p.scale * (x @ p.lora_a.to(dtype).t()) @ p.lora_b.to(dtype).t()
