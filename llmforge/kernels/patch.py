"""Swap llmforge's kernels into the Hugging Face modules of a supported causal LM, or of the language model of a
supported vision-language model (optionally PEFT-wrapped); ``archs.ARCHS`` says which parts each gets.

``patch_model(model) -> PatchReport``. Per-module patches replace instance ``forward``s (other models in
the process are untouched), except RoPE: HF attention calls its modeling module's
``apply_rotary_pos_emb``, which is replaced module-wide by a version that runs the in-place kernel when it
applies and the original function otherwise (the Qwen-VL vision towers call ``apply_rotary_pos_emb_vision``,
which stays). Every kernel picks its torch fallback itself when Triton cannot run (CPU without
``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
import os
import sys
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from llmforge.kernels._backend import interpreting, triton_importable, use_triton
from llmforge.kernels.activations import ACTIVATION_KINDS, gated_activation
from llmforge.kernels.archs import ARCHS, ArchKernels, find_text_model, left_as_is, rope_unpatchable
from llmforge.kernels.cross_entropy import (IGNORE_INDEX, PREFETCH_BYTES, VocabPrefetch, default_chunk_vocab,
                                            fused_linear_cross_entropy, streamed_linear_cross_entropy)
from llmforge.kernels.fp8 import fp8_supported
from llmforge.kernels.fast_lora import AdapterCache, LoRAWeights, lora_linear, lora_mlp, lora_qkv, new_step
from llmforge.kernels.host_weights import is_host_weight, offload_candidates
from llmforge.kernels.host_weights import offload_frozen_weights as _offload_frozen
from llmforge.kernels.layer_graphs import LayerGraphs
from llmforge.kernels.offload import offloaded_checkpoint
from llmforge.kernels.rmsnorm import rms_norm
from llmforge.kernels.rope import apply_rope_, rope_fits

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
# report part -> what the summary calls it
PARTS = {"rms_norm": "RMSNorm", "mlp_fused_lora": "fused LoRA MLP", "mlp_activation_only": "MLP activation-only",
         "qkv_fused_lora": "fused LoRA QKV", "lora_linear": "fused LoRA linear",
         "offloaded_checkpoint": "offloaded checkpoint layers"}


def _count(part: str) -> property:
    """A read-only count of the modules listed under ``part`` in ``PatchReport.patched``."""
    return property(lambda report: len(report.patched[part]), doc=f"modules patched with {PARTS[part]}")


@dataclass
class PatchReport:
    """What ``patch_model`` swapped in (module names per part), and what it left alone and why."""
    model_type: str
    supported: bool
    backend: str  # "triton" (CUDA) or "torch" (fallbacks) for this model's device
    text_model: str = ""  # path of the patched language model in a VLM ("" = the whole model)
    patched: dict[str, list[str]] = field(default_factory=lambda: {part: [] for part in PARTS})
    rope: bool = False
    fused_cross_entropy: bool = False
    cached_adapter_casts: bool = False
    fp8_base: bool = False  # the fused LoRA MLP nodes' frozen base matmuls run on e4m3 operands
    host_weights: list[str] = field(default_factory=list)  # frozen modules kept in host memory
    layer_graphs: LayerGraphs | None = None  # CUDA graphs of the checkpointed layers (``stats()``: what ran)
    not_patched: list[str] = field(default_factory=list)  # in the patched model, with the reason
    left_as_is: list[str] = field(default_factory=list)  # beside a VLM's language model (vision tower, projector)
    reason: str = ""  # why nothing was patched

    # how many modules got each part (qkv_fused_lora: attention layers whose Q/K/V run as one node; lora_linear:
    # other LoRA projections on the fused single-projection path)
    rms_norm = _count("rms_norm")
    mlp_fused_lora = _count("mlp_fused_lora")
    mlp_activation_only = _count("mlp_activation_only")
    qkv_fused_lora = _count("qkv_fused_lora")
    lora_linear = _count("lora_linear")
    offloaded_checkpoint_layers = _count("offloaded_checkpoint")

    def __str__(self) -> str:
        return self.summary()

    def summary(self) -> str:
        """One line: what was patched, how many of each, what was left as is, and the first reasons why."""
        if not self.supported:
            return f"kernels: {self.model_type} not supported ({self.reason or 'no row in the table'}), nothing patched"
        where = f" (language model {self.text_model})" if self.text_model else ""
        parts = [f"kernels ({self.backend}) on {self.model_type}{where}: {self.rms_norm} RMSNorm",
                 f"RoPE {'yes' if self.rope else 'no'}", f"{self.mlp_fused_lora} fused LoRA MLP",
                 f"{self.mlp_activation_only} MLP activation-only", f"{self.qkv_fused_lora} fused LoRA QKV",
                 f"{self.lora_linear} fused LoRA linear",
                 f"fused CE {'yes' if self.fused_cross_entropy else 'no'}",
                 f"{self.offloaded_checkpoint_layers} offloaded checkpoint layers"]
        if self.cached_adapter_casts:
            parts.append("adapter casts cached")
        if self.fp8_base:
            parts.append("FP8 base matmuls in the MLP")
        if self.layer_graphs is not None:
            parts.append("CUDA graphs per layer")
        if self.host_weights:
            parts.append("host weights: " + ", ".join(self.host_weights))
        text = ", ".join(parts)
        if self.left_as_is:
            text += "; left as is: " + ", ".join(self.left_as_is)
        if self.not_patched:
            text += f"; not patched: {len(self.not_patched)} (" + "; ".join(self.not_patched[:5]) + \
                    (" ..." if len(self.not_patched) > 5 else "") + ")"
        return text

    def modules(self) -> list[str]:
        """Every patched module as ``name: part`` (RoPE and the loss as their functions)."""
        out = [f"{name}: {PARTS[part]}" for part, names in self.patched.items() for name in names]
        if self.rope:
            out.append("apply_rotary_pos_emb: RoPE")
        if self.fused_cross_entropy:
            out.append("lm_head: fused linear cross-entropy")
        return out


def _base_model(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


# ----------------------------------------------------------------------------------------------- LoRA
def lora_unfusable_reason(module: nn.Module) -> str | None:
    """Why ``module`` (a PEFT LoRA layer) cannot take the fused path right now, or None when it can."""
    active = list(getattr(module, "active_adapters", []) or [])
    if len(active) != 1:
        return f"{len(active)} active adapters"
    name = active[0]
    base = getattr(module, "base_layer", None)
    checks = (
        (getattr(module, "disable_adapters", False), "adapters disabled"),
        (bool(getattr(module, "merged_adapters", [])), "adapter merged"),
        (name not in getattr(module, "lora_A", {}), "no lora_A"),
        (not isinstance(base, nn.Linear), "base is not a Linear"),
        (getattr(base, "bias", None) is not None, "base has a bias"),
        (getattr(module, "use_dora", {}).get(name, False), "DoRA"),
        (getattr(module, "lora_bias", {}).get(name, False), "LoRA bias"),
        (name in getattr(module, "lora_variant", {}), "LoRA variant"),
        (getattr(module, "fan_in_fan_out", False), "fan_in_fan_out"),
    )
    for failed, reason in checks:
        if failed:
            return reason
    if not isinstance(module.lora_dropout[name], nn.Identity):
        return "lora_dropout > 0"
    if not isinstance(module.lora_A[name], nn.Linear):
        return "lora_A is not a Linear"
    weight = base.weight
    if weight.requires_grad:
        return "base weight is trained"
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None and not weight.is_floating_point():
        return f"base weight is {weight.dtype} (only NF4/FP4 or float bases are fused)"
    if quant_state is not None and getattr(quant_state, "quant_type", None) not in ("nf4", "fp4"):
        return "unsupported quantization"
    return None


def lora_weights(module: nn.Module) -> LoRAWeights:
    name = module.active_adapters[0]
    weight = module.base_layer.weight
    return LoRAWeights(weight, getattr(weight, "quant_state", None), module.lora_A[name].weight,
                       module.lora_B[name].weight, float(module.scaling[name]))


def _is_lora(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


class _Projection:
    """A PEFT LoRA linear that passed ``lora_unfusable_reason`` at patch time. Per call only the state that
    can change cheaply is re-checked (disabled, merged, which adapter is active); the full check runs again
    only when the active adapter changes."""
    __slots__ = ("module", "name")

    def __init__(self, module: nn.Module):
        self.module, self.name = module, module.active_adapters[0]

    def weights(self) -> LoRAWeights | None:
        """This call's weights, or None when the fused path does not apply now."""
        m = self.module
        active = m.active_adapters
        if m.disable_adapters or m.merged_adapters or len(active) != 1:
            return None
        if active[0] != self.name:
            if lora_unfusable_reason(m) is not None:
                return None
            self.name = active[0]
        name = self.name
        # looked up every call (a .to() may replace a 4-bit weight), through the module dicts directly:
        # nn.Module.__getattr__ costs more than the rest of this method
        modules = m._modules
        weight = modules["base_layer"]._parameters["weight"]
        return LoRAWeights(weight, getattr(weight, "quant_state", None),
                           modules["lora_A"]._modules[name]._parameters["weight"],
                           modules["lora_B"]._modules[name]._parameters["weight"], float(m.scaling[name]))


def _cache(enabled: bool) -> AdapterCache | None:
    return AdapterCache() if enabled else None


def _patch_lora_linear(module: nn.Module, cache_casts: bool) -> None:
    original = module.forward
    projection, cache = _Projection(module), _cache(cache_casts)

    def forward(x, *args, **kwargs):
        p = None if args or kwargs else projection.weights()
        return original(x, *args, **kwargs) if p is None else lora_linear(x, p, cache)

    module.forward = forward


# ----------------------------------------------------------------------------------------------- Q/K/V
def _fusable_qkv(attn: nn.Module) -> bool:
    projections = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")]
    return all(p is not None and _is_lora(p) and lora_unfusable_reason(p) is None for p in projections)


def _patch_qkv(attn: nn.Module, cache_casts: bool) -> None:
    """Q, K and V in one autograd node. HF attention calls ``q_proj(h)``, ``k_proj(h)``, ``v_proj(h)`` in
    turn on the same tensor: q_proj computes all three and hands K and V to the next k_proj / v_proj call
    on that very tensor object (each is taken once, then dropped). Any other call order or input takes the
    single-projection path, so the outputs never depend on the call pattern."""
    modules = (attn.q_proj, attn.k_proj, attn.v_proj)
    originals = [m.forward for m in modules]
    projections = [_Projection(m) for m in modules]
    single = [_cache(cache_casts) for _ in modules]
    cache = _cache(cache_casts)
    pending: list = [None, None, None]  # input, k, v

    def q_forward(x, *args, **kwargs):
        pending[:] = (None, None, None)
        if args or kwargs:
            return originals[0](x, *args, **kwargs)
        ws = [p.weights() for p in projections]
        if any(w is None for w in ws):
            return originals[0](x) if ws[0] is None else lora_linear(x, ws[0], single[0])
        q, k, v = lora_qkv(x, *ws, cache)
        pending[:] = (x, k, v)
        return q

    def make_forward(i: int):
        def forward(x, *args, **kwargs):
            out = pending[i]
            if out is not None and pending[0] is x and not args and not kwargs:
                pending[i] = None
                if pending[1] is None and pending[2] is None:
                    pending[0] = None
                return out
            p = None if args or kwargs else projections[i].weights()
            return originals[i](x, *args, **kwargs) if p is None else lora_linear(x, p, single[i])
        return forward

    modules[0].forward = q_forward
    modules[1].forward = make_forward(1)
    modules[2].forward = make_forward(2)


# ------------------------------------------------------------------------------------------------ MLP
def _activation_kind(config) -> str | None:
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    return act if act in ACTIVATION_KINDS else None


def _patch_split_mlp(mlp: nn.Module, kind: str, cache_casts: bool, fp8: bool = False,
                     into_residual: bool = False) -> bool:
    """Llama-style MLP (``into_residual``: its output only goes into the residual sum). Returns True when all
    three projections take the fused LoRA path."""
    modules = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    fusable = all(_is_lora(p) and lora_unfusable_reason(p) is None for p in modules)
    projections = [_Projection(m) for m in modules] if fusable else []
    caches = (AdapterCache(), AdapterCache()) if cache_casts else None

    def forward(x):
        ws = [p.weights() for p in projections]
        if fusable and all(w is not None for w in ws):
            return lora_mlp(x, *ws, kind, caches, fp8, into_residual)
        return mlp.down_proj(gated_activation(mlp.gate_proj(x), mlp.up_proj(x), kind))

    mlp.forward = forward
    return fusable


def _patch_fused_mlp(mlp: nn.Module, kind: str) -> None:
    """Phi-3-style MLP (one gate_up_proj)."""

    def forward(x):
        gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
        return mlp.down_proj(gated_activation(gate.contiguous(), up.contiguous(), kind))

    mlp.forward = forward


# ------------------------------------------------------------------------------------------- RMSNorm
def _patch_rms_norm(norm: nn.Module, gemma: bool) -> bool:
    """``gemma``: the module scales by ``1 + weight`` (the table's ``norm: "1+w"``)."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    weight = getattr(norm, "weight", None)
    if eps is None or not isinstance(weight, torch.Tensor):
        return False
    norm.forward = lambda x: rms_norm(x, norm.weight, eps, gemma)
    return True


# ---------------------------------------------------------------------------------------------- RoPE
def _patch_rope(modeling: types.ModuleType) -> bool:
    original = getattr(modeling, "apply_rotary_pos_emb", None)
    if original is None:
        return False
    if getattr(original, "_llmforge", False):
        return True

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, **kwargs):
        if not kwargs and use_triton(q, k) and rope_fits(q, k, cos, sin, unsqueeze_dim):
            return apply_rope_(q, k, cos, sin, unsqueeze_dim)
        return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, **kwargs)

    apply_rotary_pos_emb._llmforge = True
    apply_rotary_pos_emb._original = original
    modeling.apply_rotary_pos_emb = apply_rotary_pos_emb
    return True


def unpatch_rope(model: nn.Module) -> None:
    """Restore HF's ``apply_rotary_pos_emb`` in the modeling module of ``model``."""
    modeling = sys.modules[type(_base_model(model)).__module__]
    current = getattr(modeling, "apply_rotary_pos_emb", None)
    if getattr(current, "_llmforge", False):
        modeling.apply_rotary_pos_emb = current._original


# ------------------------------------------------------------------------------------- cross-entropy
def _patch_causal_lm(lm: nn.Module, logit_softcap: bool = True) -> bool:
    """``lm`` (a causal LM, or a VLM whose ``model`` takes the images through ``**kwargs``) computes its training
    loss from the hidden states and ``lm_head`` in chunks; ``logit_softcap``: as its HF forward, apply the text
    config's ``final_logit_softcapping``."""
    head = getattr(lm, "lm_head", None)
    if not (type(head) is nn.Linear and head.bias is None and hasattr(lm, "model")):
        return False
    original = lm.forward
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    softcap = getattr(config, "final_logit_softcapping", None) if logit_softcap else None

    def forward(input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        shift_labels = kwargs.get("shift_labels")
        if (labels is None and shift_labels is None) or not torch.is_grad_enabled():
            return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                            use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("shift_labels", None)
        num_items = kwargs.pop("num_items_in_batch", None)
        ignore_index = kwargs.pop("ignore_index", IGNORE_INDEX)
        prefetch = _start_lm_head_prefetch(lm, input_ids, inputs_embeds)   # its first chunks cross during forward
        out = lm.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        if shift_labels is None:
            shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        hidden, weight = out.last_hidden_state, lm.lm_head.weight
        # a weight in host memory (host_weights.py) is streamed in vocabulary chunks
        streamed = is_host_weight(lm.lm_head) or weight.device != hidden.device
        if streamed:
            loss = streamed_linear_cross_entropy(hidden, weight, shift_labels, softcap=softcap,
                                                 ignore_index=ignore_index, num_items_in_batch=num_items,
                                                 chunk_vocab=prefetch.chunk if prefetch else None, prefetch=prefetch)
        else:
            loss = fused_linear_cross_entropy(hidden, weight, shift_labels, softcap=softcap,
                                              ignore_index=ignore_index, num_items_in_batch=num_items)
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states, attentions=out.attentions)

    lm.forward = forward
    return True


def _start_lm_head_prefetch(lm: nn.Module, input_ids, inputs_embeds) -> VocabPrefetch | None:
    """For an ``lm_head`` in host memory: start copying its first vocabulary chunks to the device now, sized for
    the rows this forward will have (``cross_entropy.PREFETCH_BYTES``; None when off or not applicable)."""
    weight = lm.lm_head.weight
    source = input_ids if input_ids is not None else inputs_embeds
    if PREFETCH_BYTES[0] <= 0 or source is None or not source.is_cuda or not is_host_weight(lm.lm_head):
        return None
    rows = source.shape[0] * source.shape[1] if source.dim() >= 2 else source.shape[0]
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else weight.dtype
    return VocabPrefetch.start(weight, default_chunk_vocab(rows, dtype), source.device)


# ------------------------------------------------------------------------------ gradient checkpointing
def _apply_offload(scope: nn.Module, prefix: str = "", graphs: LayerGraphs | None = None) -> list[str]:
    """Offload the checkpointed layers of ``scope`` (names returned with ``prefix``); with ``graphs``, they run
    as CUDA graphs where they can."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [(name, m) for name, m in scope.named_modules() if isinstance(m, GradientCheckpointingLayer)
              and getattr(m, "gradient_checkpointing", False)]
    # the last layer is recomputed right away in backward: offloading it only adds copies (with graphs it runs
    # through the same checkpoint, input kept on the device, so it is a graph too)
    func = offloaded_checkpoint if graphs is None else functools.partial(offloaded_checkpoint, graphs=graphs)
    for _, layer in layers[:-1]:
        layer._gradient_checkpointing_func = func
    if graphs is not None and layers:
        layers[-1][1]._gradient_checkpointing_func = functools.partial(offloaded_checkpoint, graphs=graphs,
                                                                       offload=False)
    return [prefix + name for name, _ in layers[:-1]]


def _patch_offload(base: nn.Module, scope: nn.Module, prefix: str = "", graphs: LayerGraphs | None = None) -> list[str]:
    """Offload the checkpointed layer inputs of ``scope`` (``base`` or its language model) now, and again whenever
    checkpointing of ``base`` is (re-)enabled later."""
    setter = getattr(base, "_set_gradient_checkpointing", None)
    if callable(setter) and not getattr(setter, "_llmforge", False):
        def set_gradient_checkpointing(*args, **kwargs):
            result = setter(*args, **kwargs)
            _apply_offload(scope, graphs=graphs)
            return result
        set_gradient_checkpointing._llmforge = True
        base._set_gradient_checkpointing = set_gradient_checkpointing
    return _apply_offload(scope, prefix, graphs)


# ------------------------------------------------------------------------------------------- driver
def _patch_modules(text: nn.Module, prefix: str, arch: ArchKernels, kind: str | None, act_name: str,
                   cache_casts: bool, report: PatchReport, fp8: bool = False) -> None:
    """RMSNorms, gated MLPs, Q/K/V and the other LoRA projections of ``text`` (the whole model, or a VLM's
    language model at ``prefix``)."""
    mlp_projection_ids = set()
    for name, module in text.named_modules(prefix=prefix.rstrip(".")):
        if type(module).__name__.endswith("RMSNorm"):
            if _patch_rms_norm(module, gemma=arch.norm == "1+w"):
                report.patched["rms_norm"].append(name)
        elif type(module).__name__.endswith("MLP"):
            if kind is None:
                report.not_patched.append(f"{name}: activation {act_name}")
            elif arch.mlp == "split" and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")):
                fused = _patch_split_mlp(module, kind, cache_casts, fp8, arch.mlp_into_residual)
                report.patched["mlp_fused_lora" if fused else "mlp_activation_only"].append(name)
                if fused:
                    mlp_projection_ids.update(id(p) for p in (module.gate_proj, module.up_proj, module.down_proj))
            elif arch.mlp == "fused" and hasattr(module, "gate_up_proj"):
                _patch_fused_mlp(module, kind)
                report.patched["mlp_activation_only"].append(name)

    fused_ids = set(mlp_projection_ids)
    for name, module in text.named_modules(prefix=prefix.rstrip(".")):
        if type(module).__name__.endswith("Attention") and _fusable_qkv(module):
            _patch_qkv(module, cache_casts)   # no FP8 here: measured 0.81x of bf16 on an H100 at 8B's sizes
            report.patched["qkv_fused_lora"].append(name)
            fused_ids.update(id(p) for p in (module.q_proj, module.k_proj, module.v_proj))

    for name, module in text.named_modules(prefix=prefix.rstrip(".")):
        if not _is_lora(module) or id(module) in fused_ids:
            continue
        reason = lora_unfusable_reason(module)
        if reason is None:
            _patch_lora_linear(module, cache_casts)
            report.patched["lora_linear"].append(name)
        elif not isinstance(getattr(module, "base_layer", None), nn.Embedding):
            report.not_patched.append(f"{name}: {reason}")


def patch_model(model: nn.Module, *, offload_checkpointing: bool | None = None,
                cache_adapter_casts: bool | None = None, offload_frozen_weights: bool | None = False,
                fp8_base: bool = False, cuda_graphs: bool | LayerGraphs = False) -> PatchReport:
    """Patch ``model`` (a transformers causal LM or a supported VLM, bare or wrapped by PEFT) in place; returns
    what was done. ``archs.ARCHS`` says which parts each architecture gets; of a VLM only the language model
    and the loss are patched (the vision tower and projector are listed as left as is).

    ``offload_checkpointing``: None = only on CUDA. Call it after ``get_peft_model``; enabling gradient
    checkpointing before or after is both fine. Unsupported architectures are reported, not patched.
    ``cache_adapter_casts``: keep the compute-dtype copies of the LoRA weights from one forward to the next
    until the weights change (one cast per step instead of one per pass, for 2 bytes per LoRA parameter
    held all the time, ~22 MB at 1B r=16); None = on unless ``LLMFORGE_ADAPTER_CACHE=0``. Either way
    backward reuses the forward's copies.
    ``offload_frozen_weights``: keep frozen, untied input embeddings and lm_head in (pinned) host memory
    (``host_weights.py``; the loss streams lm_head in vocabulary chunks); None = on CUDA only; default off
    until its speed is measured on a GPU (opt in with True or None). Saves 2 x
    vocab x hidden x 2 bytes of device memory (1.96 GiB at 8B) for ~2 x that in host-to-device copies per
    step; ``host_weights.restore_frozen_weights(model)`` undoes it (e.g. before generating). Not for VLMs.
    ``fp8_base``: the frozen base matmuls of the fused LoRA MLP nodes on e4m3 operands (``fp8.py``: about twice
    the matmul rate on Hopper/Ada, less exact; Q/K/V and O stay in the compute dtype, where FP8 measured slower);
    ignored, with the reason in ``not_patched``, where FP8 cannot run.
    ``cuda_graphs``: the checkpointed layers (offloaded, and the last one) replay their forward and backward as
    CUDA graphs (``layer_graphs.py``: for fixed shapes; the host then launches one graph per layer and pass
    instead of hundreds of kernels); needs CUDA and offloaded checkpointing. ``report.layer_graphs.stats()``
    tells what ran.
    A ``LayerGraphs`` instance is used as given, on any device (tests pass one with a stand-in backend).
    """
    if not isinstance(cuda_graphs, (bool, LayerGraphs)):
        raise TypeError(f"patch_model: cuda_graphs must be True, False or a LayerGraphs, not "
                        f"{type(cuda_graphs).__name__} {cuda_graphs!r}")
    if cache_adapter_casts is None:
        cache_adapter_casts = os.environ.get("LLMFORGE_ADAPTER_CACHE", "1") != "0"
    cache_casts = bool(cache_adapter_casts)
    base = _base_model(model)
    config = base.config
    model_type = getattr(config, "model_type", "?")
    device = next(iter(base.parameters())).device  # the device's, even with the embeddings on the host
    backend = ("torch" if not triton_importable() else "triton" if device.type == "cuda"
               else "triton-interpreter" if interpreting() else "torch")
    arch = ARCHS.get(model_type)
    report = PatchReport(model_type=model_type, supported=arch is not None, backend=backend,
                         cached_adapter_casts=cache_casts)
    if arch is None:
        return report
    text, text_path = find_text_model(base, arch)
    if text is None:
        report.supported, report.reason = False, f"no language model at {' or '.join(arch.text_model)}"
        return report
    report.text_model, report.left_as_is = text_path, left_as_is(base, text_path)
    prefix = f"{text_path}." if text_path else ""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    act_name = getattr(text_config, "hidden_activation", None) or getattr(text_config, "hidden_act", "?")
    fp8 = False
    if fp8_base:
        fp8, why = fp8_supported(device)
        if not fp8:
            report.not_patched.append(f"fp8 base matmuls: {why}")
    report.fp8_base = fp8
    _patch_modules(text, prefix, arch, _activation_kind(text_config), act_name, cache_casts, report, fp8)
    if text_path:  # LoRA layers of the vision tower / projector keep PEFT's forward
        report.not_patched.extend(f"{name}: outside the language model" for name, m in base.named_modules()
                                  if _is_lora(m) and not name.startswith(prefix))

    if not getattr(base, "_llmforge_step_hook", False):  # a new step: cached adapter casts are rebuilt
        base.register_forward_pre_hook(lambda module, args: new_step())
        base._llmforge_step_hook = True
    rope_reason = rope_unpatchable(text, arch)
    if rope_reason is None:
        report.rope = _patch_rope(sys.modules[type(base).__module__])
    else:
        report.not_patched.insert(0, f"RoPE: {rope_reason}")
    report.fused_cross_entropy = _patch_causal_lm(base, arch.logit_softcap)
    graphs = cuda_graphs if isinstance(cuda_graphs, LayerGraphs) else None
    if cuda_graphs is True:
        if device.type != "cuda":
            report.not_patched.append("CUDA graphs: the model is not on a CUDA device")
        elif offload_checkpointing is False:
            report.not_patched.append("CUDA graphs: they come with offloaded checkpointing, which is off")
        else:
            graphs = getattr(base, "_llmforge_layer_graphs", None) or LayerGraphs()
    if graphs is not None:
        base._llmforge_layer_graphs = report.layer_graphs = graphs
    if offload_checkpointing or (offload_checkpointing is None and device.type == "cuda"):
        report.patched["offloaded_checkpoint"] = _patch_offload(base, text, prefix, graphs)
    if offload_frozen_weights or (offload_frozen_weights is None and device.type == "cuda"):
        if not arch.host_weights:
            if offload_frozen_weights:  # asked for by name: say why not
                report.not_patched.append(f"host weights: not for {model_type}")
        elif report.fused_cross_entropy:  # the loss must not call lm_head.forward (a whole-W copy per call)
            report.not_patched.extend(offload_candidates(base)[1])
            report.host_weights = _offload_frozen(base)
        else:
            report.not_patched.append("host weights: no fused cross-entropy for this model")
    return report
