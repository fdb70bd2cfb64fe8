"""bitsandbytes NF4 storage (QLoRA bases): quantize and dequantize exactly as bitsandbytes stores weights.

Layout (see ``llmforge/vendor/bnb_nf4.py``): the weight is flattened row-major into blocks of 64; each block
keeps its absmax (fp32) and 4-bit indices into the NF4 table, two per byte (element 2i in the high nibble).
With double quantization the absmax vector is stored as uint8 codes of ``absmax - offset`` in blocks of 256
against the signed 8-bit dynamic map, plus one fp32 scale per 256 and the scalar ``offset``.

This is the torch reference the Triton dequantizer is checked against.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from math import prod

import torch

from ..errors import LlmforgeError
from ..vendor.bnb_nf4 import (DYNAMIC_MAP_EXPONENT_BITS, DYNAMIC_MAP_TOTAL_BITS, NESTED_BLOCKSIZE, NF4_BLOCKSIZE,
                              NF4_CODE)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class NestedAbsmax:
    """Double-quant state of the per-block absmax: ``absmax_i = code[q_i] * scale[i // blocksize] + offset``."""

    scale: torch.Tensor       # fp32, one per nested block (bitsandbytes: nested_absmax)
    code: torch.Tensor        # fp32 [256], the dynamic map (nested_quant_map)
    offset: float             # mean of the original absmax (nested_offset)
    blocksize: int = NESTED_BLOCKSIZE


@dataclass
class NF4State:
    """Everything besides the packed bytes needed to rebuild a weight (bitsandbytes' ``QuantState``)."""

    shape: tuple[int, ...]
    dtype: torch.dtype                 # the dtype bitsandbytes dequantizes to
    absmax: torch.Tensor               # fp32 per block, or uint8 codes when ``nested`` is set
    code: torch.Tensor                 # fp32 [16], the NF4 table (quant_map)
    blocksize: int = NF4_BLOCKSIZE
    nested: NestedAbsmax | None = None


def nf4_code() -> torch.Tensor:
    """The 16 NF4 values as float32."""
    return torch.tensor(NF4_CODE, dtype=torch.float32)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 sorted fp32 values), used for the double-quantized absmax.

    For exponent k = 0..6 it holds +-10^(k-6) times the midpoints of 2^k + 1 evenly spaced points in [0.1, 1],
    plus 0 and 1.
    """
    exponent_bits, payload_bits = DYNAMIC_MAP_EXPONENT_BITS, DYNAMIC_MAP_TOTAL_BITS - 1
    values: list[float] = [0.0, 1.0]
    for k in range(exponent_bits):
        points = torch.linspace(0.1, 1, 2 ** (k + payload_bits - exponent_bits) + 1, dtype=torch.float32)
        mids = (points[:-1] + points[1:]) / 2.0
        magnitude = (10 ** (k - (exponent_bits - 1))) * mids
        values += magnitude.tolist() + (-magnitude).tolist()
    values += [0.0] * (2 ** DYNAMIC_MAP_TOTAL_BITS - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def _blockwise_absmax_codes(flat: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and the index of the nearest code value for ``flat / absmax`` (last block may be short)."""
    n = flat.numel()
    pad = (-n) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().max(dim=1).values
    if pad:  # the short last block's absmax ignores the padding (zeros never raise a max of |x|)
        absmax[-1] = flat[n - (blocksize - pad):].abs().max()
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1).reshape(-1)[:n]
    midpoints = (code[:-1] + code[1:]) / 2
    return absmax, torch.bucketize(scaled, midpoints)


def quantize_nf4(weight: torch.Tensor, *, blocksize: int = NF4_BLOCKSIZE,
                 double_quant: bool = True) -> tuple[torch.Tensor, NF4State]:
    """Quantize ``weight`` to NF4 storage as ``bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")``.

    Returns the packed bytes, shape (ceil(n/2), 1) uint8, and the state (double-quantized absmax when
    ``double_quant``, as QLoRA / Unsloth always store it).
    """
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise LlmforgeError(f"NF4 quantization needs a float weight, got {weight.dtype}")
    flat = weight.detach().reshape(-1).float()
    code = nf4_code()
    absmax, idx = _blockwise_absmax_codes(flat, code, blocksize)
    if idx.numel() % 2:  # an odd count is padded with the code of 0.0, as bitsandbytes pads with zeros
        idx = torch.nn.functional.pad(idx, (0, 1), value=int(torch.argmin(code.abs())))
    idx = idx.to(torch.uint8)
    packed = ((idx[0::2] << 4) | idx[1::2]).unsqueeze(1)
    state = NF4State(shape=tuple(weight.shape), dtype=weight.dtype, absmax=absmax, code=code, blocksize=blocksize)
    if double_quant:
        offset = absmax.mean()
        nested_code = dynamic_map()
        scale, codes = _blockwise_absmax_codes(absmax - offset, nested_code, NESTED_BLOCKSIZE)
        state.absmax = codes.to(torch.uint8)
        state.nested = NestedAbsmax(scale=scale, code=nested_code, offset=float(offset.item()))
    return packed, state


def block_absmax(state: NF4State) -> torch.Tensor:
    """The fp32 absmax of every 64-block, undoing the double quantization if present."""
    if state.nested is None:
        return state.absmax.float()
    nested = state.nested
    q = state.absmax.reshape(-1).to(torch.int64)
    n = q.numel()
    scale = nested.scale.float().repeat_interleave(nested.blocksize)[:n]
    absmax = nested.code.float()[q] * scale
    return absmax + torch.tensor(nested.offset, dtype=torch.float32)


def from_bnb_quant_state(qs) -> NF4State:
    """An :class:`NF4State` from a live ``bitsandbytes.functional.QuantState`` (e.g. ``Linear4bit.weight.quant_state``)."""
    if getattr(qs, "quant_type", "nf4") != "nf4":
        raise LlmforgeError(f"quant state is {qs.quant_type}, not nf4", hint="only NF4 4-bit weights are supported")
    state = NF4State(shape=tuple(qs.shape), dtype=qs.dtype, absmax=qs.absmax, code=qs.code.float(),
                     blocksize=int(qs.blocksize))
    if getattr(qs, "nested", False):
        state.nested = NestedAbsmax(scale=qs.state2.absmax.float(), code=qs.state2.code.float(),
                                    offset=float(qs.offset), blocksize=int(qs.state2.blocksize))
    return state


def dequantize_nf4(packed: torch.Tensor, quant_state, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rebuild a weight from NF4 storage, bit-identical to ``bitsandbytes.functional.dequantize_4bit``.

    ``packed``: the stored ``weight`` tensor (uint8, two 4-bit codes per byte, high nibble first; any shape).
    ``quant_state``: an :class:`NF4State` (see :func:`state_from_tensors` for reading a checkpoint) or a
    bitsandbytes ``QuantState``.
    Computes ``code[q] * absmax[block]`` in float32 and casts to ``dtype`` (default: the state's dtype, as
    bitsandbytes does). Returns a tensor of ``quant_state.shape``.
    """
    if not isinstance(quant_state, NF4State):
        quant_state = from_bnb_quant_state(quant_state)
    n = prod(quant_state.shape)
    data = packed.reshape(-1)
    if data.dtype != torch.uint8:
        data = data.view(torch.uint8)
    if data.numel() * 2 < n:
        raise LlmforgeError(f"NF4 weight has {data.numel()} bytes, too few for shape {quant_state.shape}",
                            hint="the 4-bit checkpoint is truncated or its quant_state does not belong to it")
    idx = torch.stack((data >> 4, data & 0xF), dim=1).reshape(-1)[:n].to(torch.int64)
    values = quant_state.code.float()[idx]
    absmax = block_absmax(quant_state)
    blocks_needed = -(-n // quant_state.blocksize)
    if absmax.numel() < blocks_needed:
        raise LlmforgeError(f"NF4 state has {absmax.numel()} absmax blocks, {blocks_needed} needed",
                            hint="the 4-bit checkpoint's quant_state does not match its weight")
    scale = absmax[:blocks_needed].repeat_interleave(quant_state.blocksize)[:n]
    out = (values * scale).reshape(quant_state.shape)
    return out.to(dtype or quant_state.dtype)


# ---------------------------------------------------------------- serialized form (safetensors keys)

def state_to_tensors(prefix: str, packed: torch.Tensor, state: NF4State) -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes writes for a 4-bit ``Linear4bit`` weight, keyed ``<prefix>weight...``."""
    meta: dict = {"quant_type": "nf4", "blocksize": state.blocksize,
                  "dtype": str(state.dtype).removeprefix("torch."), "shape": list(state.shape)}
    out = {f"{prefix}weight": packed, f"{prefix}weight.absmax": state.absmax,
           f"{prefix}weight.quant_map": state.code}
    if state.nested is not None:
        out[f"{prefix}weight.nested_absmax"] = state.nested.scale
        out[f"{prefix}weight.nested_quant_map"] = state.nested.code
        meta.update(nested_blocksize=state.nested.blocksize, nested_dtype="float32",
                    nested_offset=state.nested.offset)
    raw = json.dumps(meta).encode("utf-8")
    out[f"{prefix}weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(raw), dtype=torch.uint8)
    return out


def state_from_tensors(tensors: Mapping[str, torch.Tensor], where: str = "weight") -> NF4State:
    """Read an :class:`NF4State` from the serialized keys (``absmax``, ``quant_map``, ``nested_absmax``,
    ``nested_quant_map``, ``quant_state.bitsandbytes__nf4``), given without the ``<module>.weight.`` prefix."""
    packed_meta = tensors.get("quant_state.bitsandbytes__nf4")
    if packed_meta is None:
        if "quant_state.bitsandbytes__fp4" in tensors:
            raise LlmforgeError(f"{where} is stored as bitsandbytes FP4", hint="only NF4 4-bit bases are supported")
        raise LlmforgeError(f"{where} has no quant_state.bitsandbytes__nf4 entry",
                            hint="the 4-bit checkpoint is incomplete; use the 16-bit base with --base")
    try:
        meta = json.loads(bytes(packed_meta.to(torch.uint8).tolist()).decode("utf-8"))
        dtype = _DTYPES[meta["dtype"]]
        state = NF4State(shape=tuple(int(s) for s in meta["shape"]), dtype=dtype,
                         absmax=tensors["absmax"], code=tensors["quant_map"].float(),
                         blocksize=int(meta["blocksize"]))
        if "nested_absmax" in tensors:
            state.nested = NestedAbsmax(scale=tensors["nested_absmax"].float(),
                                        code=tensors["nested_quant_map"].float(),
                                        offset=float(meta["nested_offset"]),
                                        blocksize=int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)))
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise LlmforgeError(f"{where}: unreadable bitsandbytes NF4 quant state ({exc})",
                            hint="the 4-bit checkpoint is corrupt; use the 16-bit base with --base") from exc
    if meta.get("quant_type", "nf4") != "nf4":
        raise LlmforgeError(f"{where} is stored as {meta.get('quant_type')}", hint="only NF4 4-bit bases are supported")
    return state
