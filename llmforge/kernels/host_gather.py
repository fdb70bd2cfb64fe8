"""Rows of a table in pinned host memory gathered straight into device memory by a GPU kernel.

The embedding lookup of host-resident input embeddings (``host_weights.py``) needs, per forward, only the rows of
the batch's tokens (4096 x 8 KiB at 8B with batch 2 x 2048). Gathering them on the CPU first needs the token ids
on the host: a device-to-host copy that stalls the host until the GPU has caught up, at every forward. Pinned
memory is mapped into the GPU's address space (unified addressing), so a kernel can read the rows itself over
PCIe: the ids stay on the device and the host queues the step without waiting.

``gather_rows(table, ids)``: ``table`` (rows, cols) contiguous in pinned host memory (any memory under Triton's
CPU interpreter), ``ids`` on the output device. Ids outside ``[0, rows)`` give rows of zeros (no fault; the trainer
checks the data's ids against the embedding size before training). Returns None where the kernel cannot run
(no Triton, ``LLMFORGE_KERNELS=torch``, or a driver that refuses the host pointer): the caller gathers on the host.
"""

from __future__ import annotations

import os

import torch

from llmforge.kernels._backend import interpreting, triton_importable, use_triton

BLOCK = 1024   # columns per program: 2 KiB of bf16, 16 coalesced 128-byte reads
_REFUSED = [False]   # set when the driver refused a host pointer once: the host gather from then on
ENABLED = os.environ.get("LLMFORGE_HOST_GATHER", "1") != "0"   # A/B switch (benchmarks): 0 = the host gather

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_rows_kernel(TABLE, IDS, OUT, n_rows, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        idx = tl.load(IDS + row).to(tl.int64) + tl.zeros_like(cols).to(tl.int64)   # the row's id in every lane
        valid = (idx >= 0) & (idx < n_rows)
        in_row = cols < n_cols
        values = tl.load(TABLE + tl.where(valid, idx, 0) * n_cols + cols, mask=in_row & valid, other=0.0)
        tl.store(OUT + row * n_cols + cols, values, mask=in_row)


def can_gather_on_device(table: torch.Tensor, ids: torch.Tensor) -> bool:
    """Whether ``gather_rows`` applies: a contiguous 2-D table in pinned host memory and ids on a CUDA device
    (or, under Triton's CPU interpreter, any table and ids on the CPU)."""
    if not ENABLED or _REFUSED[0] or table.dim() != 2 or not table.is_contiguous() or table.device.type != "cpu":
        return False
    if interpreting():
        return ids.device.type == "cpu" and use_triton(ids)
    return ids.is_cuda and use_triton(ids) and table.is_pinned()


def gather_rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
    """``table[ids]`` of shape ``(*ids.shape, cols)`` on ``ids``' device, read by the GPU from pinned host memory;
    None where that cannot run (see the module docstring)."""
    if not can_gather_on_device(table, ids):
        return None
    flat = ids.reshape(-1).contiguous()
    out = torch.empty((flat.numel(), table.shape[1]), dtype=table.dtype, device=ids.device)
    if flat.numel():
        grid = (flat.numel(), triton.cdiv(table.shape[1], BLOCK))
        try:
            _gather_rows_kernel[grid](table, flat, out, table.shape[0], table.shape[1], BLOCK=BLOCK)
        except (ValueError, RuntimeError):   # the launcher refused the host pointer ("Pointer argument cannot be
            _REFUSED[0] = True                #  accessed from Triton", or a driver error reading its attributes)
            return None
    return out.view(*ids.shape, table.shape[1])
