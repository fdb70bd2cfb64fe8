"""Fused LoRA autograd functions over frozen (optionally NF4-quantized) base weights.

``y_i = x @ W_i.T + s_i * (x @ A_i.T) @ B_i.T`` for the projections of one input (one projection, or Q/K/V
of an attention layer in one node) and the gated MLP ``down(act(gate(x)) * up(x))`` in one node.

W is dequantized on the fly in forward and again in backward and never saved. Saved for backward: x,
``x @ A.T`` (N x r, so backward does not recompute it), the MLP's pre-activations and activation, and the
compute-dtype adapters. Projections that share an input concatenate their A's, so ``x @ A.T`` is one matmul
for the group and ``dA`` one more in backward; each B is kept pre-multiplied by its scale.

The compute-dtype adapter copies are built once per forward pass and saved for backward (not converted
again there). Callers may keep an ``AdapterCache`` per group to reuse them across passes too (the
checkpointed forward and its recompute): it rebuilds them only when a parameter's ``_version`` changes
(in-place optimizer updates bump it), when the scale or dtype changes, or when ``new_step()`` is called
(patched models call it at every top-level forward, so writes that bypass the version counter, such as
``p.data = ...``, are seen by the next step). The price is 2 bytes per LoRA parameter held all the time.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from llmforge.kernels import lora_gated
from llmforge.kernels._backend import compute_dtype, env_mib, use_triton
from llmforge.kernels.activations import (ACTIVATION_KINDS, gated_backward_raw, gated_forward_raw,
                                          gated_reference)
from llmforge.kernels.fp8 import Fp8Weights, dense_fp8, fp8_mm, fp8_shapes_ok, quantize_rows
from llmforge.kernels.layer_graphs import building_graph
from llmforge.kernels.nf4 import dequantize_nf4, dequantize_nf4_fp8, dequantize_nf4_many
from llmforge.kernels.offload import recomputing

_STEP = [0]
# cuBLAS's fast FP8 accumulation in the forward base matmuls (torchao's default; LLMFORGE_FP8_FAST_ACCUM=0: off)
FP8_FAST_ACCUM = os.environ.get("LLMFORGE_FP8_FAST_ACCUM", "1") != "0"
# Chunked MLP (``_mlp_backward_chunked``, ``_mlp_forward_chunked``): when a checkpoint's recompute may skip the MLP's
# output, its (rows, ffn) tensors are built in backward this many bytes per tensor at a time, and so are they in a
# forward without autograd (the checkpoint's first pass) (LLMFORGE_MLP_CHUNK_MIB; 0: off)
MLP_CHUNK_BYTES = [env_mib("LLMFORGE_MLP_CHUNK_MIB")]


def new_step() -> None:
    """Invalidate every ``AdapterCache`` (called by patched models at each top-level forward)."""
    _STEP[0] += 1


class LoRAWeights(NamedTuple):
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


def dense_weights(bases: tuple, dtype: torch.dtype) -> list[torch.Tensor]:
    """Dense ``dtype`` weights of ``((base, quant_state), ...)``; NF4 ones in one dequantization launch."""
    if len(bases) > 1 and all(qs is not None for _, qs in bases):
        return dequantize_nf4_many(bases, dtype)
    return [w.to(dtype) if qs is None else dequantize_nf4(w, qs, dtype) for w, qs in bases]


def fp8_weights(bases: tuple) -> Fp8Weights:
    """``((base, quant_state), ...)`` (one group: same input) as e4m3 with one scale; NF4 straight to e4m3."""
    if all(qs is not None for _, qs in bases):
        return dequantize_nf4_fp8(bases)
    return dense_fp8([w if qs is None else dequantize_nf4(w, qs, torch.float32) for w, qs in bases])


def out_features(base: torch.Tensor, quant_state) -> int:
    return base.shape[0] if quant_state is None else quant_state.shape[0]


def use_fp8(fp8: bool, x2: torch.Tensor, bases: tuple) -> bool:
    """FP8 base matmuls when asked for and the shapes allow them (else this call takes the compute dtype)."""
    return fp8 and fp8_shapes_ok(x2.shape[1], *(out_features(w, qs) for w, qs in bases))


class FrozenGroup:
    """The frozen weights of one group (same input) made ready once for one or more matmuls (row chunks): e4m3 with
    one scale (row-major for ``x @ W.T``, column-major for ``dy @ W``: cuBLAS's FP8 matmul takes only that layout),
    or dense in the compute dtype. ``outputs``/``input_grad``: which of the two products will be asked for."""
    __slots__ = ("dtype", "fp8", "views", "columns", "group", "dense")

    def __init__(self, bases: tuple, dtype: torch.dtype, fp8: bool, *, outputs: bool = True,
                 input_grad: bool = True, fw: Fp8Weights | None = None):
        self.dtype, self.fp8 = dtype, fp8
        self.views = self.columns = self.group = self.dense = None
        if fp8:
            fw = fw or fp8_weights(bases)
            self.group = fw.group
            self.views = fw.views if outputs else None
            self.columns = fw.column_major() if input_grad else None
        else:
            self.dense = dense_weights(bases, dtype)

    def outputs(self, x2: torch.Tensor, outs: list | None = None) -> list[torch.Tensor]:
        """``x2 @ W_i.T`` for each weight of the group (into ``outs[i]`` when given)."""
        if self.fp8:
            xq, x_scale = quantize_rows(x2)
            return [fp8_mm(xq, x_scale, w.t(), self.group, self.dtype, out=None if outs is None else outs[i],
                           fast_accum=FP8_FAST_ACCUM)
                    for i, w in enumerate(self.views)]
        return [torch.mm(x2, w.t(), out=None if outs is None else outs[i]) for i, w in enumerate(self.dense)]

    def input_grad(self, dys: list, out: torch.Tensor | None = None) -> torch.Tensor:
        """``sum_i dys[i] @ W_i``; with e4m3 one matmul of the concatenations (into ``out`` when given)."""
        if self.fp8:
            dq, dy_scale = quantize_rows(*dys)
            return fp8_mm(dq, dy_scale, self.columns, self.group, self.dtype, out=out)
        dx = torch.mm(dys[0], self.dense[0], out=out)
        for dy, w in zip(dys[1:], self.dense[1:]):
            dx.addmm_(dy, w)
        return dx


def base_outputs(x2: torch.Tensor, bases: tuple, dtype: torch.dtype, fp8: bool,
                 outs: list | None = None, fw: Fp8Weights | None = None) -> list[torch.Tensor]:
    """``x2 @ W_i.T`` for each frozen base of the group (into ``outs[i]`` when given); ``fp8``: e4m3 operands
    (``fw``: the group already in e4m3)."""
    return FrozenGroup(bases, dtype, fp8, input_grad=False, fw=fw).outputs(x2, outs)


def base_input_grad(dys: list, bases: tuple, dtype: torch.dtype, fp8: bool,
                    fw: Fp8Weights | None = None) -> torch.Tensor:
    """``sum_i dys[i] @ W_i`` over the frozen bases of the group; ``fp8``: one e4m3 matmul of the concatenations
    (``fw``: the group already in e4m3)."""
    return FrozenGroup(bases, dtype, fp8, outputs=False, fw=fw).input_grad(dys)


class Adapters:
    """Compute-dtype adapters of a group of projections sharing an input."""
    __slots__ = ("a", "bs", "offsets")

    def __init__(self, adapters: tuple, scales: tuple, dtype: torch.dtype):
        with torch.no_grad():
            a_s = adapters[0::2]
            self.a = (a_s[0] if len(a_s) == 1 else torch.cat(a_s)).to(dtype)  # (sum r, in)
            self.bs = tuple((b if s == 1.0 else b * s).to(dtype) for b, s in zip(adapters[1::2], scales))
        offsets = [0]
        for a in a_s:
            offsets.append(offsets[-1] + a.shape[0])
        self.offsets = tuple(offsets)

    @classmethod
    def saved(cls, a: torch.Tensor, bs: tuple, offsets: tuple) -> "Adapters":
        """The adapters that forward saved for backward."""
        self = cls.__new__(cls)
        self.a, self.bs, self.offsets = a, bs, offsets
        return self

    def columns(self, t: torch.Tensor, i: int) -> torch.Tensor:
        """Projection ``i``'s block of the columns of ``t`` (N x sum r)."""
        if len(self.bs) == 1:
            return t
        return t[:, self.offsets[i]:self.offsets[i + 1]]

    def rows(self, t: torch.Tensor, i: int) -> torch.Tensor:
        if len(self.bs) == 1:
            return t
        return t[self.offsets[i]:self.offsets[i + 1]]


class AdapterCache:
    """``Adapters`` of one group, rebuilt only when a source parameter, a scale, the dtype or the step changes."""
    __slots__ = ("_sources", "_key", "_value")

    def __init__(self) -> None:
        self._sources: tuple = ()
        self._key = None
        self._value: Adapters | None = None

    def get(self, adapters: tuple, scales: tuple, dtype: torch.dtype) -> Adapters:
        key = (_STEP[0], dtype, scales, *[t._version for t in adapters])
        sources = self._sources
        if (self._value is None or key != self._key or len(sources) != len(adapters)
                or any(s is not t for s, t in zip(sources, adapters))):
            self._value = Adapters(adapters, scales, dtype)
            self._key, self._sources = key, adapters
        return self._value


def _adapters(cache: AdapterCache | None, adapters: tuple, scales: tuple, dtype: torch.dtype) -> Adapters:
    if cache is None or building_graph():  # a CUDA graph casts its own copies: its replays see the new weights
        return Adapters(adapters, scales, dtype)
    return cache.get(adapters, scales, dtype)


def _rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.dtype == dtype else t.to(dtype)


def _output(x: torch.Tensor, n_out: int, dtype: torch.dtype) -> torch.Tensor:
    """A fresh (non-view) output tensor: callers may rotate views of it in place (RoPE)."""
    return torch.empty(*x.shape[:-1], n_out, dtype=dtype, device=x.device)


def _scaled(t: torch.Tensor | None, s: float) -> torch.Tensor | None:
    """A B gradient times its LoRA scale (in place)."""
    return t if t is None or s == 1.0 else t.mul_(s)


def _adapter_grads(ad: Adapters, dyb: torch.Tensor, dys: list, x2: torch.Tensor, xa: torch.Tensor,
                   scales: tuple, need: tuple) -> list:
    """[dA_0, dB_0, dA_1, ...] given ``dyb = [dy_i @ B_i]`` (N x sum r) and ``xa = x2 @ A.T``; left in the
    compute dtype (autograd casts each gradient to its parameter's dtype)."""
    d_a = torch.mm(dyb.t(), x2) if any(need[0::2]) else None
    grads = []
    for i, (dy, s) in enumerate(zip(dys, scales)):
        grads.append(ad.rows(d_a, i) if need[2 * i] else None)
        grads.append(_scaled(torch.mm(dy.t(), ad.columns(xa, i)), s) if need[2 * i + 1] else None)
    return grads


class _SharedInputLoRA(torch.autograd.Function):
    """LoRA projections of one input: ``x @ [A_1; ...; A_n].T`` once, then per projection the base matmul
    and the LoRA update; backward accumulates dx of all of them into one buffer.

    ``spec`` = (((base, quant_state), ...), (scale, ...), AdapterCache or None, fp8); ``adapters`` = A_1, B_1, ...
    """

    @staticmethod
    def forward(ctx, x, spec, *adapters):
        bases, scales, cache, fp8 = spec
        dtype = compute_dtype(x)
        x2 = _rows(x, dtype)
        fp8 = use_fp8(fp8, x2, bases)
        ad = _adapters(cache, adapters, scales, dtype)
        xa = torch.mm(x2, ad.a.t())
        outs = [_output(x, out_features(w, qs), dtype) for w, qs in bases]
        outs2 = [out.view(-1, out.shape[-1]) for out in outs]
        base_outputs(x2, bases, dtype, fp8, outs2)
        for i, out2 in enumerate(outs2):
            out2.addmm_(ad.columns(xa, i), ad.bs[i].t())
        ctx.save_for_backward(x2, xa, ad.a, *ad.bs)
        ctx.spec, ctx.offsets, ctx.dtype = (bases, scales, fp8), ad.offsets, dtype
        return outs[0] if len(outs) == 1 else tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        x2, xa, a, *bs = ctx.saved_tensors
        bases, scales, fp8 = ctx.spec
        ad = Adapters.saved(a, tuple(bs), ctx.offsets)
        dy2 = [_rows(dy, ctx.dtype) for dy in dys]
        dyb = [torch.mm(dy, b) for dy, b in zip(dy2, bs)]
        dyb = dyb[0] if len(dyb) == 1 else torch.cat(dyb, dim=1)
        grads = _adapter_grads(ad, dyb, dy2, x2, xa, scales, ctx.needs_input_grad[2:])
        dx = None
        if ctx.needs_input_grad[0]:
            dx = base_input_grad(dy2, bases, ctx.dtype, fp8).addmm_(dyb, a)
            dx = dx.view(*dys[0].shape[:-1], x2.shape[-1])
        return (dx, None, *grads)


class LoRALinearFunction(_SharedInputLoRA):
    """One LoRA projection (any frozen-base LoRA linear)."""


class LoRAQKVFunction(_SharedInputLoRA):
    """The Q, K and V LoRA projections of an attention layer (one input), three outputs."""


def lora_linear(x: torch.Tensor, p: LoRAWeights, cache: AdapterCache | None = None,
                fp8: bool = False) -> torch.Tensor:
    """``x @ W.T + s * (x @ A.T) @ B.T`` with W dequantized on the fly; ``fp8``: the base matmuls on e4m3
    operands (``fp8.py``)."""
    return LoRALinearFunction.apply(x, (((p.base, p.quant_state),), (p.scale,), cache, fp8), p.lora_a, p.lora_b)


def lora_qkv(x: torch.Tensor, q: LoRAWeights, k: LoRAWeights, v: LoRAWeights,
             cache: AdapterCache | None = None, fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three LoRA projections of the same ``x`` in one autograd node: (q, k, v)."""
    spec = (((q.base, q.quant_state), (k.base, k.quant_state), (v.base, v.quant_state)),
            (q.scale, k.scale, v.scale), cache, fp8)
    return LoRAQKVFunction.apply(x, spec, q.lora_a, q.lora_b, k.lora_a, k.lora_b, v.lora_a, v.lora_b)


def _lora_gated(e, g, xa, gu: "Adapters", kind):
    """``act(e + LoRA_gate) * (g + LoRA_up)``, e and g updated in place: one fused kernel when it applies."""
    b_gate, b_up = gu.bs
    rank = b_gate.shape[1]
    if rank == b_up.shape[1] == xa.shape[1] // 2 and lora_gated.fusable(e, g, rank, xa, b_gate, b_up):
        return lora_gated.lora_gated_forward(e, g, xa, b_gate.contiguous(), b_up.contiguous(), ACTIVATION_KINDS[kind])
    e.addmm_(gu.columns(xa, 0), b_gate.t())
    g.addmm_(gu.columns(xa, 1), b_up.t())
    return _gated(e, g, kind)


def _lora_gated_grad(dh, dyb_d, a_d, e, g, kind):
    """(de, dg) of ``h = act(e) * g`` for ``dh + dyb_d @ a_d``; the Triton paths overwrite e and g."""
    if lora_gated.fusable(e, g, a_d.shape[0], dyb_d, a_d) and dh.shape == e.shape:
        return lora_gated.lora_gated_backward(dh, dyb_d, a_d.contiguous(), e, g, ACTIVATION_KINDS[kind])
    return _gated_grad(dh.addmm_(dyb_d, a_d), e, g, kind)


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
    """``down(act(gate(x)) * up(x))`` with LoRA on all three projections, one autograd node.

    ``spec`` = ((gate, up, down) as (base, quant_state), (scales), kind, (gate/up cache, down cache) or None,
    fp8, into_residual); ``adapters`` = gate A, gate B, up A, up B, down A, down B. Gate and up are dequantized
    in one launch. The activation is saved rather than recomputed: it is alive during the down projection's
    backward either way. Every activation goes through ``save_for_backward`` (never a plain ``ctx`` attribute):
    non-reentrant checkpointing drops saved tensors after forward, but not ``ctx`` attributes.

    Re-run by offloaded checkpointing (``offload.recomputing()``) the node only rebuilds what its backward
    saves: when ``into_residual`` (the output only goes into the residual sum, whose backward needs no values)
    the down projection is skipped and the output is zeros; with ``fp8`` the gate/up e4m3 weights are kept for
    the backward that follows at once (one layer's worth, freed with the node).
    """

    @staticmethod
    def forward(ctx, x, spec, *adapters):
        bases, scales, kind, caches, fp8, into_residual = spec
        dtype = compute_dtype(x)
        x2 = _rows(x, dtype)
        fp8 = use_fp8(fp8, x2, bases)     # the down projection's input size is gate's output size
        recompute = recomputing()
        gu = _adapters(caches and caches[0], adapters[:4], scales[:2], dtype)
        dn = _adapters(caches and caches[1], adapters[4:], scales[2:], dtype)
        xa = torch.mm(x2, gu.a.t())
        ctx.spec, ctx.offsets, ctx.dtype = (bases, scales, kind, fp8), gu.offsets, dtype
        ctx.chunk_rows = _chunk_rows(x2.shape[0], out_features(*bases[0]), x2.element_size()) \
            if recompute and into_residual else 0
        if ctx.chunk_rows:   # backward rebuilds the MLP chunk by chunk from x2: nothing else to compute now
            ctx.fp8_gate_up = None
            ctx.save_for_backward(x2, xa, gu.a, *gu.bs, dn.a, *dn.bs)
            return _output(x, out_features(*bases[2]), dtype).zero_()
        ctx.fp8_gate_up = fp8_weights(bases[:2]) if fp8 and recompute else None
        e, g = base_outputs(x2, bases[:2], dtype, fp8, fw=ctx.fp8_gate_up)   # dense weights are dropped here
        h = _lora_gated(e, g, xa, gu, kind)
        xa_d = torch.mm(h, dn.a.t())
        out = _output(x, out_features(*bases[2]), dtype)
        if recompute and into_residual:
            out.zero_()
        else:
            out2 = out.view(-1, out.shape[-1])
            base_outputs(h, bases[2:], dtype, fp8, [out2])
            out2.addmm_(xa_d, dn.bs[0].t())
        ctx.save_for_backward(x2, xa, e, g, h, xa_d, gu.a, *gu.bs, dn.a, *dn.bs)
        return out

    @staticmethod
    def backward(ctx, dy):
        if ctx.chunk_rows:
            return _mlp_backward_chunked(ctx, dy)
        x2, xa, e, g, h, xa_d, a_gu, bg, bu, a_d, bd = ctx.saved_tensors
        bases, scales, kind, fp8 = ctx.spec
        need = ctx.needs_input_grad[2:]
        dtype = ctx.dtype
        gu, dn = Adapters.saved(a_gu, (bg, bu), ctx.offsets), Adapters.saved(a_d, (bd,), (0, a_d.shape[0]))
        dy2 = _rows(dy, dtype)
        dyb_d = torch.mm(dy2, bd)
        d_down = _adapter_grads(dn, dyb_d, [dy2], h, xa_d, scales[2:], need[4:])
        dh = base_input_grad([dy2], bases[2:], dtype, fp8)
        de, dg = _lora_gated_grad(dh, dyb_d, a_d, e, g, kind)  # reuses e's and g's memory
        del dh, e, g
        dyb = torch.cat([torch.mm(de, bg), torch.mm(dg, bu)], dim=1)
        d_gate_up = _adapter_grads(gu, dyb, [de, dg], x2, xa, scales[:2], need[:4])
        dx = None
        if ctx.needs_input_grad[0]:
            dx = base_input_grad([de, dg], bases[:2], dtype, fp8, fw=ctx.fp8_gate_up).addmm_(dyb, a_gu)
            dx = dx.view(*dy.shape[:-1], x2.shape[-1])
        ctx.fp8_gate_up = None
        return (dx, None, *d_gate_up, *d_down)


def _chunk_rows(n: int, ffn: int, element_size: int) -> int:
    """Rows per chunk of the chunked MLP backward (balanced, a multiple of 16), or 0: one pass over all ``n`` rows
    (``MLP_CHUNK_BYTES`` is 0, or one chunk would hold them all)."""
    if MLP_CHUNK_BYTES[0] <= 0:
        return 0
    rows = max(16, MLP_CHUNK_BYTES[0] // (ffn * element_size) // 16 * 16)
    if rows >= n:
        return 0
    per_chunk = -(-n // -(-n // rows))   # n split evenly over as many chunks as ``rows`` needs
    return -(-per_chunk // 16) * 16


def _mlp_backward_chunked(ctx, dy) -> tuple:
    """``LoRAMLPFunction``'s backward when its recompute deferred the MLP (``ctx.chunk_rows``): gate/up, the
    activation and every gradient are rebuilt ``chunk_rows`` rows at a time from the saved input, so the (rows, ffn)
    tensors (e, g, h, dh, de, dg and their e4m3 copies) exist for one chunk only. The frozen weights are made
    ready once for all chunks. Same values as the one-pass backward, up to the order of the LoRA sums over rows."""
    x2, xa, a_gu, bg, bu, a_d, bd = ctx.saved_tensors
    bases, scales, kind, fp8 = ctx.spec
    dtype, need, rows = ctx.dtype, ctx.needs_input_grad[2:], ctx.chunk_rows
    gu = Adapters.saved(a_gu, (bg, bu), ctx.offsets)
    dy2 = _rows(dy, dtype)
    n = x2.shape[0]
    gate_up = FrozenGroup(bases[:2], dtype, fp8, input_grad=ctx.needs_input_grad[0])
    down = FrozenGroup(bases[2:], dtype, fp8, outputs=False)

    def zeros(t, wanted):   # a float32 sum over the chunks of a (small) LoRA gradient
        return torch.zeros(t.shape, dtype=torch.float32, device=t.device) if wanted else None

    d_a_down, d_b_gate, d_b_up = zeros(a_d, need[4]), zeros(bg, need[1]), zeros(bu, need[3])
    xa_d = x2.new_empty(n, a_d.shape[0])      # h @ A_d.T, for down's B gradient
    dyb = x2.new_empty(n, a_gu.shape[0])      # [de @ B_g, dg @ B_u], for gate/up's A gradients and dx
    dx = x2.new_empty(n, x2.shape[1]) if ctx.needs_input_grad[0] else None
    for r0 in range(0, n, rows):
        part = slice(r0, min(r0 + rows, n))
        xa_c, dy_c = xa[part], dy2[part]
        e, g = gate_up.outputs(x2[part])
        h = _lora_gated(e, g, xa_c, gu, kind)
        torch.mm(h, a_d.t(), out=xa_d[part])
        dyb_d = torch.mm(dy_c, bd)
        if d_a_down is not None:
            d_a_down.add_(torch.mm(dyb_d.t(), h))
        del h
        de, dg = _lora_gated_grad(down.input_grad([dy_c]), dyb_d, a_d, e, g, kind)   # over e's and g's memory
        dyb[part] = torch.cat([torch.mm(de, bg), torch.mm(dg, bu)], dim=1)
        if d_b_gate is not None:
            d_b_gate.add_(torch.mm(de.t(), gu.columns(xa_c, 0)))
        if d_b_up is not None:
            d_b_up.add_(torch.mm(dg.t(), gu.columns(xa_c, 1)))
        if dx is not None:
            gate_up.input_grad([de, dg], out=dx[part]).addmm_(dyb[part], a_gu)
        del e, g, de, dg
    d_a_gu = torch.mm(dyb.t(), x2) if need[0] or need[2] else None
    grads = [gu.rows(d_a_gu, 0) if need[0] else None, _scaled(d_b_gate, scales[0]),
             gu.rows(d_a_gu, 1) if need[2] else None, _scaled(d_b_up, scales[1]),
             d_a_down, _scaled(torch.mm(dy2.t(), xa_d), scales[2]) if need[5] else None]
    if dx is not None:
        dx = dx.view(*dy.shape[:-1], x2.shape[-1])
    return (dx, None, *grads)


def lora_mlp(x: torch.Tensor, gate: LoRAWeights, up: LoRAWeights, down: LoRAWeights, kind: str,
             caches: tuple[AdapterCache, AdapterCache] | None = None, fp8: bool = False,
             into_residual: bool = False) -> torch.Tensor:
    """Gated LoRA MLP; ``kind`` is ``silu`` (SwiGLU) or ``gelu_pytorch_tanh`` (GeGLU); ``caches`` for the
    gate/up group and for down; ``fp8``: the base matmuls on e4m3 operands; ``into_residual``: the caller
    only adds the output to the residual stream (a checkpoint's recompute may then skip the down projection)."""
    spec = (((gate.base, gate.quant_state), (up.base, up.quant_state), (down.base, down.quant_state)),
            (gate.scale, up.scale, down.scale), kind, caches, fp8, into_residual)
    adapters = (gate.lora_a, gate.lora_b, up.lora_a, up.lora_b, down.lora_a, down.lora_b)
    if not torch.is_grad_enabled():   # a checkpoint's first forward, or inference: no graph to keep
        rows = _chunk_rows(x.numel() // x.shape[-1], out_features(gate.base, gate.quant_state), x.element_size())
        if rows:
            return _mlp_forward_chunked(x, spec, adapters, rows)
    return LoRAMLPFunction.apply(x, spec, *adapters)


def _mlp_forward_chunked(x: torch.Tensor, spec: tuple, adapters: tuple, rows: int) -> torch.Tensor:
    """The MLP without autograd, ``rows`` rows at a time (``MLP_CHUNK_BYTES``): its (rows, ffn) tensors exist for
    one chunk only; the frozen weights are made ready once."""
    bases, scales, kind, caches, fp8, _ = spec
    dtype = compute_dtype(x)
    x2 = _rows(x, dtype)
    fp8 = use_fp8(fp8, x2, bases)
    gu = _adapters(caches and caches[0], adapters[:4], scales[:2], dtype)
    dn = _adapters(caches and caches[1], adapters[4:], scales[2:], dtype)
    gate_up = FrozenGroup(bases[:2], dtype, fp8, input_grad=False)
    down = FrozenGroup(bases[2:], dtype, fp8, input_grad=False)
    xa = torch.mm(x2, gu.a.t())
    out = _output(x, out_features(*bases[2]), dtype)
    out2 = out.view(-1, out.shape[-1])
    for r0 in range(0, x2.shape[0], rows):
        part = slice(r0, r0 + rows)
        e, g = gate_up.outputs(x2[part])
        h = _lora_gated(e, g, xa[part], gu, kind)
        del e, g
        down.outputs(h, [out2[part]])
        out2[part].addmm_(torch.mm(h, dn.a.t()), dn.bs[0].t())
    return out


def lora_reference(x: torch.Tensor, p: LoRAWeights) -> torch.Tensor:
    """Unfused torch reference (what PEFT computes with dropout 0)."""
    dtype = x.dtype
    return x @ p.dense(dtype).t() + p.scale * (x @ p.lora_a.to(dtype).t()) @ p.lora_b.to(dtype).t()
