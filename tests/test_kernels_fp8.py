"""FP8 base matmuls (``llmforge/kernels/fp8.py``, ``patch_model(fp8_base=True)``).

- Rounding to e4m3: hand-computed ties, subnormals, signed zeros; the Triton kernel (interpreted in a child
  process) writes the torch fallback's bytes; scales are powers of two putting each row's max in [128, 256].
- NF4 straight to e4m3 (one launch for a group) == bitsandbytes' dequantization x the group's scale, rounded.
- The fused LoRA nodes with ``fp8=True`` == a plain-torch reference built from the same e4m3 operands (forward and
  every gradient, fp32 tolerance), and within FP8's error of the exact path.
- A patched tiny model trains with FP8 base matmuls (loss and LoRA gradients close to the unpatched model's);
  where FP8 cannot run, the patch says why and keeps the exact path; ``train.fp8`` reaches ``patch_model``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels_cases import report_cases, run_interpreted  # noqa: E402
from kernels_models import loss_and_grads, tiny_lora_model  # noqa: E402

TESTS = Path(__file__).resolve().parent


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------- rounding and rows
# (input, its e4m3 value) with the row scale 1 (the row's max, 200, lies in [128, 256)): ties go to even
TIES = [(200.0, 192.0), (1.0625, 1.0), (1.1875, 1.25), (248.0, 256.0), (2 ** -10, 0.0), (3 * 2 ** -10, 2 ** -8),
        (-2 ** -12, -0.0), (-0.0, -0.0), (0.0, 0.0), (2 ** -6 + 2 ** -10, 2 ** -6), (17.0, 16.0), (19.0, 20.0),
        (-100.0, -96.0), (0.3, 0.3125)]


def check_rows() -> None:
    from llmforge.kernels.fp8 import E4M3, _quantize_rows_torch, pow2_scale_exponent, quantize_rows

    x = torch.tensor([[v for v, _ in TIES]])
    q, scale = quantize_rows(x)
    assert float(scale) == 1.0
    want = torch.tensor([[w for _, w in TIES]])
    assert torch.equal(q.float(), want), (q.float(), want)
    assert torch.equal(torch.signbit(q.float()), torch.signbit(want)), "signed zeros"
    # rows of every magnitude, zero rows, three column blocks (strided too), ragged widths
    g = torch.Generator().manual_seed(0)
    mags = torch.logspace(-30, 30, 41)[:, None]
    blocks = [torch.randn(41, 300, generator=g) * mags, (torch.randn(41, 77, generator=g) * mags).to(torch.bfloat16),
              torch.randn(77, 41, generator=g).t() * mags]
    blocks[0][3] = 0
    blocks[1][3] = 0
    blocks[2][3] = 0
    blocks[0][4, :9] = -0.0
    for n in (1, 2, 3):
        q, scale = quantize_rows(*blocks[:n])
        qr, sr = _quantize_rows_torch(blocks[:n])
        assert q.dtype == E4M3 and q.shape == (41, sum(b.shape[1] for b in blocks[:n])) and scale.shape == (41, 1)
        assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)), f"{n} blocks: bytes differ"
        assert torch.equal(scale, sr)
        x = torch.cat([b.float() for b in blocks[:n]], dim=1)
        exponent = torch.log2(scale)
        assert torch.equal(exponent, exponent.round()), "scales are powers of two"
        top = q.float().abs().amax(dim=1)
        nonzero = x.abs().amax(dim=1) > 0
        assert bool(((top[nonzero] >= 128) & (top[nonzero] <= 256)).all())
        assert bool((scale[~nonzero] == 1).all()) and bool((q.float()[~nonzero] == 0).all())
        # within half an e4m3 step: 2**-4 relative for normals, 2**-10 x scale below 2**-6
        err = (q.float() * scale - x).abs()
        assert bool((err <= torch.maximum(x.abs() * 2 ** -4, scale * 2 ** -10) * (1 + 1e-6)).all())
    assert int(pow2_scale_exponent(torch.tensor([0.0, 1.0, 255.0, 256.0, 3e38, 1e-40]))[0]) == 0
    from llmforge.kernels.fp8 import transposed

    for shape in ((130, 70), (64, 64), (1, 5), (200, 1)):     # ragged tiles
        q = torch.randint(0, 255, shape, dtype=torch.uint8, generator=g).view(E4M3)
        t = transposed(q)
        assert t.is_contiguous() and t.shape == shape[::-1]
        assert torch.equal(t.view(torch.uint8), q.view(torch.uint8).t())


def check_nf4_fp8() -> None:
    import bitsandbytes.functional as bnbf

    from llmforge.kernels.fp8 import E4M3, pow2, pow2_scale_exponent
    from llmforge.kernels.nf4 import dequantize_nf4_fp8, dequantize_nf4_reference

    g = torch.Generator().manual_seed(1)
    groups = [[(64, 64), (32, 64), (32, 64)], [(40, 24), (8, 24)], [(96, 200)], [(5, 9)]]
    for nested in (True, False):
        for shapes in groups:
            weights = [bnbf.quantize_4bit(torch.randn(*s, generator=g) * 0.02 * (i + 1), compress_statistics=nested,
                                          quant_type="nf4", blocksize=64) for i, s in enumerate(shapes)]
            dense = [dequantize_nf4_reference(p, qs, torch.float32) for p, qs in weights]
            theirs = [bnbf.dequantize_4bit(p, qs) for p, qs in weights] if shapes[0] != (96, 200) else dense
            assert all(torch.equal(a, b) for a, b in zip(dense, theirs))
            amax = max(float(d.abs().max()) for d in dense)
            exponent = pow2_scale_exponent(torch.tensor([amax]))
            want = torch.cat([(d * pow2(-exponent)).to(E4M3) for d in dense])
            fw = dequantize_nf4_fp8(weights)
            with torch.autocast("cpu", dtype=torch.bfloat16):   # as in training: CPU autocast's cat refuses float8
                under_autocast = dequantize_nf4_fp8(weights).buffer
            assert torch.equal(under_autocast.view(torch.uint8), fw.buffer.view(torch.uint8))
            assert fw.buffer.dtype == E4M3 and fw.buffer.shape == want.shape
            assert torch.equal(fw.buffer.view(torch.uint8), want.view(torch.uint8)), (shapes, nested)
            assert float(fw.scale) == float(pow2(exponent)[0])
            assert dequantize_nf4_fp8(weights).group is fw.group, "the frozen group's scale is computed once"
            for view, d in zip(fw.views, dense):
                assert view.shape == d.shape and rel(view.float() * fw.scale, d) < 0.05
            assert torch.equal(fw.column_major().float(), fw.buffer.float())
            assert fw.column_major().stride() == (1, fw.buffer.shape[0])


# --------------------------------------------------------------------------------- fused LoRA nodes
class _Fp8GroupRef(torch.autograd.Function):
    """``[x @ W_i.T]`` on e4m3 operands as plain torch: forward from the rounded rows of x, backward from the
    rounded rows of the concatenated output gradients (one scale per row over the group)."""

    @staticmethod
    def forward(ctx, x2, w8, w_scale, sizes):
        from llmforge.kernels.fp8 import _quantize_rows_torch

        q, s = _quantize_rows_torch([x2])
        y = (q.float() * s) @ (w8.float() * w_scale).t()
        ctx.save_for_backward(w8, w_scale)
        return tuple(y.split(list(sizes), dim=1))

    @staticmethod
    def backward(ctx, *dys):
        from llmforge.kernels.fp8 import _quantize_rows_torch

        w8, w_scale = ctx.saved_tensors
        q, s = _quantize_rows_torch([d.contiguous() for d in dys])
        return (q.float() * s) @ (w8.float() * w_scale), None, None, None


def _lora_group_ref(x, parts, adapters, scales):
    """Reference of one group of LoRA projections with FP8 base matmuls: the adapters in fp32 autograd."""
    from llmforge.kernels.fast_lora import fp8_weights

    x2 = x.reshape(-1, x.shape[-1])
    fw = fp8_weights(tuple((p.base, p.quant_state) for p in parts))
    base = _Fp8GroupRef.apply(x2, fw.buffer, fw.scale, tuple(v.shape[0] for v in fw.views))
    return [(b_out + s * (x2 @ a.t()) @ b.t()).reshape(*x.shape[:-1], -1)
            for b_out, a, b, s in zip(base, adapters[0::2], adapters[1::2], scales)]


def _weights(torch_, shapes, quantized, g):
    import bitsandbytes.functional as bnbf

    from llmforge.kernels.fast_lora import LoRAWeights

    out = []
    for out_f, in_f in shapes:
        dense = torch_.randn(out_f, in_f, generator=g) * 0.1
        if quantized:
            packed, qs = bnbf.quantize_4bit(dense, compress_statistics=True, quant_type="nf4", blocksize=64)
            out.append(LoRAWeights(packed, qs, None, None, 0.0))
        else:
            out.append(LoRAWeights(dense, None, None, None, 0.0))
    return out


def _grads(fn, inputs, dy):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = fn(*inputs)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in inputs]


def check_lora_nodes() -> None:
    from llmforge.kernels.activations import gated_reference
    from llmforge.kernels.fast_lora import LoRAWeights, lora_linear, lora_mlp, lora_qkv

    g = torch.Generator().manual_seed(2)
    hidden, ffn, r = 32, 48, 4
    for quantized in (True, False):
        x = torch.randn(3, 5, hidden, generator=g)
        # Q/K/V (one group) and a single projection
        qkv = _weights(torch, [(32, hidden), (16, hidden), (16, hidden)], quantized, g)
        ab = [t for p in qkv for t in (torch.randn(r, hidden, generator=g) * 0.3,
                                       torch.randn(p.base.shape[0] if p.quant_state is None else p.quant_state.shape[0],
                                                   r, generator=g) * 0.3)]
        scales = (1.5, 2.0, 1.0)

        def fused(xx, *ad, fp8=True):
            ws = [LoRAWeights(p.base, p.quant_state, a, b, s) for p, a, b, s in zip(qkv, ad[0::2], ad[1::2], scales)]
            return torch.cat([t.reshape(-1) for t in lora_qkv(xx, *ws, None, fp8)])

        def ref(xx, *ad):
            return torch.cat([t.reshape(-1) for t in _lora_group_ref(xx, qkv, ad, scales)])

        dy = torch.randn(3 * 5 * 64, generator=g)
        ours, want, exact = _grads(fused, [x, *ab], dy), _grads(ref, [x, *ab], dy), \
            _grads(lambda *t: fused(*t, fp8=False), [x, *ab], dy)
        for name, o, w, e in zip(["y", "x", "qA", "qB", "kA", "kB", "vA", "vB"], ours, want, exact):
            assert rel(o, w) < 1e-5, f"qkv quantized={quantized} {name}: {rel(o, w):.2e} from the fp8 reference"
            assert rel(o, e) < 0.1, f"qkv {name}: {rel(o, e):.2e} from the exact path"
        assert rel(ours[0], exact[0]) > 1e-4, "fp8 made no difference: the exact path ran"

        single = qkv[:1]

        def one(xx, a, b, fp8=True):
            return lora_linear(xx, LoRAWeights(single[0].base, single[0].quant_state, a, b, 1.5), None, fp8)

        dy1 = torch.randn(3, 5, 32, generator=g)
        ours = _grads(one, [x, ab[0], ab[1]], dy1)
        want = _grads(lambda xx, a, b: _lora_group_ref(xx, single, (a, b), (1.5,))[0], [x, ab[0], ab[1]], dy1)
        for name, o, w in zip(["y", "x", "A", "B"], ours, want):
            assert rel(o, w) < 1e-5, f"linear {name}: {rel(o, w):.2e}"

        # the gated MLP: gate/up one group (their input gradients quantized together), down another
        mlp = _weights(torch, [(ffn, hidden), (ffn, hidden), (hidden, ffn)], quantized, g)
        mab = [torch.randn(r, hidden, generator=g) * 0.3, torch.randn(ffn, r, generator=g) * 0.3,
               torch.randn(r, hidden, generator=g) * 0.3, torch.randn(ffn, r, generator=g) * 0.3,
               torch.randn(r, ffn, generator=g) * 0.3, torch.randn(hidden, r, generator=g) * 0.3]
        for kind in ("silu", "gelu_pytorch_tanh"):
            def fused_mlp(xx, *ad, fp8=True):
                ws = [LoRAWeights(p.base, p.quant_state, a, b, 2.0) for p, a, b in zip(mlp, ad[0::2], ad[1::2])]
                return lora_mlp(xx, *ws, kind, None, fp8)

            def ref_mlp(xx, *ad):
                e, u = _lora_group_ref(xx, mlp[:2], ad[:4], (2.0, 2.0))
                return _lora_group_ref(gated_reference(e, u, kind), mlp[2:], ad[4:], (2.0,))[0]

            dy = torch.randn(3, 5, hidden, generator=g)
            ours, want = _grads(fused_mlp, [x, *mab], dy), _grads(ref_mlp, [x, *mab], dy)
            exact = _grads(lambda *t: fused_mlp(*t, fp8=False), [x, *mab], dy)
            for name, o, w, e in zip(["y", "x", "gA", "gB", "uA", "uB", "dA", "dB"], ours, want, exact):
                # an intermediate a rounding apart can land on the other side of an e4m3 tie: 1e-3, not 1e-5
                assert rel(o, w) < 1e-3, f"mlp {kind} quantized={quantized} {name}: {rel(o, w):.2e}"
                assert rel(o, e) < 0.15, f"mlp {kind} {name}: {rel(o, e):.2e} from the exact path"


def check_patched_model() -> None:
    from llmforge.kernels.patch import patch_model, unpatch_rope

    ref = tiny_lora_model("llama")
    patched = copy.deepcopy(ref)
    loss_ref, grads_ref = loss_and_grads(ref)
    report = patch_model(patched, offload_checkpointing=False, fp8_base=True)
    try:
        loss_new, grads_new = loss_and_grads(patched)
        exact = copy.deepcopy(ref)
        patch_model(exact, offload_checkpointing=False)
        loss_exact, _ = loss_and_grads(exact)
    finally:
        unpatch_rope(patched)
    assert report.fp8_base and "FP8 base matmuls" in report.summary(), report.summary()
    assert report.mlp_fused_lora == 2 and report.qkv_fused_lora == 2, report.summary()
    assert abs(loss_exact - loss_ref) < 1e-4 * abs(loss_ref)
    assert loss_new != loss_exact, "the FP8 path did not run"
    assert abs(loss_new - loss_ref) < 0.02 * abs(loss_ref), (loss_new, loss_ref)
    # e4m3 operands put ~5-30% relative noise on single LoRA gradients of this 64-wide model (Q/K's, small
    # through a random softmax, the most); their directions must still agree
    cosines = {name: float(torch.nn.functional.cosine_similarity(grads_new[name].flatten(), g.flatten(), dim=0))
               for name, g in grads_ref.items()}
    assert min(cosines.values()) > 0.95, min(cosines.items(), key=lambda kv: kv[1])
    assert sum(cosines.values()) / len(cosines) > 0.99, cosines


# ------------------------------------------------------------------------------------------- in process
def test_rounding_and_rows() -> None:
    check_rows()


def test_nf4_straight_to_e4m3() -> None:
    pytest.importorskip("bitsandbytes")
    check_nf4_fp8()


def test_fused_lora_nodes_match_the_fp8_reference() -> None:
    pytest.importorskip("bitsandbytes")
    check_lora_nodes()


def test_patched_model_trains_with_fp8_base_matmuls() -> None:
    check_patched_model()


def test_unsupported_device_keeps_the_exact_path(monkeypatch) -> None:
    from llmforge.kernels import patch as patch_module
    from llmforge.kernels.fp8 import fp8_supported

    assert fp8_supported(torch.device("cpu")) == (True, "")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    ok, why = fp8_supported(torch.device("cuda"))
    assert not ok and "9.x" in why and "8.0" in why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8_supported(torch.device("cuda")) == (True, "")
    monkeypatch.setattr(patch_module, "fp8_supported", lambda device: (False, "no FP8 here"))
    model = tiny_lora_model("llama")
    report = patch_module.patch_model(model, offload_checkpointing=False, fp8_base=True)
    try:
        assert not report.fp8_base and "fp8 base matmuls: no FP8 here" in report.not_patched
        assert "FP8 base matmuls" not in report.summary().split("; not patched")[0]
    finally:
        patch_module.unpatch_rope(model)


def test_train_fp8_reaches_the_patch(monkeypatch, capsys) -> None:
    from llmforge.kernels import patch as patch_module
    from llmforge.trainer import run
    from llmforge.trainer.config import Config

    config = Config()
    config.train.fp8 = True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run.maybe_patch_kernels(object(), config) == "off (no CUDA device)"
    assert "train.fp8" in capsys.readouterr().err
    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(patch_module, "patch_model", lambda model, **kw: seen.update(kw) or patch_module.PatchReport(
        model_type="llama", supported=True, backend="triton", fp8_base=kw["fp8_base"]))
    run.maybe_patch_kernels(object(), config)
    assert seen["fp8_base"] is True


def test_triton_interpreted() -> None:
    pytest.importorskip("triton")
    pytest.importorskip("bitsandbytes")
    results = run_interpreted(__file__, ["rows", "nf4", "nodes", "model"], path=(TESTS.parent, TESTS))
    assert results == {"rows": "ok", "nf4": "ok", "nodes": "ok", "model": "ok"}, results


if __name__ == "__main__":   # the interpreted child: TRITON_INTERPRET=1 was set before triton was imported
    from llmforge.kernels._backend import interpreting, use_triton

    def run_case(name: str) -> None:
        assert interpreting() and use_triton(torch.zeros(1)), "not running under Triton's interpreter"
        {"rows": check_rows, "nf4": check_nf4_fp8, "nodes": check_lora_nodes, "model": check_patched_model}[name]()

    report_cases(sys.argv[1:], run_case)


def test_a_mib_switch_that_is_not_a_number_is_one_warning_and_off(monkeypatch, capsys):
    from llmforge.kernels._backend import env_mib

    monkeypatch.setenv("LLMFORGE_TEST_MIB", "32")
    assert env_mib("LLMFORGE_TEST_MIB") == 32 << 20
    monkeypatch.setenv("LLMFORGE_TEST_MIB", "lots")
    assert env_mib("LLMFORGE_TEST_MIB") == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: LLMFORGE_TEST_MIB='lots' is not a whole number")
    monkeypatch.delenv("LLMFORGE_TEST_MIB")
    assert env_mib("LLMFORGE_TEST_MIB") == 0
