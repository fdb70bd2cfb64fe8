"""Frozen, untied input embeddings and lm_head kept in host memory (pinned when CUDA is present).

On an 8B Llama each is 0.98 GiB of bf16 that LoRA training never updates. ``offload_frozen_weights`` moves
both weights to the host and swaps the modules' ``forward``s: the embedding's rows are read from pinned memory by
a GPU kernel (``host_gather.py``; where it cannot run they are gathered on the CPU and sent to the input's device,
non_blocking, after a copy of the ids to the host); the lm_head copies W to the input's device per call (slow:
meant for the odd evaluation, not for generation). The training loss does not use ``lm_head.forward``:
``llmforge.kernels.patch`` routes it through ``streamed_linear_cross_entropy``, which streams W in vocabulary
chunks. The parameters stay registered (state dicts, PEFT saving and merging see them, on the CPU), and the
model still reports its device: a floating sibling module on the device (the final norm) is moved in front
of the embedding, so ``model.device`` / ``next(model.parameters())`` / ``model.dtype`` keep their values.
``restore_frozen_weights`` undoes all of it (e.g. before generating).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from llmforge.kernels.host_gather import gather_rows

STATE_ATTR = "_llmforge_host_weights"  # on the model: HostWeights
MODULE_FLAG = "_llmforge_host_weight"  # on each moved module: True


@dataclass
class HostWeights:
    """What ``offload_frozen_weights`` changed on a model, for ``restore_frozen_weights``."""
    device: torch.device
    modules: list[tuple[str, nn.Module, object]] = field(default_factory=list)  # (name, module, its old forward)
    parent: nn.Module | None = None  # whose children were reordered, and their original order
    order: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.modules]


def _base_model(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _pinnable() -> bool:
    # torch's CPU pin_memory needs a CUDA runtime; without one the weights stay in pageable memory
    return torch.cuda.is_available()


def _embedding_kind(module: nn.Module) -> str | None:
    """"plain" (nn.Embedding), "scaled" (Gemma's ``* embed_scale``), or None when the lookup is anything else."""
    if type(module) is nn.Embedding:
        kind = "plain"
    elif isinstance(module, nn.Embedding) and type(module).__name__.endswith("ScaledWordEmbedding") \
            and hasattr(module, "embed_scale"):
        kind = "scaled"
    else:
        return None
    return kind if module.max_norm is None else None  # max_norm renormalizes the weight in place


def offload_candidates(model: nn.Module) -> tuple[dict[str, nn.Module], list[str]]:
    """The modules ``offload_frozen_weights`` would move (name -> module), and why the others are not moved."""
    base = _base_model(model)
    names = {id(m): n for n, m in base.named_modules()}
    get_input = getattr(base, "get_input_embeddings", None)
    get_output = getattr(base, "get_output_embeddings", None)
    emb = get_input() if callable(get_input) else None
    head = get_output() if callable(get_output) else None
    found, reasons = {}, []
    if emb is None or head is None:
        return found, ["host weights: no input or output embeddings"]
    if emb.weight is head.weight or emb.weight.data_ptr() == head.weight.data_ptr():
        return found, ["host weights: input embeddings tied to lm_head"]
    checks = (
        (emb, "input embeddings", _embedding_kind(emb) is not None, "not a plain nn.Embedding"),
        (head, "lm_head", type(head) is nn.Linear and head.bias is None, "not a bias-free nn.Linear"),
    )
    for module, what, shape_ok, shape_reason in checks:
        if module.weight.requires_grad:
            reasons.append(f"host weights: {what} trained")
        elif not shape_ok:
            reasons.append(f"host weights: {what} {shape_reason}")
        elif id(module) in names:
            found[names[id(module)]] = module
    return found, reasons


def _embedding_forward(module: nn.Module, kind: str):
    def forward(input_ids: torch.Tensor) -> torch.Tensor:
        weight = module.weight
        out = gather_rows(weight, input_ids)   # read by the GPU from pinned memory: no host sync
        if out is None:                        # gathered on the host: the ids come to the CPU first
            ids = input_ids.to(weight.device).reshape(-1)
            rows = torch.empty((ids.numel(), weight.shape[1]), dtype=weight.dtype, device=weight.device,
                               pin_memory=_pinnable() and weight.device.type == "cpu")
            torch.index_select(weight, 0, ids, out=rows)
            out = rows.to(input_ids.device, non_blocking=True).view(*input_ids.shape, weight.shape[1])
        if kind == "scaled":
            out = out * module.embed_scale.to(out.dtype)
        return out
    return forward


def _head_forward(module: nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, module.weight.to(x.device, non_blocking=True))
    return forward


def _to_host(param: nn.Parameter) -> None:
    host = torch.empty(param.shape, dtype=param.dtype, device="cpu", pin_memory=_pinnable())
    host.copy_(param.data)
    param.data = host


def _parent(base: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (base.get_submodule(parent_name) if parent_name else base), child


def _keep_device_first(base: nn.Module, emb_name: str, emb: nn.Module, state: HostWeights) -> None:
    """When the embedding's weight is the model's first parameter, put a floating sibling that lives on the
    device (in the embedding's dtype: the final norm) in front of it, else move the embedding last."""
    if next(iter(base.parameters())) is not emb.weight:
        return
    parent, child = _parent(base, emb_name)
    order = list(parent._modules)
    front = None
    for name in order[order.index(child) + 1:]:
        params = list(parent._modules[name].parameters()) if parent._modules[name] is not None else []
        if params and all(p.device == state.device and p.is_floating_point() for p in params) \
                and params[0].dtype == emb.weight.dtype:
            front = name
            break
    new = [n for n in order if n != front]
    if front is not None:
        new.insert(new.index(child), front)
    else:
        new = [n for n in order if n != child] + [child]
    _reorder(parent, new)
    state.parent, state.order = parent, order


def _reorder(parent: nn.Module, names: list[str]) -> None:
    modules = dict(parent._modules)
    parent._modules.clear()
    for name in names:
        parent._modules[name] = modules[name]


def offload_frozen_weights(model: nn.Module) -> list[str]:
    """Move the frozen, untied input embeddings and lm_head of ``model`` (bare or PEFT-wrapped) to host memory;
    returns the names of the moved modules (empty when none qualifies: see ``offload_candidates``)."""
    base = _base_model(model)
    if getattr(base, STATE_ATTR, None) is not None:
        return getattr(base, STATE_ATTR).names
    found, _ = offload_candidates(base)
    if not found:
        return []
    emb = base.get_input_embeddings()
    state = HostWeights(device=emb.weight.device)
    for name, module in found.items():
        state.modules.append((name, module, module.__dict__.get("forward")))
        if module is emb:
            _keep_device_first(base, name, module, state)
            module.forward = _embedding_forward(module, _embedding_kind(module))
        else:
            module.forward = _head_forward(module)
        _to_host(module.weight)
        setattr(module, MODULE_FLAG, True)
    setattr(base, STATE_ATTR, state)
    if state.device.type == "cuda":
        torch.cuda.empty_cache()  # give the freed weights back, so reserved memory drops too
    return state.names


def is_host_weight(module: nn.Module) -> bool:
    """True for a module whose weight ``offload_frozen_weights`` moved to host memory."""
    return bool(getattr(module, MODULE_FLAG, False))


def restore_frozen_weights(model: nn.Module) -> list[str]:
    """Undo ``offload_frozen_weights``: weights back on their device, original forwards and module order;
    returns the names of the restored modules."""
    base = _base_model(model)
    state: HostWeights | None = getattr(base, STATE_ATTR, None)
    if state is None:
        return []
    for _, module, old_forward in state.modules:
        module.weight.data = module.weight.data.to(state.device)
        module.__dict__.pop(MODULE_FLAG, None)
        if old_forward is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = old_forward
    if state.parent is not None:
        _reorder(state.parent, state.order)
    delattr(base, STATE_ATTR)
    return state.names
