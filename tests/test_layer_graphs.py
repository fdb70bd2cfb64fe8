"""Layer graphs (``llmforge/kernels/layer_graphs.py``) on the CPU, with a stand-in backend whose "replay" re-runs
the captured function on the static buffers: a training run with graphs must give the same losses and gradients
as the same run without them, step after step (new positions each step, weights updated in between), with
gradient accumulation, with ``zero_grad`` to zeros, across shapes, and when capture fails. Real CUDA capture is
checked by ``tests/test_layer_graphs_gpu.py`` on a GPU."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from kernels_models import VOCAB, tiny_lora_model
from llmforge.kernels import layer_graphs
from llmforge.kernels.layer_graphs import LayerGraphs
from llmforge.kernels.patch import patch_model, unpatch_rope

LAYERS = 4   # 3 offloaded layers and the last (kept on the device): all 4 run as graphs


class RerunBackend:
    """Capture = one warm-up run; replay = run the function again (reads the same static buffers)."""

    def __init__(self, fail: bool = False):
        self.fail, self.captured, self.attempts = fail, 0, 0

    def new_pool(self):
        return None

    def capture(self, fn, pool):
        self.attempts += 1
        fn()
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing\nmore")
        self.captured += 1
        return type("Rerun", (), {"replay": staticmethod(fn)})()


def _as_bound_method_calls(model) -> None:
    """Make the layers' checkpointed calls take the form earlier transformers releases use:
    ``partial(method bound to the layer, **kwargs)`` instead of ``partial(forward, layer, **kwargs)``."""
    for layer in model.modules():
        inner = getattr(layer, "_gradient_checkpointing_func", None)
        if inner is not None and getattr(layer, "gradient_checkpointing", False):
            def rewrapped(run, *args, inner=inner, **kwargs):
                assert len(run.args) == 1, "the test expects transformers' partial(forward, layer, **kwargs)"
                bound = functools.partial(run.func.__get__(run.args[0]), **run.keywords)
                return inner(bound, *args, **kwargs)
            layer._gradient_checkpointing_func = rewrapped


def _pair(backend, bound_calls: bool = False):
    """The same LoRA model twice, patched with offloaded checkpointing; the second with layer graphs.
    ``bound_calls``: the layers are called as earlier transformers releases call them."""
    ref = tiny_lora_model("llama", num_layers=LAYERS)
    new = copy.deepcopy(ref)
    graphs = LayerGraphs(backend=backend)
    for model, g in ((ref, None), (new, graphs)):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        report = patch_model(model, offload_checkpointing=True, cuda_graphs=g if g is not None else False)
        assert report.offloaded_checkpoint_layers == LAYERS - 1, report.summary()
        if bound_calls:
            _as_bound_method_calls(model)
    return ref, new, graphs


def _batch(step: int, rows: int = 2, length: int = 9):
    """Packed rows whose document boundary moves with the step (RoPE's cos/sin change every step)."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    cut = 2 + step % (length - 3)
    positions = torch.cat([torch.arange(cut), torch.arange(length - cut)]).repeat(rows, 1)
    return dict(input_ids=ids, labels=ids.clone(), position_ids=positions)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for name, g in a.items():
        scale = max(float(g.abs().max()), 1e-3)
        assert float(g.abs().max()) > 0, f"{what} {name}: zero gradient (vacuous)"
        assert float((b[name] - g).abs().max()) <= 1e-5 * scale, f"{what} {name}: gradients differ"


@pytest.fixture(params=["forward", "bound method"])
def pair(request):
    ref, new, graphs = _pair(RerunBackend(), bound_calls=request.param == "bound method")
    yield ref, new, graphs
    unpatch_rope(ref)


def _train_side_by_side(ref, new, before=lambda model: None, steps: int = 4) -> None:
    """``steps`` AdamW steps (clipped) of both models on the same batches, asserting equal losses and gradients
    at each; ``before(model)`` runs before each model's forward."""
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ref, new)]
    for step in range(steps):
        losses = []
        for model in (ref, new):
            before(model)
            loss = model(**_batch(step)).loss
            loss.backward()
            losses.append(float(loss))
        assert abs(losses[0] - losses[1]) <= 1e-6 * abs(losses[0]), f"step {step}: {losses}"
        _close(_grads(ref), _grads(new), f"step {step}")
        for opt in opts:
            torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)


def test_training_steps_match_without_graphs(pair) -> None:
    from llmforge.trainer.run import layer_graphs_of

    ref, new, graphs = pair
    assert layer_graphs_of(new) is graphs and layer_graphs_of(ref) is None   # how the trainer finds them
    _train_side_by_side(ref, new)
    counts = graphs.counts
    assert counts["captured forward"] == counts["captured backward"] == LAYERS, graphs.stats()
    # step 1 eager (warm-up), step 2 captures and replays, steps 3-4 replay
    assert counts["replayed forward"] == counts["replayed backward"] == 3 * LAYERS, graphs.stats()
    assert graphs.reasons == {"warm-up": 2 * LAYERS}, graphs.stats()
    assert graphs.backend.captured == 2 * LAYERS


def test_chunked_mlp_backward_inside_the_graphs_trains_like_the_one_pass_one(monkeypatch) -> None:
    """The chunked MLP backward (``LLMFORGE_MLP_CHUNK_MIB``) captured in the layers' backward graphs: over four
    AdamW steps the same losses and gradients as the one-pass backward run eagerly."""
    from llmforge.kernels import fast_lora

    ref, new, graphs = _pair(RerunBackend())
    chunked = []
    original, saved = fast_lora._mlp_backward_chunked, fast_lora.MLP_CHUNK_BYTES[0]
    monkeypatch.setattr(fast_lora, "_mlp_backward_chunked", lambda ctx, dy: chunked.append(1) or original(ctx, dy))
    try:   # new: 16-row chunks of the 18 rows (ffn 96, fp32)
        _train_side_by_side(ref, new, lambda model: fast_lora.MLP_CHUNK_BYTES.__setitem__(
            0, 16 * 96 * 4 if model is new else 0))
    finally:
        fast_lora.MLP_CHUNK_BYTES[0] = saved
        unpatch_rope(ref)
    assert graphs.counts["replayed backward"] == 3 * LAYERS, graphs.stats()
    assert len(chunked) >= 4 * LAYERS, len(chunked)   # every layer's backward, every step (replays re-run it here)


def test_gradient_accumulation_and_zeroed_grads(pair) -> None:
    ref, new, graphs = pair
    for model in (ref, new):
        for step in range(2):                       # warm-up and capture
            model(**_batch(step)).loss.backward()
            model.zero_grad(set_to_none=True)
        for step in range(2, 4):                    # two micro-batches into the same .grad
            model(**_batch(step)).loss.backward()
    _close(_grads(ref), _grads(new), "accumulated")
    params = [p for p in new.parameters() if p.requires_grad]
    held = [p for p in params if any(p.grad is b for lg in graphs.sets[next(iter(graphs.sets))].layers.values()
                                     for b in (lg.grads or ()))]
    assert not held, "an accumulated gradient still aliases a graph buffer"
    for model in (ref, new):
        model.zero_grad(set_to_none=False)          # zeros in place, buffers possibly aliased
        model(**_batch(5)).loss.backward()
    _close(_grads(ref), _grads(new), "after zero_grad to zeros")


def test_other_shapes_and_failed_capture_run_eagerly() -> None:
    ref, new, graphs = _pair(RerunBackend(fail=True))
    try:
        for step in range(3):
            for model in (ref, new):
                model(**_batch(step)).loss.backward()
            _close(_grads(ref), _grads(new), f"step {step}")
            for model in (ref, new):
                model.zero_grad(set_to_none=True)
        assert graphs.counts["captured forward"] == 0
        assert graphs.backend.attempts == 1   # the other layers share the shape and the code: not tried again
        assert any("forward capture failed: RuntimeError: operation not permitted" in r for r in graphs.reasons), \
            graphs.stats()
        assert "\n" not in graphs.stats()
    finally:
        unpatch_rope(ref)


def test_more_shapes_than_the_limit_run_eagerly(pair, monkeypatch) -> None:
    ref, new, graphs = pair
    monkeypatch.setattr(layer_graphs, "MAX_SETS", 1)
    for length in (9, 9, 7, 7, 9):
        for model in (ref, new):
            model(**_batch(length, length=length)).loss.backward()
        _close(_grads(ref), _grads(new), f"length {length}")
        for model in (ref, new):
            model.zero_grad(set_to_none=True)
    assert len(graphs.sets) == 1
    assert graphs.reasons["more than 1 shapes"] == 2 * LAYERS   # forward of each layer, twice at length 7
    assert graphs.counts["replayed backward"] == 2 * LAYERS


class TrimmingBackend(RerunBackend):
    def __init__(self):
        super().__init__()
        self.trims = 0

    def trim(self):
        self.trims += 1


def test_trim_hands_the_cache_back_once_after_each_round_of_captures(monkeypatch) -> None:
    """``LLMFORGE_GRAPH_TRIM``: one trim at the first forward replay after new captures, none in steady state;
    switched off, none."""
    for on, expected in ((True, 1), (False, 0)):
        monkeypatch.setattr(layer_graphs, "TRIM_AFTER_CAPTURE", on)
        ref, new, graphs = _pair(TrimmingBackend())
        try:
            for step in range(4):   # eager, capture, replay, replay
                new(**_batch(step)).loss.backward()
                new.zero_grad(set_to_none=True)
        finally:
            unpatch_rope(ref)
        assert graphs.backend.trims == expected and graphs.counts["trims"] == expected, graphs.stats()
        assert graphs.counts["replayed forward"] == 3 * LAYERS, graphs.stats()


def test_needs_cuda_when_asked_by_name_and_a_bool() -> None:
    model = tiny_lora_model("llama")
    try:
        report = patch_model(model, offload_checkpointing=True, cuda_graphs=True)
        assert report.layer_graphs is None
        assert "CUDA graphs: the model is not on a CUDA device" in report.not_patched
        untouched = tiny_lora_model("llama")
        with pytest.raises(TypeError, match="cuda_graphs must be True, False or a LayerGraphs, not str 'yes'"):
            patch_model(untouched, cuda_graphs="yes")
        assert not any("forward" in vars(m) for m in untouched.modules()), "patched before refusing"
    finally:
        unpatch_rope(model)
