"""Choosing between a Triton kernel and its torch fallback."""

from __future__ import annotations

import functools
import os
import sys

import torch


@functools.cache
def triton_importable() -> bool:
    """True when ``import triton`` works (it may still lack a GPU)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "no triton"
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton path should run for these tensors.

    Triton runs on CUDA tensors, or anywhere under the interpreter; ``LLMFORGE_KERNELS=torch`` forces the
    torch fallbacks (handy for A/B checks).
    """
    if os.environ.get("LLMFORGE_KERNELS", "").lower() == "torch" or not triton_importable():
        return False
    if interpreting():
        return True
    return all(t.is_cuda for t in tensors)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: autocast's dtype when autocast is on, else ``x.dtype``."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def env_mib(name: str) -> int:
    """An A/B switch given in MiB by environment variable ``name`` (unset: 0, off), as bytes. A value that is not a
    whole number is one warning line and counts as off."""
    text = os.environ.get(name, "0").strip() or "0"
    try:
        return max(0, int(text)) << 20
    except ValueError:
        print(f"warning: {name}={text!r} is not a whole number of MiB; {name} is off", file=sys.stderr)
        return 0
