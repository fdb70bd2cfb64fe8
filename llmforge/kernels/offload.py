"""Offloaded gradient checkpointing: each checkpointed layer's input is copied asynchronously to pinned
CPU memory in forward and brought back to recompute the layer in backward, so GPU memory holds no
per-layer activations between the passes."""

from __future__ import annotations

from typing import Callable

import torch
import torch.utils.checkpoint

MIN_OFFLOAD_BYTES = 2 << 20  # smaller inputs stay on the device: the copy costs more than it saves


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, _grad_anchor, hidden, *args):
        ctx.run, ctx.args = run, args
        ctx.device = hidden.device
        ctx.autocast = [(dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
                        for dev in {"cpu", hidden.device.type}]
        with torch.no_grad():
            out = run(hidden, *args)
        if hidden.is_cuda and hidden.numel() * hidden.element_size() >= MIN_OFFLOAD_BYTES:
            saved = torch.empty(hidden.shape, dtype=hidden.dtype, device="cpu", pin_memory=True)
            saved.copy_(hidden, non_blocking=True)
        else:
            saved = hidden.detach()
        ctx.saved_input = saved
        ctx.input_requires_grad = hidden.requires_grad
        return out

    @staticmethod
    def backward(ctx, *grads):
        hidden = ctx.saved_input.to(ctx.device, non_blocking=True).detach().requires_grad_(True)
        ctx.saved_input = None
        with torch.enable_grad(), _autocast_as(ctx.autocast):
            out = ctx.run(hidden, *ctx.args)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        dh = hidden.grad if ctx.input_requires_grad else None
        return (None, None, dh) + (None,) * len(ctx.args)


class _autocast_as:
    """Re-enter the autocast state that the forward ran under."""

    def __init__(self, states):
        self.contexts = [torch.autocast(dev, dtype=dtype, enabled=enabled) for dev, enabled, dtype in states]

    def __enter__(self):
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.contexts):
            c.__exit__(*exc)


_GRAD_ANCHOR: dict[torch.device, torch.Tensor] = {}


def offloaded_checkpoint(run: Callable, *args, **kwargs):
    """Checkpoint ``run(hidden, *args)`` with its input kept in CPU memory until backward.

    Drop-in for ``torch.utils.checkpoint.checkpoint`` as a transformers ``_gradient_checkpointing_func``.
    A constant that requires grad makes the output require grad even when ``hidden`` does not (frozen
    embeddings), so the LoRA weights inside still get gradients. Dropout RNG state is not replayed:
    use it with dropout 0 (LoRA training here).
    """
    if not args or not torch.is_tensor(args[0]) or kwargs:  # nothing positional to offload
        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)
    hidden, args = args[0], args[1:]
    if not torch.is_grad_enabled():
        return run(hidden, *args)
    anchor = _GRAD_ANCHOR.setdefault(hidden.device, torch.zeros((), device=hidden.device, requires_grad=True))
    return _OffloadedCheckpoint.apply(run, anchor, hidden, *args)
