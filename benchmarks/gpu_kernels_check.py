#!/usr/bin/env python3
"""GPU correctness of llmforge's kernels at real sizes in bf16, then a full patched QLoRA training step.

1. Every kernel (RMSNorm and its Gemma variant, RoPE on Q/K with Llama 3 frequencies and packed
   positions, SwiGLU, GeGLU, fused linear + CE with ignored rows and softcap, NF4 dequantization,
   fused LoRA linear, Q/K/V and MLP over NF4 bases) against a float32 torch reference computed from the same
   bf16 inputs: forward and every gradient, as relative L2 errors; NF4 against bitsandbytes' own
   dequantization of the same stored weights. Also the time of ours vs the unfused bf16 torch version.
2. Random Llama-3.2-1B and Llama-3.1-8B shaped models, NF4 double quant (bitsandbytes), LoRA r=16 on all
   7 projections (random B so every LoRA weight gets a gradient), gradient checkpointing: one step
   unpatched, then ``patch_model`` and the same step; loss and all LoRA gradients must agree within
   bf16 tolerance.
3. ``--host-weights``: only the vocabulary-streaming cross-entropy (lm_head in pinned host memory) at the 8B
   size against the fused CE (W on the device) and the float32 reference: loss and d hidden, time, peak
   memory above the inputs, host-to-device bandwidth.

Prints a table; exits 1 when any check fails. ``--small`` (with TRITON_INTERPRET=1 on a CPU) is a smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmforge.kernels import activations, cross_entropy, fast_lora, lora_gated, nf4, rmsnorm, rope  # noqa: E402
from llmforge.kernels._backend import interpreting  # noqa: E402

ROWS: list[dict] = []
KERNEL_TOL = 2e-2   # relative L2 error of a bf16 kernel vs the float32 reference
FP8_TOL = 0.1       # the same with e4m3 base-matmul operands (about 5% expected)
STEP_LOSS_TOL = 2e-2  # absolute, on a loss of about 12

# name -> (hidden, ffn, layers, heads, kv heads, vocab, tied)
SHAPES = {"1b": (2048, 8192, 16, 32, 8, 128256, True), "8b": (4096, 14336, 32, 32, 8, 128256, False),
          "tiny": (64, 192, 2, 4, 2, 1000, False)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def record(group: str, name: str, err: float, tol: float, extra: str = "") -> None:
    ok = err == err and err <= tol
    ROWS.append({"group": group, "check": name, "error": err, "tol": tol, "ok": ok, "extra": extra})


def timed(fn, device: torch.device, reps: int = 5) -> float:
    """Median ms of ``fn()`` (forward + backward), after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def grads_of(fn, inputs, dy):
    """Output and gradients of ``fn(*inputs)`` for upstream gradient ``dy``."""
    leaves = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    out = fn(*leaves)
    out.backward(dy)
    return out.detach(), [x.grad for x in leaves if x.requires_grad]


def compare(group: str, fn, ref, inputs, dy, names, device, speed_ref=None) -> None:
    out, grads = grads_of(fn, inputs, dy)
    out_r, grads_r = grads_of(ref, [x.float() if x.is_floating_point() else x for x in inputs], dy.float())
    record(group, "forward", rel(out, out_r), KERNEL_TOL)
    for n, g, gr in zip(names, grads, grads_r):
        record(group, f"d{n}", rel(g, gr), KERNEL_TOL)
    if speed_ref is not None:
        ours = timed(lambda: grads_of(fn, inputs, dy), device)
        theirs = timed(lambda: grads_of(speed_ref, inputs, dy), device)
        ROWS[-1]["extra"] = f"fwd+bwd {ours:.2f} ms vs torch bf16 {theirs:.2f} ms ({theirs / ours:.2f}x)"


def check_kernels(device: torch.device, small: bool) -> None:
    g = torch.Generator(device=device).manual_seed(0)
    bf16 = torch.bfloat16
    rows, hidden, ffn, vocab = (37, 200, 320, 1000) if small else (8192, 4096, 14336, 128256)

    def randn(*shape, scale=1.0, dtype=bf16):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    # RMSNorm, both variants
    x = randn(rows, hidden).requires_grad_()
    for gemma in (False, True):
        w = (randn(hidden, scale=0.1) + (0 if gemma else 1)).requires_grad_()
        compare(f"rmsnorm{' gemma' if gemma else ''} {rows}x{hidden}",
                lambda a, b: rmsnorm.rms_norm(a, b, 1e-6, gemma),
                lambda a, b: rmsnorm.rms_norm_reference(a, b, 1e-6, gemma),
                [x, w], randn(rows, hidden), ["x", "w"], device,
                speed_ref=lambda a, b: rmsnorm.rms_norm_reference(a, b, 1e-6, gemma))

    # RoPE: (B, T, H*D) projections viewed as (B, H, T, D); Llama 3 frequencies; two packed documents
    batch, n_t, hq, hk, dim = (2, 24, 4, 2, 16) if small else (2, 2048, 32, 8, 128)
    inv = rope.llama3_inv_freq(dim, 500000.0, 8.0, 1.0, 4.0, 8192)
    pos = torch.cat([torch.arange(n_t // 2), torch.arange(n_t - n_t // 2)]).to(device).repeat(batch, 1)
    cos, sin = rope.rope_cos_sin(pos, inv, dtype=bf16)

    def rope_fn(qp, kp, fast=True):
        q = (qp * 1).view(batch, n_t, hq, dim).transpose(1, 2)
        k = (kp * 1).view(batch, n_t, hk, dim).transpose(1, 2)
        c, s = (cos, sin) if qp.dtype == bf16 else (cos.float(), sin.float())
        q2, k2 = (rope.apply_rope_ if fast else rope.rope_reference)(q, k, c, s)
        return torch.cat([q2.reshape(-1), k2.reshape(-1)])

    qp, kp = randn(batch, n_t, hq * dim).requires_grad_(), randn(batch, n_t, hk * dim).requires_grad_()
    compare(f"rope q{hq}/k{hk} heads T={n_t}", rope_fn, lambda a, b: rope_fn(a, b, fast=False), [qp, kp],
            randn(batch * n_t * (hq + hk) * dim), ["q", "k"], device, speed_ref=lambda a, b: rope_fn(a, b, fast=False))

    # gated activations
    e, gg = randn(rows, ffn).requires_grad_(), randn(rows, ffn).requires_grad_()
    for kind in ("silu", "gelu_pytorch_tanh"):
        compare(f"{'swiglu' if kind == 'silu' else 'geglu-tanh'} {rows}x{ffn}",
                lambda a, b: activations.gated_activation(a, b, kind),
                lambda a, b: activations.gated_reference(a, b, kind), [e, gg], randn(rows, ffn), ["e", "g"], device,
                speed_ref=lambda a, b: activations.gated_reference(a, b, kind))

    # fused linear + cross-entropy: ignored rows, an all-ignored tail, softcap, W trained
    h = randn(rows, hidden).requires_grad_()
    w = randn(vocab, hidden, scale=hidden ** -0.5 * 4).requires_grad_()
    labels = torch.randint(0, vocab, (rows,), generator=g, device=device)
    labels[::5] = -100
    labels[-max(1, rows // 16):] = -100
    for cap in (None, 30.0):
        def ce_ours(a, b):
            return cross_entropy.fused_linear_cross_entropy(a, b, labels, softcap=cap,
                                                            chunk_rows=max(1, rows // 3))

        def ce_ref(a, b):
            return cross_entropy.linear_cross_entropy_reference(a.float(), b.float(), labels, softcap=cap)

        compare(f"linear+CE V={vocab}{' softcap' if cap else ''}", ce_ours, ce_ref, [h, w],
                torch.ones((), device=device), ["hidden", "W"], device, speed_ref=lambda a, b: ce_ref(a.to(bf16), b.to(bf16)))

    # NF4: ours vs bitsandbytes on the same stored weights (fp32 and double-quantized absmax)
    import bitsandbytes.functional as bnbf

    dense = randn(ffn, hidden, scale=0.02)
    for nested in (True, False):
        packed, qs = bnbf.quantize_4bit(dense, compress_statistics=nested, quant_type="nf4", blocksize=64)
        group = f"nf4 dequant {ffn}x{hidden}{' double-quant' if nested else ''}"
        for dtype, tol in ((torch.float32, 1e-6), (bf16, 1e-2)):  # bnb's CPU path rounds twice in bf16
            ours = nf4.dequantize_nf4(packed, qs, dtype)
            qs_as = copy.copy(qs)
            qs_as.dtype = dtype  # bitsandbytes dequantizes into quant_state.dtype
            theirs = bnbf.dequantize_4bit(packed, qs_as)
            diff = float((ours.float() - theirs.float()).abs().max())
            record(group, f"vs bitsandbytes ({str(dtype)[6:]})", rel(ours, theirs), tol,
                   f"max |diff| {diff:.3g}, equal {float((ours == theirs).float().mean()):.4%}")
        if nested and device.type == "cuda":
            t_ours = timed(lambda: nf4.dequantize_nf4(packed, qs, bf16), device)
            t_bnb = timed(lambda: bnbf.dequantize_4bit(packed, qs), device)
            ROWS[-1]["extra"] += f"; {t_ours:.3f} ms vs bnb {t_bnb:.3f} ms"

    # fused LoRA over NF4 bases
    r = 16
    x = randn(rows // 2, hidden).requires_grad_()

    def quant(out_f, in_f):
        packed, qs = bnbf.quantize_4bit(randn(out_f, in_f, scale=0.02), compress_statistics=True,
                                        quant_type="nf4", blocksize=64)
        return packed, qs

    def adapter(out_f, in_f):
        return (randn(r, in_f, scale=in_f ** -0.5, dtype=torch.float32).requires_grad_(),
                randn(out_f, r, scale=0.02, dtype=torch.float32).requires_grad_())

    pq, qs = quant(hidden, hidden)
    a, b = adapter(hidden, hidden)

    def lin(xx, aa, bb):
        return fast_lora.lora_linear(xx, fast_lora.LoRAWeights(pq, qs, aa, bb, 2.0))

    def lin_ref(xx, aa, bb):
        return fast_lora.lora_reference(xx.float(), fast_lora.LoRAWeights(pq, qs, aa.float(), bb.float(), 2.0))

    compare(f"LoRA linear NF4 {hidden}x{hidden} r{r}", lin, lin_ref, [x, a, b], randn(rows // 2, hidden),
            ["x", "A", "B"], device)

    # Q/K/V in one node (GQA: K and V are a quarter of Q), adapter casts cached as patch_model does
    kv_dim = hidden // 4
    qkv_bases = [quant(hidden, hidden), quant(kv_dim, hidden), quant(kv_dim, hidden)]
    qkv_ab = [t for out_f in (hidden, kv_dim, kv_dim) for t in adapter(out_f, hidden)]

    def qkv_weights(ab, ref=False):
        return [fast_lora.LoRAWeights(p, q, aa.float() if ref else aa, bb.float() if ref else bb, s)
                for (p, q), aa, bb, s in zip(qkv_bases, ab[0::2], ab[1::2], (2.0, 0.5, 1.0))]

    def qkv(xx, *ab):
        return torch.cat([t.reshape(-1) for t in fast_lora.lora_qkv(xx, *qkv_weights(ab), fast_lora.AdapterCache())])

    def qkv_ref(xx, *ab):
        return torch.cat([fast_lora.lora_reference(xx.float(), w).reshape(-1) for w in qkv_weights(ab, ref=True)])

    def qkv_separate(xx, *ab):  # the previous path: one node per projection
        return torch.cat([fast_lora.lora_linear(xx, w).reshape(-1) for w in qkv_weights(ab)])

    compare(f"LoRA QKV NF4 {hidden}->{hidden}+2x{kv_dim} r{r}", qkv, qkv_ref, [x, *qkv_ab],
            randn((rows // 2) * (hidden + 2 * kv_dim)), ["x", "qA", "qB", "kA", "kB", "vA", "vB"], device,
            speed_ref=qkv_separate)
    ROWS[-1]["extra"] = ROWS[-1]["extra"].replace("torch bf16", "3 separate LoRA nodes")

    gate, up, down = quant(ffn, hidden), quant(ffn, hidden), quant(hidden, ffn)
    ga, gb = adapter(ffn, hidden)
    ua, ub = adapter(ffn, hidden)
    da, db = adapter(hidden, ffn)
    for kind in ("silu", "gelu_pytorch_tanh"):
        def mlp(xx, *ab, ref=False):
            ws = [fast_lora.LoRAWeights(p, q, aa.float() if ref else aa, bb.float() if ref else bb, 2.0)
                  for (p, q), aa, bb in zip((gate, up, down), ab[0::2], ab[1::2])]
            if not ref:
                return fast_lora.lora_mlp(xx, *ws, kind)
            xx = xx.float()
            hmid = activations.gated_reference(fast_lora.lora_reference(xx, ws[0]), fast_lora.lora_reference(xx, ws[1]), kind)
            return fast_lora.lora_reference(hmid, ws[2])

        compare(f"LoRA MLP NF4 {hidden}->{ffn} {kind}", mlp, lambda *t: mlp(*t, ref=True),
                [x, ga, gb, ua, ub, da, db], randn(rows // 2, hidden), ["x", "gA", "gB", "uA", "uB", "dA", "dB"], device)
    check_chunked_mlp(device, (gate, up, down), [ga, gb, ua, ub, da, db], x, randn(rows // 2, hidden))


def check_chunked_mlp_alone(device: torch.device, small: bool) -> None:
    """``check_chunked_mlp`` at the 8B MLP's sizes (4096 rows: batch 2 x 2048) on fresh random NF4 weights."""
    import bitsandbytes.functional as bnbf

    g = torch.Generator(device=device).manual_seed(0)
    rows, hidden, ffn, r = (40, 64, 160, 4) if small else (4096, 4096, 14336, 16)

    def randn(*shape, scale=1.0, dtype=torch.bfloat16):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    def quant(out_f, in_f):
        return bnbf.quantize_4bit(randn(out_f, in_f, scale=0.02), compress_statistics=True, quant_type="nf4",
                                  blocksize=64)

    adapters = []
    for out_f, in_f in ((ffn, hidden), (ffn, hidden), (hidden, ffn)):
        adapters += [randn(r, in_f, scale=in_f ** -0.5, dtype=torch.float32),
                     randn(out_f, r, scale=0.02, dtype=torch.float32)]
    check_chunked_mlp(device, (quant(ffn, hidden), quant(ffn, hidden), quant(hidden, ffn)), adapters,
                      randn(rows, hidden), randn(rows, hidden))


def check_chunked_mlp(device: torch.device, bases: tuple, adapters: list, x: torch.Tensor, dy: torch.Tensor) -> None:
    """The chunked MLP backward (``LLMFORGE_MLP_CHUNK_MIB``) of a checkpointed block ``h + MLP(h)``, exact and FP8:
    its gradients vs the one-pass backward's, and both backwards' time and memory (peak over what was allocated when
    backward started)."""
    from llmforge.kernels import offload
    from llmforge.kernels.fp8 import fp8_supported

    ffn = bases[0][1].shape[0]
    chunk_bytes = (32 << 20) if x.shape[0] >= 1024 else 16 * ffn * x.element_size()
    names = ["x", "gA", "gB", "uA", "uB", "dA", "dB"]

    def run(fp8: bool, chunk: int):
        fast_lora.MLP_CHUNK_BYTES[0] = chunk

        def block(h, *ab):
            ws = [fast_lora.LoRAWeights(p, q, aa, bb, 2.0) for (p, q), aa, bb in zip(bases, ab[0::2], ab[1::2])]
            return h + fast_lora.lora_mlp(h, *ws, "silu", None, fp8, True)

        leaves = [t.detach().clone().requires_grad_() for t in (x, *adapters)]
        out = offload.offloaded_checkpoint(block, *leaves)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        out.backward(dy)
        peak = (torch.cuda.max_memory_allocated() - start) / 2**20 if device.type == "cuda" else float("nan")
        return [t.grad for t in leaves], peak

    saved = fast_lora.MLP_CHUNK_BYTES[0]
    try:
        for fp8 in (False, True) if fp8_supported(device)[0] else (False,):
            whole, whole_mib = run(fp8, 0)
            chunked, chunk_mib = run(fp8, chunk_bytes)
            group = f"chunked MLP backward ({'fp8' if fp8 else 'exact'}, {fast_lora._chunk_rows(x.shape[0], ffn, x.element_size())} rows a chunk) vs one pass"
            for n, g, g_whole in zip(names, chunked, whole):
                record(group, f"d{n}", rel(g, g_whole), KERNEL_TOL)
            t_whole = timed(lambda: run(fp8, 0), device)
            t_chunk = timed(lambda: run(fp8, chunk_bytes), device)
            ROWS[-1]["extra"] = (f"forward + backward {t_chunk:.2f} ms vs {t_whole:.2f} ms one pass; backward peak "
                                 f"{chunk_mib:.0f} MiB vs {whole_mib:.0f} MiB")
    finally:
        fast_lora.MLP_CHUNK_BYTES[0] = saved


def fp8_tolerance(n: int) -> None:
    """The last ``n`` rows are judged at FP8's tolerance (``compare`` records them at bf16's)."""
    for row in ROWS[-n:]:
        row["tol"], row["ok"] = FP8_TOL, row["error"] <= FP8_TOL


def check_fp8(device: torch.device, small: bool) -> None:
    """FP8 base matmuls (``train.fp8``): the e4m3 row quantizer and NF4 -> e4m3 write the torch fallback's bytes on
    the device; the fp8 LoRA nodes vs the float32 reference (FP8's error, not bf16's) and their time vs the exact
    fused nodes."""
    import bitsandbytes.functional as bnbf

    from llmforge.kernels import fp8

    g = torch.Generator(device=device).manual_seed(0)
    bf16 = torch.bfloat16
    rows, hidden, ffn, r = (32, 64, 160, 4) if small else (4096, 4096, 14336, 16)

    def randn(*shape, scale=1.0, dtype=bf16):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    blocks = [randn(rows, ffn), randn(rows, ffn, scale=1e-3), randn(rows, hidden // 4, scale=30.0)]
    for n in (1, 3):
        q, s = fp8.quantize_rows(*blocks[:n])
        qr, sr = fp8._quantize_rows_torch(blocks[:n])
        differ = float((q.view(torch.uint8) != qr.view(torch.uint8)).float().mean()) + float((s != sr).float().mean())
        record("fp8", f"quantize_rows {n} block(s) {rows}x{q.shape[1]}: differing bytes", differ, 0.0)
    weights = [bnbf.quantize_4bit(randn(out_f, in_f, scale=0.02), compress_statistics=True, quant_type="nf4",
                                  blocksize=64) for out_f, in_f in ((ffn, hidden), (ffn, hidden))]
    fw = nf4.dequantize_nf4_fp8(weights)
    dense = torch.cat([nf4.dequantize_nf4_reference(p, q, torch.float32) for p, q in weights])
    want = (dense * (1.0 / fw.scale)).to(fp8.E4M3)
    record("fp8", f"NF4 -> e4m3 gate+up {2 * ffn}x{hidden}: differing bytes",
           float((fw.buffer.view(torch.uint8) != want.view(torch.uint8)).float().mean()), 0.0)
    t_nf4 = timed(lambda: nf4.dequantize_nf4_fp8(weights), device)
    t_bf16 = timed(lambda: nf4.dequantize_nf4_many(weights, bf16), device)
    ROWS[-1]["extra"] = f"{t_nf4:.3f} ms (to bf16: {t_bf16:.3f} ms)"
    moved = fp8.transposed(fw.buffer)
    record("fp8", "transposed e4m3 gate+up: differing bytes",
           float((moved.view(torch.uint8) != fw.buffer.view(torch.uint8).t()).float().mean()), 0.0,
           f"Triton {timed(lambda: fp8.transposed(fw.buffer), device):.3f} ms, "
           f"torch .t().contiguous() {timed(lambda: fw.buffer.t().contiguous(), device):.3f} ms")

    def quant(out_f, in_f):
        return bnbf.quantize_4bit(randn(out_f, in_f, scale=0.02), compress_statistics=True, quant_type="nf4",
                                  blocksize=64)

    def adapter(out_f, in_f):
        return (randn(r, in_f, scale=in_f ** -0.5, dtype=torch.float32).requires_grad_(),
                randn(out_f, r, scale=0.02, dtype=torch.float32).requires_grad_())

    x = randn(rows, hidden).requires_grad_()
    gate, up, down = quant(ffn, hidden), quant(ffn, hidden), quant(hidden, ffn)
    mlp_ab = [*adapter(ffn, hidden), *adapter(ffn, hidden), *adapter(hidden, ffn)]

    def mlp(xx, *ab, use_fp8=True, ref=False):
        ws = [fast_lora.LoRAWeights(p, q, aa.float() if ref else aa, bb.float() if ref else bb, 2.0)
              for (p, q), aa, bb in zip((gate, up, down), ab[0::2], ab[1::2])]
        if not ref:
            return fast_lora.lora_mlp(xx, *ws, "silu", None, use_fp8)
        xx = xx.float()
        hmid = activations.gated_reference(fast_lora.lora_reference(xx, ws[0]), fast_lora.lora_reference(xx, ws[1]),
                                           "silu")
        return fast_lora.lora_reference(hmid, ws[2])

    compare(f"fp8 LoRA MLP NF4 {hidden}->{ffn} (FP8 tolerance)", mlp, lambda *t: mlp(*t, ref=True),
            [x, *mlp_ab], randn(rows, hidden), ["x", "gA", "gB", "uA", "uB", "dA", "dB"], device,
            speed_ref=lambda *t: mlp(*t, use_fp8=False))
    ROWS[-1]["extra"] = ROWS[-1]["extra"].replace("torch bf16", "the exact fused MLP")
    mlp_inputs, mlp_dy = [x, *mlp_ab], randn(rows, hidden)
    fast_lora.FP8_FAST_ACCUM = False
    slow = timed(lambda: grads_of(mlp, mlp_inputs, mlp_dy), device)
    fast_lora.FP8_FAST_ACCUM = True
    fast = timed(lambda: grads_of(mlp, mlp_inputs, mlp_dy), device)
    ROWS[-1]["extra"] += f"; forward fast accumulation on {fast:.2f} ms, off {slow:.2f} ms"
    fp8_tolerance(8)
    # the exact node at the same size (bf16 tolerance), then both nodes with the LoRA terms fused into the
    # activation kernels (lora_gated.py) and without
    compare(f"LoRA MLP NF4 {hidden}->{ffn} (exact)", lambda *t: mlp(*t, use_fp8=False),
            lambda *t: mlp(*t, ref=True), mlp_inputs, mlp_dy, ["x", "gA", "gB", "uA", "uB", "dA", "dB"], device)

    def node_ms(fused: bool, use_fp8: bool) -> float:
        lora_gated.ENABLED["value"] = fused
        try:
            return timed(lambda: grads_of(lambda *t: mlp(*t, use_fp8=use_fp8), mlp_inputs, mlp_dy), device)
        finally:
            lora_gated.ENABLED["value"] = True

    ROWS[-1]["extra"] = "fwd+bwd, LoRA fused into the activation vs addmm_: " + ", ".join(
        f"{'fp8' if f8 else 'exact'} {node_ms(True, f8):.2f} vs {node_ms(False, f8):.2f} ms" for f8 in (True, False))

    kv = hidden // 4
    qkv_bases = [quant(hidden, hidden), quant(kv, hidden), quant(kv, hidden)]
    qkv_ab = [t for out_f in (hidden, kv, kv) for t in adapter(out_f, hidden)]

    def qkv(xx, *ab, use_fp8=True, ref=False):
        ws = [fast_lora.LoRAWeights(p, q, aa.float() if ref else aa, bb.float() if ref else bb, 2.0)
              for (p, q), aa, bb in zip(qkv_bases, ab[0::2], ab[1::2])]
        if ref:
            return torch.cat([fast_lora.lora_reference(xx.float(), w).reshape(-1) for w in ws])
        return torch.cat([t.reshape(-1) for t in fast_lora.lora_qkv(xx, *ws, None, use_fp8)])

    compare(f"fp8 LoRA QKV NF4 {hidden}->{hidden}+2x{kv} (FP8 tolerance)", qkv, lambda *t: qkv(*t, ref=True),
            [x, *qkv_ab], randn(rows * (hidden + 2 * kv)), ["x", "qA", "qB", "kA", "kB", "vA", "vB"], device,
            speed_ref=lambda *t: qkv(*t, use_fp8=False))
    ROWS[-1]["extra"] = ROWS[-1]["extra"].replace("torch bf16", "the exact fused QKV")
    fp8_tolerance(8)


def check_host_weights(device: torch.device, small: bool) -> None:
    """Streamed CE (W in pinned host memory) vs fused CE (W on the device) vs the float32 reference."""
    g = torch.Generator(device=device).manual_seed(0)
    bf16 = torch.bfloat16
    rows, hidden, vocab = (37, 200, 1000) if small else (4096, 4096, 128256)
    h = (torch.randn(rows, hidden, generator=g, device=device)).to(bf16)
    w = (torch.randn(vocab, hidden, generator=g, device=device) * hidden ** -0.5 * 4).to(bf16)
    w_host = torch.empty(w.shape, dtype=bf16, pin_memory=device.type == "cuda").copy_(w)
    labels = torch.randint(0, vocab, (rows,), generator=g, device=device)
    labels[::5] = -100
    labels[-max(1, rows // 16):] = -100
    cuda = device.type == "cuda"
    if cuda:
        timed(lambda: w_host.to(device, non_blocking=True), device)
        t_copy = timed(lambda: w_host.to(device, non_blocking=True), device)
        gbs = w.numel() * 2 / t_copy / 1e6
    for cap in (None, 30.0):
        def run(fn, weight, hidden_dtype=bf16):
            a = h.detach().to(hidden_dtype).clone().requires_grad_()
            loss = fn(a, weight)
            loss.backward()
            return loss.detach().float(), a.grad.float()

        def streamed(a, weight):
            return cross_entropy.streamed_linear_cross_entropy(a, weight, labels, softcap=cap)

        def fused(a, weight):
            return cross_entropy.fused_linear_cross_entropy(a, weight, labels, softcap=cap)

        def reference(a, weight):
            return cross_entropy.linear_cross_entropy_reference(a, weight, labels, softcap=cap)

        group = f"streamed linear+CE {rows}x{hidden}x{vocab} host W{' softcap' if cap else ''}"
        ours = run(streamed, w_host)
        theirs = run(fused, w)
        ref = run(reference, w.float(), torch.float32)
        for name, other in (("fp32 ref", ref), ("fused CE", theirs)):
            record(group, f"loss vs {name}", abs(float(ours[0] - other[0])) / abs(float(other[0])), KERNEL_TOL,
                   f"{float(ours[0]):.5f} vs {float(other[0]):.5f}")
            record(group, f"dhidden vs {name}", rel(ours[1], other[1]), KERNEL_TOL)
        record(group, "fused CE dhidden vs fp32 ref (floor)", rel(theirs[1], ref[1]), KERNEL_TOL)
        del ref
        if cuda:
            torch.cuda.empty_cache()
            extra = []
            for name, fn, weight in (("streamed", streamed, w_host), ("fused", fused, w)):
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                ms = timed(lambda: run(fn, weight), device)
                extra.append(f"{name} {ms:.1f} ms, peak +{(torch.cuda.max_memory_allocated() - base) / 2**20:.0f} MiB")
            extra.append(f"H2D of W {t_copy:.1f} ms ({gbs:.1f} GB/s); W on the device {w.numel() * 2 / 2**30:.2f} GiB")
            ROWS.append({"group": group, "check": "time / peak above inputs", "error": 0.0, "tol": 0.0, "ok": True,
                         "extra": "; ".join(extra)})
            check_prefetch(device, run, w_host, labels, cap, group)
    check_host_gather(device, w_host, vocab, rows)


def check_prefetch(device: torch.device, run, w_host: torch.Tensor, labels: torch.Tensor, cap, group: str) -> None:
    """The streamed CE with its first 512 MiB of lm_head prefetched (``VocabPrefetch``, what the patched forward
    starts before the decoder runs) == without: the same chunks in the same order, so the same bits."""
    from llmforge.kernels.cross_entropy import VocabPrefetch, default_chunk_vocab

    chunk = default_chunk_vocab(labels.shape[0], torch.bfloat16)
    saved = cross_entropy.PREFETCH_BYTES[0]
    cross_entropy.PREFETCH_BYTES[0] = 512 << 20
    try:
        def prefetched(a, weight):
            ahead = VocabPrefetch.start(weight, chunk, device)
            assert ahead is not None and len(ahead.chunks) == (512 << 20) // (chunk * weight.shape[1] * 2)
            return cross_entropy.streamed_linear_cross_entropy(a, weight, labels, softcap=cap, chunk_vocab=chunk,
                                                               prefetch=ahead)

        ours = run(prefetched, w_host)
        plain = run(lambda a, weight: cross_entropy.streamed_linear_cross_entropy(
            a, weight, labels, softcap=cap, chunk_vocab=chunk), w_host)
    finally:
        cross_entropy.PREFETCH_BYTES[0] = saved
    differ = float((ours[0] != plain[0]).float()) + float((ours[1] != plain[1]).float().mean())
    record(group, "with 512 MiB prefetched vs without: differing values", differ, 0.0)


def check_host_gather(device: torch.device, table: torch.Tensor, vocab: int, rows: int) -> None:
    """The embedding lookup of host-resident weights read by a GPU kernel from pinned memory (``host_gather.py``)
    == the host path's rows (ids to the CPU, index_select, copy back), and both timed."""
    from llmforge.kernels.host_gather import gather_rows

    g = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, vocab, (2, rows // 2), generator=g, device=device)

    def on_host():
        return table[ids.cpu()].to(device, non_blocking=True)

    ours = gather_rows(table, ids)
    if ours is None:   # no kernel here (CPU without the interpreter)
        return
    differ = float((ours != on_host()).float().mean())
    extra = ""
    if device.type == "cuda":
        extra = (f"kernel {timed(lambda: gather_rows(table, ids), device):.2f} ms vs host path "
                 f"{timed(on_host, device):.2f} ms for {ids.numel()} rows of {table.shape[1]}")
    record(f"embedding rows from pinned host memory {tuple(table.shape)}", "differing elements vs the host path",
           differ, 0.0, extra)


def build_qlora_model(size: str, device: torch.device):
    """Random NF4-quantized llama of the given shape, LoRA r=16 on all projections, checkpointing on."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, ffn, layers, heads, kv, vocab, tied = SHAPES[size]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
                         rms_norm_eps=1e-5, tie_word_embeddings=tied, max_position_embeddings=131072,
                         rope_theta=500000.0, use_cache=False,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in targets:
                old = getattr(parent, name, None)
                if old is None:
                    continue
                new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=False, compute_dtype=torch.bfloat16,
                                        compress_statistics=True, quant_type="nf4", device="meta")
                new.weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False, compress_statistics=True,
                                               quant_type="nf4", blocksize=64).to(device)
                setattr(parent, name, new)
                del old
    model.is_loaded_in_4bit = True
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none",
                                             target_modules=list(targets), task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    model.train()
    return model


@contextlib.contextmanager
def fp32_reference(model):
    """Every float parameter (embeddings, norms, lm_head, LoRA) in float32 and the 4-bit layers computing in
    float32: the same model and NF4 weights, evaluated without bf16 rounding."""
    saved = [(p, p.data) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32]
    linears = [(m, m.compute_dtype) for m in model.modules() if hasattr(m, "compute_dtype") and
               type(m).__name__ == "Linear4bit"]
    for p, data in saved:
        p.data = data.float()
    for m, _ in linears:
        m.compute_dtype = torch.float32
    try:
        yield
    finally:
        for p, data in saved:
            p.data = data
        for m, dtype in linears:
            m.compute_dtype = dtype


def host_syncs(fn, device: torch.device) -> tuple[int, str]:
    """How many times ``fn()`` makes the host wait for the GPU, and where (first distinct places)."""
    if device.type != "cuda":
        return 0, "cpu"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    places = [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    distinct = list(dict.fromkeys(places))
    return len(places), ", ".join(distinct[:4])


def rel_all(grads: dict, ref: dict) -> float:
    num = sum(float((grads[n] - g).pow(2).sum()) for n, g in ref.items())
    den = sum(float(g.pow(2).sum()) for g in ref.values())
    return (num / den) ** 0.5


def check_step(size: str, device: torch.device, seq: int, batch: int, graphs: bool = False) -> None:
    group = f"train step llama-{size} seq {seq} x{batch}{' CUDA graphs' if graphs else ''}"
    model = build_qlora_model(size, device)
    n_q = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
    ids = torch.randint(0, SHAPES[size][5], (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
    labels = ids.clone()
    labels[:, : seq // 8] = -100

    def step(autocast: bool = True):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
        grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return float(loss.detach()), grads, time.perf_counter() - t, peak

    step()  # warm-up (bitsandbytes / cuBLAS init)
    loss_ref, grads_ref, t_ref, peak_ref = step()
    syncs_ref = host_syncs(step, device)
    with fp32_reference(model):
        loss_32, grads_32, _, _ = step(autocast=False)
    from llmforge.kernels.patch import patch_model

    report = patch_model(model, cuda_graphs=graphs)
    step()  # warm-up (Triton compilation)
    if graphs:
        step()  # the layers' graphs are captured (and replayed) here; the checked step below only replays
    loss_new, grads_new, t_new, peak_new = step()
    syncs_new = host_syncs(step, device)
    assert grads_new.keys() == grads_ref.keys(), "patched model trains different parameters"
    floor = rel_all(grads_ref, grads_32)  # how far HF's own bf16 step is from the float32 evaluation
    # Triton's interpreter (the CPU smoke mode) truncates fp32 -> bf16 where a GPU rounds to nearest (1 + 2**-7 -
    # 2**-12 becomes 1.0, not 1.0078125): up to twice the error per store, all of it one way. Judged at 4x there.
    factor = 4.0 if interpreting() else 2.0
    err = rel_all(grads_new, grads_32)
    per_tensor = sorted((rel(grads_new[n], g), n) for n, g in grads_ref.items() if g.norm() > 0)
    zero_new = [n for n, g in grads_new.items() if g.norm() == 0]
    short = per_tensor[-1][1].split("base_model.model.")[-1]
    record(group, "loss |patched - fp32 ref|", abs(loss_new - loss_32), max(2.0 * abs(loss_ref - loss_32), 5e-3),
           f"fp32 {loss_32:.5f}, HF bf16 {loss_ref:.5f}, patched {loss_new:.5f}")
    record(group, "LoRA grads rel L2 vs fp32 ref", err, factor * floor,
           f"tol = {factor:g} x HF bf16's own error ({floor:.3g}); {len(grads_ref)} tensors, {n_q} NF4 linears")
    # two bf16 evaluations, each within `floor`-ish of the float32 one, can differ by up to about twice that
    record(group, "LoRA grads rel L2 vs HF bf16", rel_all(grads_new, grads_ref), factor * floor,
           f"median/worst tensor {per_tensor[len(per_tensor) // 2][0]:.3g}/{per_tensor[-1][0]:.3g} ({short})")
    record(group, "zero grads after patch", float(len(zero_new)), 0.0, ", ".join(zero_new[:3]))
    ROWS.append({"group": group, "check": "step time / peak / host syncs", "error": 0.0, "tol": 0.0, "ok": True,
                 "extra": f"HF {t_ref:.3f}s {peak_ref:.2f} GiB {syncs_ref[0]} syncs ({syncs_ref[1]}); "
                          f"patched {t_new:.3f}s {peak_new:.2f} GiB {syncs_new[0]} syncs ({syncs_new[1]}); "
                          + report.summary()[:160]
                          + (f"; {report.layer_graphs.stats()}" if report.layer_graphs is not None else "")})
    del model, grads_ref, grads_new, grads_32
    if device.type == "cuda":
        torch.cuda.empty_cache()


def print_table() -> bool:
    print("| group | check | rel error | tol | ok | notes |")
    print("|---|---|---|---|---|---|")
    for r in ROWS:
        print(f"| {r['group']} | {r['check']} | {r['error']:.3g} | {r['tol']:.3g} | "
              f"{'PASS' if r['ok'] else 'FAIL'} | {r['extra']} |")
    ok = all(r["ok"] for r in ROWS)
    print("PASS: all checks" if ok else f"FAIL: {sum(not r['ok'] for r in ROWS)} of {len(ROWS)} checks")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test with TRITON_INTERPRET=1)")
    p.add_argument("--sizes", nargs="*", default=None, help="model shapes for the step check (default 1b 8b)")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--json", default=None)
    p.add_argument("--skip-kernels", action="store_true", help="only the training-step checks")
    p.add_argument("--graphs", action="store_true", help="the step checks with CUDA graphs per layer")
    p.add_argument("--host-weights", action="store_true", help="only the streamed CE with lm_head on the host")
    p.add_argument("--fp8", action="store_true", help="only the FP8 base-matmul checks and their speed")
    p.add_argument("--chunked-mlp", action="store_true",
                   help="only the chunked MLP backward vs the one-pass backward (gradients, time, memory)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}",
          flush=True)
    only = args.host_weights or args.fp8 or args.chunked_mlp
    sections = [] if args.skip_kernels or only else [("kernels", lambda: check_kernels(device, args.small))]
    if args.host_weights:
        sections.append(("host weights", lambda: check_host_weights(device, args.small)))
    if args.fp8:
        sections.append(("fp8", lambda: check_fp8(device, args.small)))
    if args.chunked_mlp:
        sections.append(("chunked MLP", lambda: check_chunked_mlp_alone(device, args.small)))
    sizes = args.sizes if args.sizes is not None else ([] if only else ["tiny"] if args.small
                                                        else ["1b", "8b"])
    for size in sizes:
        seq = 32 if size == "tiny" else args.seq
        sections.append((f"step {size}", lambda size=size, seq=seq: check_step(size, device, seq, 1, args.graphs)))
    for name, fn in sections:
        t = time.time()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one failing section must not hide the others
            traceback.print_exc()
            ROWS.append({"group": name, "check": "crashed", "error": float("nan"), "tol": 0.0, "ok": False,
                         "extra": f"{type(e).__name__}: {str(e)[:200]}"})
        print(f"[{name}] done in {time.time() - t:.1f}s", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ok = print_table()
    if args.json:
        Path(args.json).write_text(json.dumps(ROWS, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
