"""GRPO's per-token log-probabilities of the completions, two ways.

``full``: the causal LM's own forward with ``logits_to_keep=n + 1``, then one float32 log_softmax per row (a
(B, n + 1, V) logits block in the model's dtype exists, the memory peak of a GRPO step at a 128K vocabulary).
``fused``: the decoder's normed hidden states of those positions, then ``linear_target_logprobs`` chunked over
rows (``llmforge/kernels/logprobs.py``): temperature and Gemma's final logit softcap inside the kernel, never
more than one chunk of logits. The fused path applies to the ``*ForCausalLM`` classes in ``FUSED_CLASSES``
whose lm_head is a frozen, bias-free ``nn.Linear`` on the decoder's device; the trainer takes it as it takes
the other kernels (CUDA present and ``train.kernels`` not false), see :func:`use_fused_logprobs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# the *ForCausalLM classes whose logits are exactly lm_head(decoder(...).last_hidden_state) (True: then the
# final logit softcap of the config, when set)
FUSED_CLASSES = {
    "LlamaForCausalLM": False, "MistralForCausalLM": False, "Qwen2ForCausalLM": False, "Qwen3ForCausalLM": False,
    "Phi3ForCausalLM": False, "GemmaForCausalLM": False, "Gemma2ForCausalLM": True, "Gemma3ForCausalLM": True,
}


@dataclass
class FusedHead:
    """What the fused path calls: the decoder (final norm included), lm_head's weight, the logit softcap, and
    whether the weight is streamed in vocabulary chunks (kept in host memory: ``kernels/host_weights.py``)."""
    decoder: nn.Module
    weight: torch.Tensor
    softcap: float | None
    streamed: bool = False


def _base_model(model: Any) -> Any:
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def fused_head(model: Any) -> tuple[FusedHead | None, str]:
    """The fused path's parts of ``model`` (bare or PEFT-wrapped), or None and why it does not apply."""
    lm = _base_model(model)
    name = type(lm).__name__
    if name not in FUSED_CLASSES:
        return None, f"{name} is not one of the known causal LMs"
    decoder, head = getattr(lm, "model", None), getattr(lm, "lm_head", None)
    if not isinstance(decoder, nn.Module):
        return None, f"{name} has no decoder at .model"
    if type(head) is not nn.Linear or head.bias is not None:
        return None, f"lm_head is {type(head).__name__}, not a bias-free nn.Linear (trained or wrapped)"
    if head.weight.requires_grad:
        return None, "lm_head is trained"
    streamed = bool(getattr(head, "_llmforge_host_weight", False)) or \
        head.weight.device != next(decoder.parameters()).device
    softcap = getattr(lm.config, "final_logit_softcapping", None) if FUSED_CLASSES[name] else None
    return FusedHead(decoder, head.weight, float(softcap) if softcap else None, streamed), \
        "fused, lm_head streamed from host memory" if streamed else "fused"


def use_fused_logprobs(model: Any, kernels: bool) -> bool:
    """The SFT kernels' rule (CUDA present and ``train.kernels`` not false), for a model the fused path knows."""
    return bool(kernels) and torch.cuda.is_available() and fused_head(model)[0] is not None


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    # left-padded prompts see the positions generation gave them
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def full_logprobs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int,
                  temperature: float) -> torch.Tensor:
    """log p of the last ``n`` tokens of each row from the model's logits / ``temperature``: (B, n) float32."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=_positions(attention_mask),
                   logits_to_keep=n + 1, use_cache=False).logits[:, :-1]
    targets = input_ids[:, -n:]
    # one row at a time: a float32 copy of the whole (batch, n, vocab) block is what runs out of memory
    rows = [(row.float() / temperature).log_softmax(-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
            for row, t in zip(logits, targets)]
    return torch.stack(rows)


def fused_logprobs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int, temperature: float,
                   chunk_rows: int | None = None, chunk_vocab: int | None = None) -> torch.Tensor:
    """``full_logprobs`` from the decoder's hidden states through the row-chunked fused kernel (see the module
    docstring); the LoRA adapter, disabled or not, acts as in the full forward."""
    from ..kernels.logprobs import linear_target_logprobs

    head, why = fused_head(model)
    if head is None:
        raise ValueError(f"fused log-probs do not apply: {why}")
    hidden = head.decoder(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=_positions(attention_mask), use_cache=False).last_hidden_state
    return linear_target_logprobs(hidden[:, -n - 1:-1], head.weight, input_ids[:, -n:], softcap=head.softcap,
                                  scale=1.0 / temperature, chunk_rows=chunk_rows, streamed=head.streamed,
                                  chunk_vocab=chunk_vocab)


def token_logprobs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int,
                   temperature: float, fused: bool = False) -> torch.Tensor:
    """log p(token) of the last ``n`` tokens of each row, from logits scaled by ``temperature`` (as sampled):
    the fused path when ``fused`` and the model has a head it knows, else the full logits."""
    if fused and fused_head(model)[0] is not None:
        return fused_logprobs(model, input_ids, attention_mask, n, temperature)
    return full_logprobs(model, input_ids, attention_mask, n, temperature)
