"""Offloaded gradient checkpointing: each checkpointed layer's input is copied asynchronously to pinned
CPU memory in forward and brought back to recompute the layer in backward, so GPU memory holds no
per-layer activations between the passes. The copies run on a side stream so they overlap compute; in
backward the next layer's input is prefetched while the current one is recomputed (one layer input of
extra device memory)."""

from __future__ import annotations

import os
import threading
import weakref
from typing import Callable

import torch
import torch.utils.checkpoint

from llmforge.kernels.layer_graphs import AutocastAs, LayerGraphs, autocast_state

MIN_OFFLOAD_BYTES = 2 << 20  # smaller inputs stay on the device: the copy costs more than it saves
PREFETCH = os.environ.get("LLMFORGE_OFFLOAD_PREFETCH", "1") != "0"  # A/B switch for the next-layer prefetch


class _Offloaded:
    """One layer input kept in pinned CPU memory. Both copies run on a side stream, off the compute stream:
    the device-to-host copy overlaps the layer's forward, and in backward the host-to-device copy of the
    layer that comes next (the one before in forward order, ``prev``) overlaps this layer's recompute."""
    __slots__ = ("host", "device", "prev", "fetched", "ready", "__weakref__")

    def __init__(self, hidden: torch.Tensor, prev: "_Offloaded | None"):
        compute = torch.cuda.current_stream(hidden.device)
        side = _side_stream(hidden.device)
        side.wait_stream(compute)  # hidden is complete
        with torch.cuda.stream(side):
            self.host = torch.empty(hidden.shape, dtype=hidden.dtype, device="cpu", pin_memory=True)
            self.host.copy_(hidden, non_blocking=True)
        hidden.record_stream(side)  # its memory is not reused before the copy is done
        self.device = hidden.device
        self.prev = weakref.ref(prev) if prev is not None else None
        self.fetched: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None

    def prefetch(self) -> None:
        """Start the host-to-device copy on the side stream (after the device-to-host one: same stream)."""
        if self.fetched is None and self.host is not None:
            with torch.cuda.stream(_side_stream(self.device)):
                self.fetched = self.host.to(self.device, non_blocking=True)
                self.ready = torch.cuda.Event()
                self.ready.record()
            self.host = None

    def take(self) -> torch.Tensor:
        """The input back on the device, usable on the compute stream; starts the previous layer's copy."""
        self.prefetch()
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(self.ready)
        hidden, self.fetched, self.ready = self.fetched, None, None
        hidden.record_stream(compute)  # allocated on the side stream, used and freed on the compute stream
        prev = self.prev() if self.prev is not None else None
        self.prev = None
        if prev is not None and PREFETCH:
            prev.prefetch()
        return hidden


_RECOMPUTE = threading.local()   # autograd may run backward on a worker thread per device


def recomputing() -> bool:
    """True while a checkpointed layer is being re-run in backward (its outputs' values are then not used:
    backward needs only the graph it rebuilds and the tensors that graph saves)."""
    return getattr(_RECOMPUTE, "depth", 0) > 0


class _Recomputing:
    def __enter__(self):
        _RECOMPUTE.depth = getattr(_RECOMPUTE, "depth", 0) + 1

    def __exit__(self, *exc):
        _RECOMPUTE.depth -= 1


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
_LAST: dict[torch.device, "weakref.ref[_Offloaded]"] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    stream = _SIDE_STREAMS.get(device)
    if stream is None:
        stream = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return stream


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, options, _grad_anchor, hidden, *args):
        graphs, offload = options
        ctx.run, ctx.args, ctx.graphs = run, args, graphs
        ctx.device = hidden.device
        ctx.autocast = autocast_state(hidden.device.type)
        if offload and hidden.is_cuda and hidden.numel() * hidden.element_size() >= MIN_OFFLOAD_BYTES:
            last = _LAST.get(hidden.device)
            ctx.offloaded = _Offloaded(hidden, last() if last is not None else None)
            _LAST[hidden.device] = weakref.ref(ctx.offloaded)
            ctx.saved_input = None
        else:
            ctx.offloaded, ctx.saved_input = None, hidden.detach()
        out = graphs.forward(run, hidden, args, ctx.autocast) if graphs is not None else None
        if out is None:
            with torch.no_grad():
                out = run(hidden, *args)
        ctx.input_requires_grad = hidden.requires_grad
        return out

    @staticmethod
    def backward(ctx, *grads):
        source = ctx.offloaded.take() if ctx.offloaded is not None else ctx.saved_input
        ctx.offloaded = ctx.saved_input = None
        if ctx.graphs is not None:
            grad = grads[0] if len(grads) == 1 else None
            done, dh = ctx.graphs.backward(ctx.run, source, ctx.args, ctx.autocast, grad, ctx.input_requires_grad,
                                           _Recomputing)
            if done:
                return (None, None, None, dh) + (None,) * len(ctx.args)
        hidden = source.detach().requires_grad_(True)
        with torch.enable_grad(), AutocastAs(ctx.autocast), _Recomputing():
            out = ctx.run(hidden, *ctx.args)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        dh = hidden.grad if ctx.input_requires_grad else None
        return (None, None, None, dh) + (None,) * len(ctx.args)


_GRAD_ANCHOR: dict[torch.device, torch.Tensor] = {}


def offloaded_checkpoint(run: Callable, *args, graphs: "LayerGraphs | None" = None, offload: bool = True, **kwargs):
    """Checkpoint ``run(hidden, *args)`` with its input kept in CPU memory until backward.

    Drop-in for ``torch.utils.checkpoint.checkpoint`` as a transformers ``_gradient_checkpointing_func``.
    A constant that requires grad makes the output require grad even when ``hidden`` does not (frozen
    embeddings), so the LoRA weights inside still get gradients. Dropout RNG state is not replayed:
    use it with dropout 0 (LoRA training here). ``graphs``: run the layer's forward and backward as CUDA graphs
    where it can (``layer_graphs.py``); ``offload=False`` keeps the input on the device (the last layer, whose
    backward comes right after its forward, when it runs as a graph too).
    """
    if not args or not torch.is_tensor(args[0]) or kwargs:  # nothing positional to offload
        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)
    hidden, args = args[0], args[1:]
    if not torch.is_grad_enabled():
        return run(hidden, *args)
    anchor = _GRAD_ANCHOR.setdefault(hidden.device, torch.zeros((), device=hidden.device, requires_grad=True))
    return _OffloadedCheckpoint.apply(run, (graphs, offload), anchor, hidden, *args)
