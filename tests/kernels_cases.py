"""Kernel checks that must run under Triton's CPU interpreter.

Triton reads ``TRITON_INTERPRET`` when it is imported, and other test modules import it (through
bitsandbytes/transformers) during collection, so these cases run in a child process:
``python tests/kernels_cases.py CASE...`` sets the variable before any import and prints one JSON line
``{case: "ok" | traceback}``. ``run_cases`` is the parent side used by the test modules; ``run_interpreted``
and ``report_cases`` are the two sides for other test files that run their own cases in such a child.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_interpreted(script: str | Path, names: list[str], args: tuple[str, ...] = (), timeout: float = 300,
                    path: tuple[Path, ...] = (REPO,)) -> dict[str, str]:
    """Run ``python script *args *names`` under Triton's interpreter (``path`` as PYTHONPATH); returns the
    child's last JSON line, case -> "ok" or the failure text (every case: the child's stderr if it printed none)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(str(p) for p in path))
    env.pop("LLMFORGE_KERNELS", None)
    proc = subprocess.run([sys.executable, str(script), *args, *names], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {name: f"child failed rc={proc.returncode}: {proc.stderr[-3000:]}" for name in names}
    return json.loads(lines[-1])


def report_cases(names: list[str], run: Callable[[str], None], tail: int = 3000) -> None:
    """The child side: ``run`` each case, then print one JSON line {case: "ok" | the traceback's tail}."""
    results = {}
    for name in names:
        try:
            run(name)
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - reported to the parent test
            results[name] = traceback.format_exc()[-tail:]
    print(json.dumps(results), flush=True)


def run_cases(names: list[str], timeout: float = 300) -> dict[str, str]:
    """Run the named cases in one interpreted child process; returns case -> "ok" or the failure text."""
    return run_interpreted(__file__, names, timeout=timeout)


# ------------------------------------------------------------------------------------ child side
def _torch():
    import torch

    torch.manual_seed(0)
    return torch


def close(a, b, tol=1e-5, what=""):
    import torch

    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    scale = float(b.double().abs().max()) if b.numel() else 0.0
    assert err <= tol * max(1.0, scale), f"{what}: max |diff| {err:.3g} (scale {scale:.3g}, tol {tol})"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"


def grads(fn, inputs, dy):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    out.backward(dy)
    return out.detach(), [x.grad for x in leaves]


def check_fn(fn, ref, inputs, dy, names, tol=1e-5):
    out, gs = grads(fn, inputs, dy)
    out_r, gs_r = grads(ref, inputs, dy)
    close(out, out_r, tol, "forward")
    for n, g, gr in zip(names, gs, gs_r):
        close(g, gr, tol, f"d{n}")


def case_backend_is_interpreted():
    import triton  # noqa: F401

    from llmforge.kernels import rmsnorm
    from llmforge.kernels._backend import use_triton

    torch = _torch()
    assert type(rmsnorm._rmsnorm_fwd).__name__ == "InterpretedFunction"
    assert use_triton(torch.zeros(1))


def case_rmsnorm():
    from llmforge.kernels.rmsnorm import _TritonRMSNorm, rms_norm_reference

    torch = _torch()
    for shape in [(5, 37), (3, 4, 100), (0, 37), (1, 1)]:  # ragged hidden, 3-D, empty rows, single element
        for gemma in (False, True):
            x = torch.randn(*shape) * 3
            w = torch.randn(shape[-1]) * 0.1 + (0.0 if gemma else 1.0)
            check_fn(lambda a, b: _TritonRMSNorm.apply(a, b, 1e-6, gemma),
                     lambda a, b: rms_norm_reference(a, b, 1e-6, gemma), [x, w], torch.randn(*shape), ["x", "w"])


def case_rope():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from llmforge.kernels.rope import _TritonRope, apply_rope_, llama3_inv_freq, rope_cos_sin

    torch = _torch()
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    dim, heads, kv = 16, 3, 1
    config = LlamaConfig(hidden_size=dim * heads, num_attention_heads=heads, num_key_value_heads=kv, head_dim=dim,
                         rope_theta=10000.0, rope_scaling=scaling, max_position_embeddings=4096)
    hf = LlamaRotaryEmbedding(config)
    ours_inv = llama3_inv_freq(dim, 10000.0, 8.0, 1.0, 4.0, 64)
    close(ours_inv, hf.inv_freq.float(), 1e-6, "llama3 inv_freq")
    # packed sequences: positions restart inside each row (batch 2, 7 tokens), with large positions too
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 500, 501]])
    cos, sin = rope_cos_sin(pos, ours_inv)
    hf_cos, hf_sin = hf(torch.zeros(1, dtype=torch.float32), pos)
    close(cos, hf_cos, 1e-5, "cos")
    close(sin, hf_sin, 1e-5, "sin")
    batch, n_t = pos.shape
    for unsqueeze_dim in (1, 2):
        for c, s in ((cos, sin), (cos[:1], sin[:1])):  # per-row positions, and broadcast over the batch
            def ours(qp, kp):
                q = (qp * 1).view(batch, n_t, heads, dim)
                k = (kp * 1).view(batch, n_t, kv, dim)
                if unsqueeze_dim == 1:
                    q, k = q.transpose(1, 2), k.transpose(1, 2)
                q_ptr = q.data_ptr()
                q2 = _TritonRope.apply(q, c, s, unsqueeze_dim)
                k2 = _TritonRope.apply(k, c, s, unsqueeze_dim)
                assert q2.data_ptr() == q_ptr, "not in place"
                return torch.cat([q2.reshape(-1), k2.reshape(-1)])

            def ref(qp, kp):
                q = qp.view(batch, n_t, heads, dim)
                k = kp.view(batch, n_t, kv, dim)
                if unsqueeze_dim == 1:
                    q, k = q.transpose(1, 2), k.transpose(1, 2)
                q2, k2 = apply_rotary_pos_emb(q, k, c, s, unsqueeze_dim=unsqueeze_dim)
                return torch.cat([q2.reshape(-1), k2.reshape(-1)])

            qp, kp = torch.randn(batch, n_t, heads * dim), torch.randn(batch, n_t, kv * dim)
            check_fn(ours, ref, [qp, kp], torch.randn(batch * n_t * (heads + kv) * dim), ["q", "k"])
    # the public entry point takes the kernel and matches too
    q, k = torch.randn(batch, heads, n_t, dim), torch.randn(batch, kv, n_t, dim)
    rq, rk = apply_rotary_pos_emb(q, k, cos, sin)
    oq, ok = apply_rope_(q.clone(), k.clone(), cos, sin)
    close(oq, rq, 1e-5, "apply_rope_ q")
    close(ok, rk, 1e-5, "apply_rope_ k")


def case_gated_activations():
    from llmforge.kernels.activations import _TritonGated, ACTIVATION_KINDS, gated_reference

    torch = _torch()
    for shape in [(5, 37), (1030,), (0, 8), (2, 3, 129)]:  # ragged vs the 1024 block, empty
        for kind in ("silu", "gelu_pytorch_tanh"):
            e, g = torch.randn(*shape) * 3, torch.randn(*shape)
            check_fn(lambda a, b: _TritonGated.apply(a, b, ACTIVATION_KINDS[kind]),
                     lambda a, b: gated_reference(a, b, kind), [e, g], torch.randn(*shape), ["e", "g"])


def case_lora_gated():
    """The gated activation with the LoRA terms fused in (forward: gate/up LoRA, backward: down's LoRA input
    gradient) equals the unfused addmm_ + activation in fp32, over several tiles with ragged edges and ranks
    below, at and above the 16-wide dot; bf16 within two roundings (the interpreter truncates to bf16)."""
    from llmforge.kernels import lora_gated
    from llmforge.kernels.activations import gated_reference

    torch = _torch()
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2 ** -6)):
        for m, n, r in ((70, 300, 1), (64, 128, 4), (5, 129, 16), (130, 40, 24)):
            for kind, name in ((0, "silu"), (1, "gelu_pytorch_tanh")):
                e, g, dh = (torch.randn(m, n).to(dtype) for _ in range(3))
                xa, dyb = torch.randn(m, 2 * r).to(dtype), torch.randn(m, r).to(dtype)
                b_gate, b_up, a_down = (torch.randn(*s).mul(0.3).to(dtype) for s in ((n, r), (n, r), (r, n)))
                assert lora_gated.fusable(e, g, r, xa, b_gate, b_up)
                e_ref = (e.float() + xa[:, :r].float() @ b_gate.float().t()).to(dtype)
                g_ref = (g.float() + xa[:, r:].float() @ b_up.float().t()).to(dtype)
                e2, g2 = e.clone(), g.clone()
                h = lora_gated.lora_gated_forward(e2, g2, xa, b_gate, b_up, kind)
                close(e2, e_ref, tol, f"e {m}x{n} r{r}")   # updated in place: the backward needs them
                close(g2, g_ref, tol, f"g {m}x{n} r{r}")
                close(h, gated_reference(e_ref.float(), g_ref.float(), name), 2 * tol, f"h {m}x{n} r{r} {name}")
                ee, gg = e_ref.float().requires_grad_(), g_ref.float().requires_grad_()
                dh_ref = (dh.float() + dyb.float() @ a_down.float()).to(dtype).float()
                de_ref, dg_ref = torch.autograd.grad(gated_reference(ee, gg, name), (ee, gg), dh_ref)
                de, dg = lora_gated.lora_gated_backward(dh, dyb, a_down, e2, g2, kind)
                assert de.data_ptr() == e2.data_ptr() and dg.data_ptr() == g2.data_ptr()   # written over e and g
                close(de, de_ref, 2 * tol, f"de {m}x{n} r{r} {name}")
                close(dg, dg_ref, 2 * tol, f"dg {m}x{n} r{r} {name}")
    e = torch.randn(4, 8)
    assert lora_gated.fusable(e, e, 128, torch.randn(4, 256), torch.randn(8, 128))
    assert not lora_gated.fusable(e, e, 129, torch.randn(4, 258), torch.randn(8, 129))   # rank above the limit
    assert not lora_gated.fusable(e, e.t().contiguous().t(), 4, torch.randn(4, 8), torch.randn(8, 4))
    assert not lora_gated.fusable(e, e, 4, torch.randn(4, 8).double(), torch.randn(8, 4))
    assert not lora_gated.fusable(e, e, 4, torch.randn(8, 4).t(), torch.randn(8, 4))


def case_fused_linear_cross_entropy():
    from llmforge.kernels.cross_entropy import fused_linear_cross_entropy, linear_cross_entropy_reference

    torch = _torch()
    rows, hidden = 13, 24
    for vocab in (37, 300):  # one block, and more than one (the CPU block is 256) with a ragged tail
        h, w = torch.randn(rows, hidden), torch.randn(vocab, hidden) * 0.5
        labels = torch.randint(0, vocab, (rows,))
        labels[[0, 5, 6]] = -100
        labels[8:12] = -100  # a whole chunk of 4 rows without targets
        for softcap in (None, 5.0):
            for n_items in (None, 7):
                def ours(a, b):
                    return fused_linear_cross_entropy(a, b, labels, softcap=softcap, chunk_rows=4,
                                                      num_items_in_batch=n_items)

                def ref(a, b):
                    return linear_cross_entropy_reference(a, b, labels, softcap=softcap, num_items_in_batch=n_items)

                check_fn(ours, ref, [h, w], torch.tensor(1.0), ["hidden", "W"])
        # frozen lm_head: only the hidden gradient
        hh = h.clone().requires_grad_(True)
        fused_linear_cross_entropy(hh, w, labels, chunk_rows=5).backward()
        h2 = h.clone().requires_grad_(True)
        linear_cross_entropy_reference(h2, w, labels).backward()
        close(hh.grad, h2.grad, 1e-5, "dhidden, frozen W")
        # no target at all: loss 0 and zero gradients (HF would give NaN)
        hh = h.clone().requires_grad_(True)
        loss = fused_linear_cross_entropy(hh, w, torch.full((rows,), -100), chunk_rows=4)
        loss.backward()
        assert float(loss) == 0.0 and float(hh.grad.abs().max()) == 0.0


def case_nf4_vs_bitsandbytes():
    import bitsandbytes.functional as bnbf

    from llmforge.kernels.nf4 import _dequantize_triton, dequantize_nf4_reference

    torch = _torch()
    # shapes where bitsandbytes' CPU path is right (it mis-dequantizes e.g. 64x160 on CPU)
    for shape in [(64, 64), (96, 200), (128, 320), (5, 9)]:
        w = torch.randn(*shape) * 0.02
        for nested in (True, False):
            packed, qs = bnbf.quantize_4bit(w, compress_statistics=nested, quant_type="nf4", blocksize=64)
            theirs = bnbf.dequantize_4bit(packed, qs)
            ours = _dequantize_triton(packed.reshape(-1), qs, torch.float32)
            assert torch.equal(ours, theirs), f"{shape} nested={nested}: differs from bitsandbytes"
            assert torch.equal(dequantize_nf4_reference(packed, qs, torch.float32), theirs)
            # and the quantization error is what 4 bits give, so both are decoding the right layout
            assert float((ours - w).norm() / w.norm()) < 0.15


def _lora_inputs(torch, out_f, in_f, r, quantized):
    import bitsandbytes.functional as bnbf

    from llmforge.kernels.fast_lora import LoRAWeights

    dense = torch.randn(out_f, in_f) * 0.1
    if quantized:
        packed, qs = bnbf.quantize_4bit(dense, compress_statistics=True, quant_type="nf4", blocksize=64)
        base = LoRAWeights(packed, qs, None, None, 0.0)
    else:
        base = LoRAWeights(dense, None, None, None, 0.0)
    return base, torch.randn(r, in_f) * 0.3, torch.randn(out_f, r) * 0.3


def case_fused_lora_linear():
    from llmforge.kernels.fast_lora import LoRAWeights, lora_linear, lora_reference

    torch = _torch()
    for quantized in (True, False):
        base, a, b = _lora_inputs(torch, 40, 24, 3, quantized)
        x = torch.randn(2, 5, 24)

        def ours(xx, aa, bb):
            return lora_linear(xx, LoRAWeights(base.base, base.quant_state, aa, bb, 1.5))

        def ref(xx, aa, bb):
            return lora_reference(xx, LoRAWeights(base.base, base.quant_state, aa, bb, 1.5))

        check_fn(ours, ref, [x, a, b], torch.randn(2, 5, 40), ["x", "A", "B"], tol=2e-5)


def check_fused_lora_qkv(torch):
    """lora_qkv (one node, cached adapter casts) == three lora_linear nodes == the unfused reference, forward
    and every gradient; NF4 and dense bases, different ranks and scales per projection. Used in process
    (torch path) and in the interpreted child (Triton dequantization)."""
    from llmforge.kernels.fast_lora import AdapterCache, LoRAWeights, lora_linear, lora_qkv, lora_reference

    hidden = 24
    for quantized in (True, False):
        parts = [_lora_inputs(torch, out_f, hidden, r, quantized) for out_f, r in ((32, 3), (16, 4), (16, 2))]
        scales = (1.5, 2.0, 1.0)
        x = torch.randn(2, 5, hidden)
        cache = AdapterCache()

        def weights(ab):
            return [LoRAWeights(p.base, p.quant_state, a, b, s) for (p, _, _), a, b, s in
                    zip(parts, ab[0::2], ab[1::2], scales)]

        def fused(xx, *ab):
            return torch.cat([t.reshape(-1) for t in lora_qkv(xx, *weights(ab), cache)])

        def separate(xx, *ab):
            return torch.cat([lora_linear(xx, w).reshape(-1) for w in weights(ab)])

        def ref(xx, *ab):
            return torch.cat([lora_reference(xx, w).reshape(-1) for w in weights(ab)])

        ab = [t for _, a, b in parts for t in (a, b)]
        dy = torch.randn(2 * 5 * 64)
        names = ["x", "qA", "qB", "kA", "kB", "vA", "vB"]
        check_fn(fused, ref, [x, *ab], dy, names, tol=2e-5)
        check_fn(fused, separate, [x, *ab], dy, names, tol=2e-5)


def case_fused_lora_qkv():
    check_fused_lora_qkv(_torch())


def case_nf4_many():
    """Three weights dequantized in one launch (rows of one buffer, odd element counts too) == one by one."""
    import bitsandbytes.functional as bnbf

    from llmforge.kernels.nf4 import dequantize_nf4_many, dequantize_nf4_reference

    torch = _torch()
    cases = [(shapes, blocksize) for shapes in ([(64, 64), (32, 64), (32, 64)], [(5, 9), (96, 200), (3, 7)], [(7, 9)],
                                                [(40, 24), (8, 24)]) for blocksize in (64, 128)]
    for nested in (True, False):
        for shapes, blocksize in cases:
            weights = [bnbf.quantize_4bit(torch.randn(*s) * 0.02, compress_statistics=nested, quant_type="nf4",
                                          blocksize=blocksize) for s in shapes]
            outs = dequantize_nf4_many(weights, torch.float32)
            for (packed, qs), out, shape in zip(weights, outs, shapes):
                assert out.shape == shape, (out.shape, shape)
                assert torch.equal(out, dequantize_nf4_reference(packed, qs, torch.float32)), (shapes, nested)
            again = dequantize_nf4_many(weights, torch.bfloat16)  # cached per-state launch arguments
            for (packed, qs), out in zip(weights, again):  # within one bf16 step (the interpreter may truncate)
                ref = dequantize_nf4_reference(packed, qs, torch.float32)
                assert out.dtype == torch.bfloat16 and bool(((out.float() - ref).abs() <= ref.abs() / 128).all())


def case_fused_lora_mlp():
    from llmforge.kernels.activations import gated_reference
    from llmforge.kernels.fast_lora import LoRAWeights, lora_mlp, lora_reference

    torch = _torch()
    hidden, ffn, r = 24, 40, 4
    for quantized in (True, False):
        parts = [_lora_inputs(torch, ffn, hidden, r, quantized), _lora_inputs(torch, ffn, hidden, r, quantized),
                 _lora_inputs(torch, hidden, ffn, r, quantized)]
        x = torch.randn(3, 7, hidden)
        for kind in ("silu", "gelu_pytorch_tanh"):
            def weights(ab):
                return [LoRAWeights(p.base, p.quant_state, a, b, 2.0) for (p, _, _), a, b in zip(parts, ab[0::2], ab[1::2])]

            def ours(xx, *ab):
                return lora_mlp(xx, *weights(ab), kind)

            def ref(xx, *ab):
                g, u, d = weights(ab)
                return lora_reference(gated_reference(lora_reference(xx, g), lora_reference(xx, u), kind), d)

            ab = [t for _, a, b in parts for t in (a, b)]
            check_fn(ours, ref, [x, *ab], torch.randn(3, 7, hidden), ["x", "gA", "gB", "uA", "uB", "dA", "dB"],
                     tol=2e-5)


def _residual_mlp(torch, quantized: bool = True):
    """NF4 gate/up/down (hidden 32, ffn 64: multiples of 16, so the FP8 path applies) with rank-4 adapters, and a
    ``block(fp8, into_residual)`` maker for ``h + MLP(1.5 h)`` with adapters passed as leaves."""
    from llmforge.kernels.fast_lora import LoRAWeights, lora_mlp

    hidden, ffn, r = 32, 64, 4
    parts = [_lora_inputs(torch, ffn, hidden, r, quantized), _lora_inputs(torch, ffn, hidden, r, quantized),
             _lora_inputs(torch, hidden, ffn, r, quantized)]

    def block(fp8: bool, into_residual: bool):
        def run(h, *adapters):
            ws = [LoRAWeights(p.base, p.quant_state, a, b, 2.0)
                  for (p, _, _), a, b in zip(parts, adapters[0::2], adapters[1::2])]
            return h + lora_mlp(h * 1.5, *ws, "silu", None, fp8, into_residual)
        return run

    return hidden, ffn, [t for _, a, b in parts for t in (a, b)], block


def case_mlp_recompute():
    """Re-run by offloaded checkpointing, the fused LoRA MLP skips the down projection when its output only
    feeds the residual sum (the output is zeros then) and, with FP8, keeps the gate/up e4m3 weights for its
    backward; the gradients equal those of the plain forward and backward, exact and FP8."""
    from llmforge.kernels import fast_lora, offload

    torch = _torch()
    hidden, _, ab, make_block = _residual_mlp(torch)
    x = torch.randn(2, 5, hidden)
    calls = []   # (weights in the group, recomputing) of every e4m3 dequantization
    fp8_weights = fast_lora.fp8_weights

    def counting_fp8_weights(bases):
        calls.append((len(bases), offload.recomputing()))
        return fp8_weights(bases)

    # forward: gate/up, down; recompute: gate/up (kept), down unless skipped; backward: down only
    want = {True: [(2, False), (1, False), (2, True), (1, False)],
            False: [(2, False), (1, False), (2, True), (1, True), (1, False)]}
    fast_lora.fp8_weights = counting_fp8_weights
    try:
        for fp8 in (False, True):
            for into_residual in (True, False):
                block = make_block(fp8, into_residual)
                leaves = [t.clone().requires_grad_() for t in (x, *ab)]
                calls.clear()
                offload.offloaded_checkpoint(block, *leaves).backward(torch.ones_like(x))
                assert calls == (want[into_residual] if fp8 else []), (fp8, into_residual, calls)
                check_fn(lambda h, *ad: offload.offloaded_checkpoint(block, h, *ad), block, [x, *ab],
                         torch.randn(2, 5, hidden), ["x", "gA", "gB", "uA", "uB", "dA", "dB"], tol=1e-6)
                with torch.no_grad(), offload._Recomputing():
                    inside = block(x, *ab) - x
                assert bool((inside == 0).all()) == into_residual, (fp8, into_residual)
    finally:
        fast_lora.fp8_weights = fp8_weights


def case_mlp_chunked_backward():
    """Chunked MLP (``LLMFORGE_MLP_CHUNK_MIB``): re-run by offloaded checkpointing, the fused LoRA MLP whose output
    only feeds the residual sum defers gate/up and the activation to its backward and runs them in row chunks (here
    64, 64 and 22 rows). The gradients equal the one-pass backward's (exact and FP8) and the plain block's (exact);
    no (rows, ffn) tensor with more rows than one chunk is made, where the one-pass backward makes them for all 150
    rows; the checkpoint's recompute computes no (rows, ffn) tensor at all; a forward without autograd (the
    checkpoint's first pass) runs in the same chunks and gives the same output."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from llmforge.kernels import fast_lora, offload

    torch = _torch()
    hidden, ffn, ab, make_block = _residual_mlp(torch)
    x = torch.randn(3, 50, hidden)
    names = ["x", "gA", "gB", "uA", "uB", "dA", "dB"]

    class FfnRows(TorchDispatchMode):
        """The largest row count of a freshly made op output whose last dimension is ffn or 2 x ffn."""
        def __init__(self):
            super().__init__()
            self.rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for value, ret in zip(out if isinstance(out, (tuple, list)) else (out,), func._schema.returns):
                if isinstance(value, torch.Tensor) and ret.alias_info is None and value.dim() == 2 \
                        and value.shape[-1] in (ffn, 2 * ffn):
                    self.rows = max(self.rows, value.shape[0])
            return out

    def run(fp8, chunk_bytes):
        block = make_block(fp8, True)
        fast_lora.MLP_CHUNK_BYTES[0] = chunk_bytes
        leaves = [t.clone().requires_grad_() for t in (x, *ab)]
        out = offload.offloaded_checkpoint(block, *leaves)
        with FfnRows() as seen:
            out.backward(dy)
        with offload._Recomputing(), FfnRows() as recompute:   # as the checkpoint re-runs it: with autograd
            block(*[t.detach().requires_grad_() for t in (x, *ab)])
        with torch.no_grad(), FfnRows() as first_pass:   # the checkpoint's forward (and inference)
            out_no_grad = block(x, *ab)
        close(out_no_grad, out.detach(), 1e-6, f"no-grad forward (chunk bytes {chunk_bytes})")
        assert first_pass.rows == (64 if chunk_bytes else 150), first_pass.rows
        return [t.grad for t in leaves], seen.rows, recompute.rows, block

    dy = torch.randn(3, 50, hidden)
    saved = fast_lora.MLP_CHUNK_BYTES[0]
    try:
        for fp8 in (False, True):
            whole, whole_rows, _, block = run(fp8, 0)
            chunked, chunk_rows, recompute_rows, _ = run(fp8, 64 * ffn * 4)
            assert fast_lora._chunk_rows(150, ffn, 4) == 64
            assert (whole_rows, chunk_rows, recompute_rows) == (150, 64, 0), (fp8, whole_rows, chunk_rows, recompute_rows)
            for name, g, g_whole in zip(names, chunked, whole):
                close(g, g_whole, 1e-5, f"d{name} chunked vs one pass (fp8={fp8})")
            if not fp8:
                _, plain = grads(block, [x, *ab], dy)
                for name, g, g_plain in zip(names, chunked, plain):
                    close(g, g_plain, 1e-5, f"d{name} chunked vs plain")
        fast_lora.MLP_CHUNK_BYTES[0] = 16 * 64 * 4     # the tiny models' MLPs in chunks of 16 rows
        sys.path.insert(0, str(REPO / "tests"))
        import kernels_models
        for arch in ("llama", "gemma2"):               # gemma2: its MLP output feeds a norm, so no chunking
            kernels_models.check_patched_matches(arch, expect_backend="triton-interpreter")
    finally:
        fast_lora.MLP_CHUNK_BYTES[0] = saved


def case_offloaded_checkpoint():
    from llmforge.kernels.offload import offloaded_checkpoint

    torch = _torch()
    layer = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 8))
    x = torch.randn(4, 8)
    for input_grad in (True, False):  # frozen embeddings give a layer input that needs no grad
        xs = [x.clone().requires_grad_(input_grad) for _ in range(2)]
        out_ref = layer(xs[0])
        out_ref.pow(2).sum().backward()
        ref = [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad()
        out = offloaded_checkpoint(lambda h: layer(h), xs[1])
        close(out.detach(), out_ref.detach(), 1e-6, "output")
        out.pow(2).sum().backward()
        for g, gr in zip((p.grad for p in layer.parameters()), ref):
            close(g, gr, 1e-6, "param grad")
        if input_grad:
            close(xs[1].grad, xs[0].grad, 1e-6, "input grad")
        layer.zero_grad()


def case_patched_models():
    """A patched tiny model of every supported architecture (PEFT LoRA, checkpointing with offload) gives
    the unpatched loss and gradients, kernels interpreted."""
    sys.path.insert(0, str(REPO / "tests"))
    import kernels_models

    for arch in kernels_models.ARCHS:
        kernels_models.check_patched_matches(arch, expect_backend="triton-interpreter")


def case_patched_vlms():
    """The tiny Gemma 3, Qwen2.5-VL and Qwen2-VL of the vision tests, patched (language model only), give the
    unpatched loss and gradients on an image+text batch, kernels interpreted (Qwen: vocabulary cut to the batch)."""
    import tempfile

    sys.path.insert(0, str(REPO / "tests"))
    import kernels_vlm

    with tempfile.TemporaryDirectory() as tmp:
        for arch in kernels_vlm.VLMS:
            model_dir = kernels_vlm.build_vlm(arch, Path(tmp) / arch)
            kernels_vlm.check_vlm_patched_matches(arch, model_dir, expect_backend="triton-interpreter",
                                                  compact=arch != "gemma3")


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


def main(names: list[str]) -> None:
    report_cases(names, lambda name: CASES[name](), tail=4000)


if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(REPO))
    main(sys.argv[1:])
