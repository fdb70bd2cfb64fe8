"""Attach LoRA adapters (PEFT): rank, alpha, dropout, target modules, rsLoRA, modules_to_save, checkpointing."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import LlmforgeError
from .config import LoraConfig

# the projections of every supported architecture; "all-linear" picks those present in the model
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj")


def linear_targets(model: Any) -> list[str]:
    """Leaf names of the model's Linear projections inside its decoder layers (never ``lm_head``)."""
    names = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in PROJECTIONS and (isinstance(module, torch.nn.Linear) or "Linear" in type(module).__name__):
            names.add(leaf)
    return sorted(names)


def model_targets(model: Any, config: LoraConfig) -> list[str]:
    """``lora.target_modules`` as leaf names of ``model``'s modules ("all-linear": its projections)."""
    available = linear_targets(model)
    if config.target_modules == "all-linear":
        return available
    targets = [config.target_modules] if isinstance(config.target_modules, str) else list(config.target_modules)
    unknown = [t for t in targets if not any(n.rsplit(".", 1)[-1] == t for n, _ in model.named_modules())]
    if unknown:
        raise LlmforgeError(f"lora.target_modules {unknown[0]!r} is not a module of this model",
                            hint=f"choose from {', '.join(available)} or 'all-linear'")
    return targets


def add_lora(model: Any, config: LoraConfig, gradient_checkpointing: bool = False,
             target_modules: str | list[str] | None = None) -> Any:
    """Wrap ``model`` in a PEFT LoRA model according to ``config``; returns the PEFT model.
    ``target_modules`` (PEFT's form: leaf names or a regex over full names) replaces :func:`model_targets`,
    e.g. to confine LoRA to a vision-language model's language model."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    targets = model_targets(model, config) if target_modules is None else target_modules
    if config.r <= 0:
        raise LlmforgeError(f"lora.r must be positive, got {config.r}", hint="typical values: 8, 16, 32, 64")
    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_config = PeftLoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                 target_modules=targets, use_rslora=config.use_rslora, bias="none",
                                 modules_to_save=list(config.modules_to_save) or None, task_type="CAUSAL_LM")
    return get_peft_model(model, peft_config)
