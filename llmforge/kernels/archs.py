"""Which of llmforge's kernels each supported architecture gets, and where its language model sits.

One row per transformers ``model_type`` (``ARCHS``). Text models are patched whole; for vision-language models
(Gemma 3, Qwen2-VL, Qwen2.5-VL) only the language model inside the wrapper is patched, plus the wrapper's
``lm_head`` loss: the vision tower and projector keep Hugging Face's modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# where transformers 5 puts the language model (the decoder stack) of a *ForConditionalGeneration
VLM_TEXT = ("model.language_model",)


@dataclass(frozen=True)
class ArchKernels:
    """The kernels one architecture gets (a row of ``ARCHS``)."""
    mlp: str = "split"             # gated MLP: "split" (gate_proj, up_proj, down_proj) or "fused" (gate_up_proj)
    norm: str = "w"                # RMSNorm scale: "w" (Llama: w * norm(x)) or "1+w" (Gemma: (1 + w) * norm(x))
    rope: str = "rotate_half"      # "rotate_half": apply_rotary_pos_emb on (B, T, D) cos/sin, whatever the base
                                   # per layer (Gemma 3's sliding layers); "mrope": Qwen2-VL's multimodal RoPE,
                                   # patched only where the rotary embedding folds its sections into such tables
    text_model: tuple[str, ...] = ()   # VLMs: paths of the language model in the wrapper (first found); (): all
    logit_softcap: bool = True     # the loss applies final_logit_softcapping (HF's VLM forwards do not)
    host_weights: bool = True      # frozen embeddings / lm_head may be kept in host memory
    mlp_into_residual: bool = True  # the MLP's output only goes into the residual sum (no norm after it, as
                                    # Gemma 2/3's post_feedforward_layernorm): a recompute may skip down_proj


TEXT = ArchKernels()
GEMMA = ArchKernels(norm="1+w", mlp_into_residual=False)
ARCHS: dict[str, ArchKernels] = {
    "llama": TEXT, "mistral": TEXT, "qwen2": TEXT, "qwen3": TEXT,
    "gemma2": GEMMA, "gemma3_text": GEMMA,
    "phi3": ArchKernels(mlp="fused"),
    # vision-language models: the language model only
    "gemma3": ArchKernels(norm="1+w", text_model=VLM_TEXT, logit_softcap=False, host_weights=False,
                          mlp_into_residual=False),
    "qwen2_vl": ArchKernels(rope="mrope", text_model=VLM_TEXT, logit_softcap=False, host_weights=False),
    "qwen2_5_vl": ArchKernels(rope="mrope", text_model=VLM_TEXT, logit_softcap=False, host_weights=False),
}


def find_text_model(model: nn.Module, arch: ArchKernels) -> tuple[nn.Module | None, str]:
    """(the module to patch, its path in ``model``): ``model`` itself for text models, the language model of a
    VLM (None when none of ``arch.text_model`` is there)."""
    if not arch.text_model:
        return model, ""
    for path in arch.text_model:
        try:
            found = model.get_submodule(path)
        except AttributeError:
            continue
        if hasattr(found, "layers"):   # a decoder stack, not a causal LM around one
            return found, path
    return None, ""


def left_as_is(model: nn.Module, text_path: str) -> list[str]:
    """The modules beside the language model on its path (vision tower, projector): not patched."""
    if not text_path:
        return []
    out: list[str] = []
    parts = text_path.split(".")
    for depth in range(len(parts)):
        parent = ".".join(parts[:depth])
        module = model.get_submodule(parent) if parent else model
        for name, _ in module.named_children():
            if name != parts[depth] and not (depth == 0 and name == "lm_head"):
                out.append(f"{parent}.{name}" if parent else name)
    return out


def rope_unpatchable(text: nn.Module, arch: ArchKernels) -> str | None:
    """Why the RoPE kernel would not be exact for this text model, or None when it is.

    The kernel rotates q/k with per-(row, token) cos/sin of the head's width. Qwen2-VL's M-RoPE gives each
    frequency band the temporal, height or width position (``mrope_section``): exact when the rotary embedding
    has already folded the sections into (B, T, D) tables (transformers 5's layout), not when the attention
    applies them to (3, B, T, D) tables itself."""
    if arch.rope != "mrope":
        return None
    rotary = getattr(text, "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    if rotary is None or not isinstance(inv_freq, torch.Tensor):
        return "M-RoPE without a rotary_emb module to check"
    positions = torch.stack([torch.arange(4), torch.arange(4) * 2, torch.arange(4) * 3]).to(inv_freq.device)
    try:
        with torch.no_grad():
            cos, _ = rotary(torch.zeros(1, device=inv_freq.device), positions[:, None, :])
    except Exception as exc:  # noqa: BLE001 - any failure means "not the layout the kernel takes"
        return f"M-RoPE tables could not be checked ({exc.__class__.__name__})"
    if cos.dim() != 3 or cos.shape[:2] != (1, 4):
        return f"M-RoPE sections applied in attention ({cos.dim()}-D cos/sin): the RoPE kernel does not do them"
    return None
