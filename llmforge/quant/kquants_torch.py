"""The K-quant packing of :mod:`llmforge.quant.kquants` on torch tensors (CPU or CUDA), same bytes.

It runs the very same algorithm through :class:`TorchOps`. What keeps it bit-exact on a GPU
(see shared/docs/gguf-and-kquants.md, "Torch ports"):

- every constant is a 0-dim float32 tensor on the device, so ``c / t`` and ``t / c`` are IEEE
  divisions (a Python scalar numerator becomes ``reciprocal(t) * c``; CUDA turns ``t / 2.0`` into a
  multiply);
- square roots are taken in float64 and rounded to float32 (torch's float32 CPU sqrt is not always
  correctly rounded; a float64 sqrt rounded once is);
- eager, unfused ops only: no ``torch.compile``, no ``addcmul``;
- NaN is mapped to 0 in the rounding helper, as llama.cpp's x86 build gets it.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from .kquants import BLOCK_BYTES, QK_K, _check, _block_weights, quantize_blocks

_MAGIC = 12582912.0


class TorchOps:
    """The quantizer core's array operations on float32/int32 torch tensors of one device."""

    def __init__(self, device: torch.device | str, cumsum: bool = False):
        self.device = torch.device(device)
        # cumsum=True: sequential sums as one ``cumsum`` over the outer dim (CUDA scans an outer dim column
        # by column, in float32). Off by default until benchmarks/quantize_gpu_check.py shows it exact.
        # (CPU torch accumulates float cumsum in double: never on CPU.)
        self.use_cumsum = cumsum and self.device.type == "cuda"
        self._magic = torch.tensor(_MAGIC, dtype=torch.float32, device=self.device)
        self._consts: dict[float, torch.Tensor] = {}

    def const(self, value: Any) -> torch.Tensor:
        key = float(np.float32(value))
        c = self._consts.get(key)
        if c is None:
            c = self._consts[key] = torch.tensor(key, dtype=torch.float32, device=self.device)
        return c

    def zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float32, device=self.device)

    def tr(self, a: torch.Tensor) -> torch.Tensor:
        return a.T.contiguous()

    def nearest_int(self, f: torch.Tensor) -> torch.Tensor:
        bits = torch.add(f, self._magic).view(torch.int32)
        out = (bits & 0x7FFFFF) - 0x400000
        if self.device.type != "cpu":   # x86 CPUs already make llama.cpp's default NaN, which maps to 0
            out = torch.where(torch.isnan(f), torch.zeros_like(out), out)
        return out

    def seq_sum(self, terms: torch.Tensor) -> torch.Tensor:
        if self.use_cumsum:
            return torch.cumsum(terms, dim=0)[-1]
        acc = torch.zeros(terms.shape[1:], dtype=torch.float32, device=self.device)
        for i in range(terms.shape[0]):
            acc = acc + terms[i]
        return acc

    def where(self, cond: torch.Tensor, a: Any, b: Any) -> torch.Tensor:
        return torch.where(cond, a, b)

    def abs(self, a: torch.Tensor) -> torch.Tensor:
        return torch.abs(a)

    def sqrt(self, a: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(a.double()).float()

    def clip(self, a: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return torch.clamp(a, lo, hi)

    def imin(self, a: torch.Tensor, hi: int) -> torch.Tensor:
        return torch.clamp(a, max=hi)

    def round_clip(self, f: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Round half to even, then clip, as float32."""
        return torch.clamp(torch.round(f), lo, hi)

    def fl(self, a: torch.Tensor) -> torch.Tensor:
        return a.to(torch.float32)

    def fp16(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = a.to(torch.float16)
        return h.view(torch.int16).to(torch.int32) & 0xFFFF, h.to(torch.float32)

    def put(self, dst: torch.Tensor, cond: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        return torch.where(cond, src, dst)

    def u8(self, a: torch.Tensor) -> torch.Tensor:
        return a.to(torch.uint8)

    def stack_cols(self, cols: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(cols, dim=1)

    def cat(self, parts: list[torch.Tensor], axis: int = 1) -> torch.Tensor:
        return torch.cat(parts, dim=axis)

    def repeat(self, a: torch.Tensor, k: int) -> torch.Tensor:
        return torch.repeat_interleave(a, k)

    def stack(self, cols: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(cols)

    def any(self, a: torch.Tensor) -> bool:
        return bool(a.any())

    def nonzero(self, a: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(a).reshape(-1)

    def to_numpy(self, a: torch.Tensor, dtype: Any) -> np.ndarray:
        if np.dtype(dtype) == np.uint8:
            a = a.to(torch.uint8)  # callers pass values already in 0..255: 4x less to copy back
        return a.cpu().numpy().astype(dtype)


def _to_device(a: np.ndarray, dev: torch.device) -> torch.Tensor:
    """A float32 block range on ``dev`` (read-only inputs such as GGUF memmaps are copied first)."""
    if not a.flags.writeable or not a.flags.c_contiguous:
        a = np.array(a, dtype=np.float32)
    return torch.from_numpy(a).to(dev)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def gpu_kernel_path(dev: torch.device) -> str:
    """``triton`` (fused kernels, :mod:`kquants_triton`) or ``eager`` (:class:`TorchOps`) for ``dev``.

    CUDA uses Triton when it imports; ``LLMFORGE_KQUANT_GPU=eager`` forces the eager path (A/B checks).
    """
    if dev.type != "cuda" or os.environ.get("LLMFORGE_KQUANT_GPU", "").lower() == "eager":
        return "eager"
    from ..kernels._backend import triton_importable

    return "triton" if triton_importable() else "eager"


def quantize_k_torch(data: np.ndarray | torch.Tensor, qtype: T, importance: np.ndarray | None = None,
                     device: str | torch.device | None = None, chunk_blocks: int | None = None,
                     cumsum: bool = False) -> np.ndarray:
    """Same contract and bytes as :func:`llmforge.quant.kquants.quantize_k`, computed with torch.

    ``device`` defaults to CUDA when present; there the fused Triton kernels run (see
    :func:`gpu_kernel_path`; ``cumsum=True`` is an eager-path option and keeps it). CPU torch uses its
    intra-op threads (``torch.set_num_threads``).
    """
    dev = torch.device(device or default_device())
    if not cumsum and gpu_kernel_path(dev) == "triton":
        from .kquants_triton import quantize_k_triton

        return quantize_k_triton(data, qtype, importance, device=dev, chunk_blocks=chunk_blocks)
    if isinstance(data, torch.Tensor):
        data = data.detach().to("cpu", torch.float32).numpy()
    data, importance = _check(data, qtype, importance)
    blocks = data.reshape(-1, QK_K)
    weights = _block_weights(importance, data.shape)
    ops = TorchOps(dev, cumsum=cumsum)
    chunk = chunk_blocks or (262144 if dev.type == "cuda" else 8192)
    out = np.empty((blocks.shape[0], BLOCK_BYTES[qtype]), dtype=np.uint8)
    with torch.no_grad():
        for start in range(0, blocks.shape[0], chunk):
            stop = min(start + chunk, blocks.shape[0])
            xb = _to_device(blocks[start:stop], dev)
            qw = None if weights is None else _to_device(weights[start:stop], dev)
            out[start:stop] = quantize_blocks(ops, qtype, xb, qw)
    row_bytes = data.shape[-1] // QK_K * BLOCK_BYTES[qtype]
    return out.reshape(*data.shape[:-1], row_bytes)
