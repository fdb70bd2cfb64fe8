"""NF4 storage (QLoRA bases) against bitsandbytes itself, on the same stored tensors."""

from __future__ import annotations

import pytest
import torch

from llmforge.errors import LlmforgeError
from llmforge.quant.nf4 import (block_absmax, dequantize_nf4, dynamic_map, quantize_nf4, state_from_tensors,
                                state_to_tensors)

F = pytest.importorskip("bitsandbytes.functional")


def _bnb_quantize(w: torch.Tensor):
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    return packed, state, {k: v for k, v in state.as_dict(packed=True).items()}


def test_dynamic_map_equals_bitsandbytes():
    assert torch.equal(dynamic_map(), F.create_dynamic_map())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(256, 128), (96, 320), (40, 64)])
def test_dequantize_equals_bitsandbytes(shape, dtype):
    torch.manual_seed(hash(shape) % 1000)
    w = (torch.randn(shape) * 0.05).to(dtype)
    packed, state, stored = _bnb_quantize(w)
    ours = dequantize_nf4(packed, state_from_tensors(stored))
    assert ours.dtype == dtype and ours.shape == w.shape
    assert torch.equal(ours, F.dequantize_4bit(packed, state))
    assert torch.equal(dequantize_nf4(packed, state), ours)      # a live bitsandbytes QuantState works too


def test_dequantize_ragged_equals_bitsandbytes_flat_layout():
    """Rows that are not a multiple of 64: CUDA checkpoints use flat blocks, as bitsandbytes' torch backend does."""
    torch._dynamo.config.disable = True
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    w = torch.randn(123, 77) * 0.02
    packed, state, stored = _bnb_quantize(w)
    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    ref = _dequantize_4bit_compute(packed.reshape(-1), absmax, state.code, 64, state.shape, state.dtype)
    assert torch.equal(dequantize_nf4(packed, state_from_tensors(stored)), ref)


@pytest.mark.parametrize("shape", [(256, 128), (123, 77)])
def test_quantize_matches_bitsandbytes_storage(shape):
    torch.manual_seed(1)
    w = torch.randn(shape) * 0.05
    packed, state, stored = _bnb_quantize(w)
    ours_packed, ours_state = quantize_nf4(w)
    assert torch.equal(ours_packed, packed)                      # the 4-bit codes, nibble order included
    assert torch.equal(ours_state.nested.scale, stored["nested_absmax"])
    assert ours_state.nested.offset == pytest.approx(float(state.offset), rel=0, abs=0)
    # bitsandbytes' C kernel picks the 8-bit absmax code by an approximate search; ours is the nearest code,
    # so it is never worse (and almost always identical).
    _, true_absmax = torch.ops.bitsandbytes.quantize_4bit.default(w, 64, "nf4", torch.uint8)
    err_ours = (block_absmax(ours_state) - true_absmax).abs()
    err_bnb = ((F.dequantize_blockwise(state.absmax, state.state2) + state.offset) - true_absmax).abs()
    assert torch.all(err_ours <= err_bnb + 1e-9)
    assert (ours_state.absmax != stored["absmax"]).float().mean() < 0.02


def test_serialized_roundtrip_is_readable_by_bitsandbytes():
    w = torch.randn(64, 192, dtype=torch.bfloat16)
    packed, state = quantize_nf4(w)
    tensors = state_to_tensors("layer.", packed, state)
    assert set(tensors) == {"layer.weight", "layer.weight.absmax", "layer.weight.quant_map",
                            "layer.weight.nested_absmax", "layer.weight.nested_quant_map",
                            "layer.weight.quant_state.bitsandbytes__nf4"}
    qs = {k.removeprefix("layer.weight."): v for k, v in tensors.items() if k != "layer.weight"}
    bnb_state = F.QuantState.from_dict(dict(qs), device=torch.device("cpu"))
    assert torch.equal(F.dequantize_4bit(packed, bnb_state), dequantize_nf4(packed, state_from_tensors(qs)))


def test_corrupt_state_is_a_clear_error():
    packed, state = quantize_nf4(torch.randn(64, 64))
    tensors = {k.removeprefix("weight."): v for k, v in state_to_tensors("", packed, state).items() if k != "weight"}
    del tensors["quant_state.bitsandbytes__nf4"]
    with pytest.raises(LlmforgeError, match="quant_state"):
        state_from_tensors(tensors)
    with pytest.raises(LlmforgeError, match="too few"):
        dequantize_nf4(packed[:10], state)
