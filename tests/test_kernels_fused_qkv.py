"""The fused Q/K/V LoRA node and the cached compute-dtype adapters (torch path, in process; the interpreted
Triton path is ``fused_lora_qkv`` in kernels_cases.py): the node equals three separate projections and PEFT's
modules on every architecture with split q/k/v, whatever order the projections are called in, and the cached
adapter casts follow optimizer steps and direct writes to the weights."""

from __future__ import annotations

import copy

import pytest
import torch

from kernels_cases import check_fused_lora_qkv
from kernels_models import batch, check_patched_matches, tiny_lora_model
from llmforge.kernels import fast_lora
from llmforge.kernels.patch import patch_model, unpatch_rope

SPLIT_QKV = ("llama", "mistral", "qwen3", "gemma2", "gemma3")


def test_qkv_node_matches_separate_projections_and_reference():
    torch.manual_seed(0)
    check_fused_lora_qkv(torch)


@pytest.fixture
def qkv_calls(monkeypatch):
    """How many times the fused Q/K/V node ran forward."""
    calls = []
    forward = fast_lora.LoRAQKVFunction.forward

    def counting(ctx, *args):
        calls.append(1)
        return forward(ctx, *args)

    monkeypatch.setattr(fast_lora.LoRAQKVFunction, "forward", staticmethod(counting))
    return calls


@pytest.mark.parametrize("arch", SPLIT_QKV)
def test_patched_model_runs_the_qkv_node_and_matches(arch, qkv_calls):
    report = check_patched_matches(arch, expect_backend="torch", checkpointing=False)
    assert report.qkv_fused_lora == 2 and report.lora_linear == 2
    assert len(qkv_calls) == 2  # one per layer: K and V came from Q's call, not from single projections


def _attention(model):
    return model.get_base_model().model.layers[0].self_attn


def test_qkv_any_call_order_gives_peft_outputs():
    ref = tiny_lora_model("llama")
    patched = copy.deepcopy(ref)
    patch_model(patched, offload_checkpointing=False)
    try:
        a_ref, a_new = _attention(ref), _attention(patched)
        x, y = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
        with torch.no_grad():
            close = [torch.allclose(new, old, atol=1e-6) for new, old in (
                (a_new.k_proj(x), a_ref.k_proj(x)),  # K alone, before any Q
                (a_new.q_proj(x), a_ref.q_proj(x)),
                (a_new.k_proj(y), a_ref.k_proj(y)),  # another tensor: not Q's stashed K
                (a_new.v_proj(x), a_ref.v_proj(x)),  # Q's stashed V
                (a_new.v_proj(x), a_ref.v_proj(x)),  # taken once: computed again, same values
            )]
        assert all(close), close
    finally:
        unpatch_rope(patched)


def test_disabled_adapter_uses_the_base_model():
    model = tiny_lora_model("llama")
    patch_model(model, offload_checkpointing=False)
    try:
        with torch.no_grad():
            with model.disable_adapter():
                off = model(**batch()).loss
            on = model(**batch()).loss
        base = tiny_lora_model("llama", peft=False)
        with torch.no_grad():
            plain = base(**batch()).loss
        assert torch.allclose(off, plain, atol=1e-6) and not torch.allclose(on, plain, atol=1e-3)
    finally:
        unpatch_rope(model)


def _train(model, steps: int, poke: bool) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.3)
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the adapter casts are real copies here
            loss = model(**batch()).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if poke:  # after a forward has cached the casts, a write that bypasses the version counter:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # seen at the next forward
                model(**batch())
                for name, p in model.named_parameters():
                    if "lora_A" in name:
                        p.data = p.data * 0.5
    return losses


@pytest.mark.parametrize("cached,poke", [(True, False), (True, True), (False, False)])
def test_adapter_casts_follow_the_optimizer(cached, poke):
    ref = tiny_lora_model("llama")
    patched = copy.deepcopy(ref)
    for m in (ref, patched):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    report = patch_model(patched, offload_checkpointing=True, cache_adapter_casts=cached)
    assert report.cached_adapter_casts == cached and ("adapter casts cached" in report.summary()) == cached
    try:
        losses_ref, losses_new = _train(ref, 3, poke), _train(patched, 3, poke)
    finally:
        unpatch_rope(patched)
    assert len(set(losses_ref)) == 3, losses_ref  # the weights did move between steps
    for a, b in zip(losses_new, losses_ref):
        assert abs(a - b) <= 1e-2 * abs(b), (losses_new, losses_ref)
    start = dict(tiny_lora_model("llama").named_parameters())
    for (name, p), q in zip(ref.named_parameters(), patched.parameters()):
        if p.requires_grad:  # the updates agree to bf16 noise
            moved = (p - start[name]).norm()
            assert float(moved) > 0 and float((q - p).norm()) <= 3e-2 * float(moved), name


def test_adapter_cache_rebuilds_only_on_change():
    a, b = torch.randn(4, 8), torch.randn(6, 4)
    cache = fast_lora.AdapterCache()
    first = cache.get((a, b), (2.0,), torch.bfloat16)
    assert cache.get((a, b), (2.0,), torch.bfloat16) is first
    assert torch.equal(first.bs[0], (b * 2).bfloat16()) and torch.equal(first.a, a.bfloat16())
    a.add_(1.0)  # in place, as an optimizer step: the version counter moves
    second = cache.get((a, b), (2.0,), torch.bfloat16)
    assert second is not first and torch.equal(second.a, a.bfloat16())
    assert cache.get((a, b), (1.0,), torch.bfloat16) is not second  # scale changed
    third = cache.get((a, b), (1.0,), torch.bfloat16)
    fast_lora.new_step()
    assert cache.get((a, b), (1.0,), torch.bfloat16) is not third
    assert cache.get((a.clone(), b), (1.0,), torch.bfloat16) is not third  # another tensor


def _tensors(value):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def test_fused_nodes_keep_activations_only_as_saved_tensors():
    """Non-reentrant checkpointing frees what ``save_for_backward`` saved once forward is done, but not what
    a node keeps as a plain attribute: a fused node may keep parameters there, never activations."""
    model = tiny_lora_model("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patch_model(model, offload_checkpointing=False)
    try:
        loss = model(**batch()).loss
        params = {id(p) for p in model.parameters()}
        seen, todo, fused = set(), [loss.grad_fn], []
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if type(node).__name__.startswith("LoRA"):
                fused.append(type(node).__name__)
                extra = [t.shape for v in vars(node).values() for t in _tensors(v) if id(t) not in params]
                assert not extra, f"{type(node).__name__} keeps activations outside saved tensors: {extra}"
            todo.extend(f for f, _ in node.next_functions)
        assert sorted(set(fused)) == ["LoRALinearFunctionBackward", "LoRAMLPFunctionBackward",
                                      "LoRAQKVFunctionBackward"], fused
    finally:
        unpatch_rope(model)
