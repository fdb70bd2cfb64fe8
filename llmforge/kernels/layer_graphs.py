"""CUDA graphs of checkpointed decoder layers: each layer's no-grad forward and its backward (recompute plus
gradients) replayed as one graph launch each, so the host no longer pays Python, autograd and kernel-launch
time per operation. The host-bound part of a LoRA step on a large GPU is exactly this: hundreds of small
launches per layer while the GPU runs each in microseconds.

How it works (``offload.py`` calls it from the checkpoint of every layer; the last one keeps its input on the
device):
- Layers with the same input shape, dtypes, autocast state and keyword arguments (one ``_GraphSet``) share
  static buffers: the input, the output, the output's gradient, the input's gradient, and one copy of each
  tensor keyword argument (RoPE's cos/sin, masks, positions). They also share one memory pool: each graph
  leaves nothing live in it (results are copied into the shared buffers or into persistent gradient buffers),
  and graphs replay in the order they were captured (forward layers up, backward layers down), so
  one layer's working memory is reused by the next.
- A layer runs eagerly the first time (Triton compiles, caches fill), is captured the second time (after one
  warm-up run on the capture stream) and replayed from then on.
- Backward writes the LoRA gradients into persistent buffers. A parameter with no gradient yet gets the
  buffer itself as ``.grad`` (no copy); one that has a gradient gets it added. Before the next replay a
  ``.grad`` that is still that buffer (gradient accumulation without ``zero_grad``) is copied off first.
  Gradient hooks on those parameters are not run (the trainer registers none).

Limits, checked per call (anything else runs eagerly and is counted in ``stats()`` with the reason):
the layer is called as transformers calls a checkpointed layer (``_checkpointed_layer``), returns
one tensor shaped like its input, and its keyword arguments are tensors that need no gradient, tuples of
them, or constants. A failed capture sends every layer of that shape back to eager (they run the same code).
Python inside the layer must not branch on tensor values (decoder layers do not); the random-number state is
not captured (dropout must be 0, as for the fused LoRA kernels). At most
``MAX_SETS`` shapes are captured per model; further shapes run eagerly. Each captured shape holds one
layer's working memory in its pool for good.

``CudaGraphBackend`` is the only CUDA-specific part; tests on the CPU substitute one whose "replay" re-runs the
captured function, to check the buffer, gradient and fallback logic.

Status: opt-in. Real capture passed on an H100 (``tests/test_layer_graphs_gpu.py``, the 8B
step check with ``--graphs``, ``llmforge train`` with ``train.cuda_graphs``); see docs/kernels.md for the speed and
memory measured.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

_BUILDING = [0]     # > 0 while a graph's function runs (warm-up and capture): per-call state must not be cached

WARMUP_CALLS = 1   # eager calls of a layer before it is captured (Triton compiles, autotunes, caches fill)
MAX_SETS = 2       # captured shapes per model; more run eagerly (each holds a layer's working memory)
_CONSTANT_TYPES = (type(None), bool, int, float, str, torch.dtype)
# A/B switch: hand the allocator's free cached memory back once, at the first forward replay after new captures
# (the capture step's leftovers), so the steady state does not keep them reserved
TRIM_AFTER_CAPTURE = os.environ.get("LLMFORGE_GRAPH_TRIM", "0") == "1"
# A/B switch (LLMFORGE_GRAPH_WARMUP=light): warm the capture stream with two tiny matmuls (its cuBLAS and cuBLASLt
# workspaces, the per-stream state a capture must not create) instead of a whole run of the layer there, whose
# working set would be held beside the graphs' pool during the capture step. The layer's first, eager call has
# compiled and autotuned its kernels already.
LIGHT_WARMUP = os.environ.get("LLMFORGE_GRAPH_WARMUP", "full") == "light"


def building_graph() -> bool:
    """True while a layer graph is being warmed up or captured: callers must not reuse cached tensors then (a
    graph must compute everything it reads, so its replays see the current parameters)."""
    return _BUILDING[0] > 0


class _Building:
    def __enter__(self):
        _BUILDING[0] += 1

    def __exit__(self, *exc):
        _BUILDING[0] -= 1


class CudaGraphBackend:
    """Captures with ``torch.cuda.graph`` on one side stream, after one warm-up run on that stream."""

    def __init__(self) -> None:
        self.stream: torch.cuda.Stream | None = None

    def new_pool(self):
        return torch.cuda.graph_pool_handle()

    def capture(self, fn: Callable[[], None], pool):
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        # the warm-up's blocks are tagged to the side stream: first hand back what the current stream holds cached
        # but unused, so the capture step does not reserve both (torch.cuda.graph empties the cache too, but only
        # after the warm-up)
        torch.cuda.empty_cache()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            # warm-up: cuBLAS workspaces and lazy state of this stream exist before capture
            _warm_matmuls() if LIGHT_WARMUP else fn()
        torch.cuda.current_stream().wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=self.stream, capture_error_mode="thread_local"):
            fn()
        return graph

    @staticmethod
    def trim() -> None:
        torch.cuda.empty_cache()

    @staticmethod
    def pool_bytes() -> int | None:
        """Device memory held by graph pools (segments outside the default pool), all devices; None where this
        torch does not say which pool a segment belongs to."""
        segments = torch.cuda.memory_snapshot()
        if any("segment_pool_id" not in seg for seg in segments):
            return None
        return sum(seg["total_size"] for seg in segments if tuple(seg["segment_pool_id"]) != (0, 0))


def _warm_matmuls() -> None:
    """A bf16 matmul and, where the GPU has them, an e4m3 one on the current stream: they create its cuBLAS
    handle and workspace and its cuBLASLt workspace (best effort: a capture that still needs more fails and
    falls back to eager as any failed capture does)."""
    a = torch.ones(16, 16, device="cuda", dtype=torch.bfloat16)
    torch.mm(a, a)
    if torch.cuda.get_device_capability() >= (8, 9):
        q, one = a.to(torch.float8_e4m3fn), torch.ones((), device="cuda")
        try:
            torch._scaled_mm(q, q.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        except RuntimeError:   # this torch/GPU pair has no FP8 matmul: nothing of it to warm
            pass


def _flatten(value) -> tuple[list[torch.Tensor], object] | None:
    """Tensors of one keyword argument and its signature; None where graphs cannot take it."""
    if torch.is_tensor(value):
        if value.requires_grad:
            return None
        return [value], ("T", tuple(value.shape), value.dtype, value.device, value.stride())
    if isinstance(value, (tuple, list)) and all(torch.is_tensor(v) for v in value):
        if any(v.requires_grad for v in value):
            return None
        return list(value), ("S", type(value).__name__,
                             tuple((tuple(v.shape), v.dtype, v.device, v.stride()) for v in value))
    if isinstance(value, _CONSTANT_TYPES):
        return [], ("C", value)
    return None


def _checkpointed_layer(run) -> torch.nn.Module | None:
    """The layer of a transformers checkpointed call, or None. transformers wraps it as
    ``partial(forward, layer, **kwargs)`` (5.2x) or as ``partial(layer_call, **kwargs)``, a method bound to the
    layer (``super().__call__``, earlier 5.x and 4.x)."""
    if not isinstance(run, functools.partial):
        return None
    if len(run.args) == 1 and isinstance(run.args[0], torch.nn.Module):
        return run.args[0]
    if not run.args and isinstance(getattr(run.func, "__self__", None), torch.nn.Module):
        return run.func.__self__
    return None


def _layer_call(run) -> Callable:
    """``call(hidden, **kwargs)`` running the layer of ``run`` (one :func:`_checkpointed_layer` accepts)."""
    return functools.partial(run.func, *run.args)


def autocast_state(device_type: str) -> tuple:
    """The autocast state of the CPU and of ``device_type``: what a checkpointed layer's backward re-enters."""
    return tuple((dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
                 for dev in sorted({"cpu", device_type}))


class AutocastAs:
    """Re-enter an ``autocast_state``. ``cache_enabled=False`` inside graphs: autocast's cached weight casts
    would be freed after capture while the graph still reads them."""

    def __init__(self, state: tuple, cache_enabled: bool | None = None):
        self.contexts = [torch.autocast(dev, dtype=dtype, enabled=on, cache_enabled=cache_enabled)
                         for dev, on, dtype in state]

    def __enter__(self):
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.contexts):
            c.__exit__(*exc)


@dataclass
class _LayerGraphs:
    params: tuple[torch.Tensor, ...]
    forward: object | None = None
    backward: object | None = None
    grads: list | None = None           # persistent gradient buffers (one per parameter; None: unused)
    forward_calls: int = 0


@dataclass
class _GraphSet:
    """Buffers, pool and per-layer graphs of one (shape, dtype, autocast, keyword-argument) signature."""
    pool: object
    inp: torch.Tensor
    out: torch.Tensor
    grad: torch.Tensor
    dh: torch.Tensor
    names: tuple[str, ...]                                       # keyword arguments, in call order
    statics: dict[str, object]                                  # name -> static tensor(s) or constant
    static_tensors: list[torch.Tensor]                          # the tensors of ``statics``, flattened in order
    autocast: tuple
    layers: dict[int, _LayerGraphs] = field(default_factory=dict)
    sources: tuple = ()                                          # the tensors last copied into ``statics``
    broken: str = ""                    # why these layers run eagerly for good (a capture failed; they share code)

    def load_kwargs(self, tensors: list[torch.Tensor]) -> None:
        """Copy this call's tensor arguments (flattened by ``_plan``) into the static ones (skipped when they are
        the same tensors, unchanged, as for every layer of one pass)."""
        key = tuple((t, t._version) for t in tensors)
        if len(key) == len(self.sources) and all(a is b and va == vb for (a, va), (b, vb) in zip(key, self.sources)):
            return
        for static, t in zip(self.static_tensors, tensors):
            static.copy_(t)
        self.sources = key

    def static_kwargs(self) -> dict:
        return {name: self.statics[name] for name in self.names}


class LayerGraphs:
    """The graphs of one model's checkpointed layers (``patch_model(cuda_graphs=True)`` makes one)."""

    def __init__(self, backend=None) -> None:
        self.backend = backend if backend is not None else CudaGraphBackend()
        self.sets: dict[tuple, _GraphSet] = {}
        self.counts: Counter = Counter()     # captured / replayed / eager, per direction
        self.reasons: Counter = Counter()    # why calls ran eagerly
        self.trim_pending = False            # a capture happened since the last trim (TRIM_AFTER_CAPTURE)

    # ------------------------------------------------------------------------------------------ planning
    def _eager(self, reason: str) -> None:
        self.counts["eager"] += 1
        self.reasons[reason] += 1

    def _plan(self, run, hidden: torch.Tensor, args: tuple, autocast: tuple, *,
              create: bool) -> tuple[_GraphSet, _LayerGraphs, list[torch.Tensor]] | None:
        if args:
            return self._eager("extra positional arguments")
        layer = _checkpointed_layer(run)
        if layer is None:
            return self._eager("not a transformers checkpointed layer call")
        kwargs = run.keywords
        signature = [tuple(hidden.shape), hidden.dtype, hidden.device, hidden.stride(), autocast]
        tensors = []
        for name, value in kwargs.items():
            flat = _flatten(value)
            if flat is None:
                return self._eager(f"keyword argument {name!r} ({type(value).__name__})")
            tensors.extend(flat[0])
            signature.append((name, flat[1]))
        key = tuple(signature)
        graph_set = self.sets.get(key)
        if graph_set is None:
            if not create:
                return self._eager("backward of a call that ran eagerly")
            if len(self.sets) >= MAX_SETS:
                return self._eager(f"more than {MAX_SETS} shapes")
            graph_set = self.sets[key] = self._new_set(hidden, kwargs, signature[4])
        layer_graphs = graph_set.layers.get(id(layer))
        if layer_graphs is None:
            params = tuple(p for p in layer.parameters() if p.requires_grad)
            layer_graphs = graph_set.layers[id(layer)] = _LayerGraphs(params)
        if graph_set.broken:
            return self._eager(graph_set.broken)
        return graph_set, layer_graphs, tensors

    def _new_set(self, hidden: torch.Tensor, kwargs: dict, autocast: tuple) -> _GraphSet:
        statics = {}
        for name, value in kwargs.items():
            if torch.is_tensor(value):
                statics[name] = value.clone()
            elif isinstance(value, (tuple, list)):
                statics[name] = type(value)(v.clone() for v in value)
            else:
                statics[name] = value
        return _GraphSet(pool=self.backend.new_pool(), inp=torch.empty_like(hidden), out=torch.empty_like(hidden),
                         grad=torch.empty_like(hidden), dh=torch.empty_like(hidden), names=tuple(kwargs),
                         statics=statics, static_tensors=[t for v in statics.values() for t in _flatten(v)[0]],
                         autocast=autocast)

    def _capture(self, fn: Callable[[], None], graph_set: _GraphSet, what: str):
        try:
            graph = self.backend.capture(fn, graph_set.pool)
        except Exception as error:  # an op that cannot be captured: these layers (same code) stay eager from now on
            graph_set.broken = f"{what} capture failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
            self._eager(graph_set.broken)
            return None
        self.counts[f"captured {what}"] += 1
        self.trim_pending = TRIM_AFTER_CAPTURE
        return graph

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, run, hidden: torch.Tensor, args: tuple, autocast: tuple) -> torch.Tensor | None:
        """The layer's no-grad output from its graph, or None: the caller runs it eagerly. ``autocast``: the
        state it runs under (``autocast_state``)."""
        plan = self._plan(run, hidden, args, autocast, create=True)
        if plan is None:
            return None
        graph_set, layer_graphs, tensors = plan
        layer_graphs.forward_calls += 1
        if layer_graphs.forward is None and layer_graphs.forward_calls <= WARMUP_CALLS:
            return self._eager("warm-up")
        graph_set.inp.copy_(hidden)
        graph_set.load_kwargs(tensors)
        if layer_graphs.forward is None:
            call = _layer_call(run)

            def fn():
                with torch.no_grad(), AutocastAs(graph_set.autocast, cache_enabled=False), _Building():
                    out = call(graph_set.inp, **graph_set.static_kwargs())
                if not (torch.is_tensor(out) and out.shape == graph_set.out.shape and out.dtype == graph_set.out.dtype):
                    raise TypeError("the layer does not return one tensor shaped like its input")
                graph_set.out.copy_(out)

            layer_graphs.forward = self._capture(fn, graph_set, "forward")
            if layer_graphs.forward is None:
                return None
        elif self.trim_pending and hasattr(self.backend, "trim"):
            self.trim_pending = False
            self.backend.trim()
            self.counts["trims"] += 1
        layer_graphs.forward.replay()
        self.counts["replayed forward"] += 1
        return graph_set.out.clone()

    # ------------------------------------------------------------------------------------------ backward
    def backward(self, run, hidden: torch.Tensor, args: tuple, autocast: tuple, grad: torch.Tensor | None,
                 need_dh: bool, recomputing: Callable) -> tuple[bool, torch.Tensor | None]:
        """Recompute and backpropagate the layer from its graph (``recomputing()``: the context the recompute
        runs in): (True, input gradient or None) with the LoRA gradients accumulated into ``.grad``, or
        (False, None): the caller runs it eagerly. ``autocast``: the state the forward ran under."""
        if grad is None:
            self._eager("no output gradient")
            return False, None
        plan = self._plan(run, hidden, args, autocast, create=False)
        if plan is None:
            return False, None
        graph_set, layer_graphs, tensors = plan
        if tuple(grad.shape) != tuple(graph_set.grad.shape) or grad.dtype != graph_set.grad.dtype:
            self._eager("output gradient shaped unlike the output")
            return False, None
        if layer_graphs.forward is None:  # captured together: a layer whose forward ran eagerly stays eager
            self._eager("warm-up")
            return False, None
        for p, buffer in zip(layer_graphs.params, layer_graphs.grads or ()):
            if buffer is not None and p.grad is buffer:   # still held from the last replay: keep it apart
                p.grad = buffer.clone()
        graph_set.inp.copy_(hidden)
        graph_set.grad.copy_(grad)
        graph_set.load_kwargs(tensors)
        if layer_graphs.backward is None:
            call, params = _layer_call(run), layer_graphs.params
            # persistent gradient buffers, allocated once here, outside the graph and its warm-up
            buffers, unused = [torch.zeros_like(p) for p in params], set()

            def fn():
                x = graph_set.inp.detach().requires_grad_(need_dh)
                inputs = ([x] if need_dh else []) + list(params)
                with (torch.enable_grad(), AutocastAs(graph_set.autocast, cache_enabled=False), recomputing(),
                      _Building()):
                    out = call(x, **graph_set.static_kwargs())
                grads = torch.autograd.grad(out, inputs, graph_set.grad, allow_unused=True)
                if need_dh:
                    graph_set.dh.copy_(grads[0] if grads[0] is not None else torch.zeros_like(x))
                for i, (buffer, g) in enumerate(zip(buffers, grads[1:] if need_dh else grads)):
                    if g is None:
                        unused.add(i)
                    else:
                        buffer.copy_(g)

            layer_graphs.backward = self._capture(fn, graph_set, "backward")
            if layer_graphs.backward is None:
                return False, None
            layer_graphs.grads = [None if i in unused else b for i, b in enumerate(buffers)]
        layer_graphs.backward.replay()
        self.counts["replayed backward"] += 1
        for p, buffer in zip(layer_graphs.params, layer_graphs.grads):
            if buffer is None:
                continue
            if p.grad is None:
                p.grad = buffer
            else:
                p.grad.add_(buffer)
        return True, (graph_set.dh.clone() if need_dh else None)

    def stats(self) -> str:
        """One line: graphs captured, replays, eager calls and why."""
        parts = [f"{n} {what}" for what, n in sorted(self.counts.items())]
        pool = self.backend.pool_bytes() if self.sets and hasattr(self.backend, "pool_bytes") else None
        if pool is not None:
            parts.append(f"graph pools {pool / 2**30:.2f} GiB")
        if self.reasons:
            parts.append("eager because: " + "; ".join(f"{why} x{n}" for why, n in self.reasons.most_common(4)))
        return "layer graphs: " + (", ".join(parts) or "none used")
