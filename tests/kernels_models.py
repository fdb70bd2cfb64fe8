"""Patched vs unpatched tiny models (shared by the in-process torch-fallback tests and the interpreted child)."""

from __future__ import annotations

import copy

import torch

from tiny_models import tiny_config

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
VOCAB = 300


def tiny_lora_model(arch: str, *, lora_dropout: float = 0.0, peft: bool = True, seed: int = 0, num_layers: int = 2):
    """fp32 tiny ``arch`` model (eager attention) with LoRA r=4 on all linear layers and random B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, hidden_size=64, intermediate_size=96, num_layers=num_layers, num_heads=4, vocab_size=VOCAB,
                         head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    if not peft:
        return model
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout,
                                             target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def batch():
    """Two rows of 9 tokens, two packed documents per row (positions restart), some ignored labels."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    positions = torch.cat([torch.arange(5), torch.arange(4)]).repeat(2, 1)
    return dict(input_ids=ids, labels=labels, position_ids=positions)


def loss_and_grads(model):
    model.train()
    loss = model(**batch()).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return float(loss), grads


def check_patched_matches(arch: str, *, expect_backend: str, checkpointing: bool = True, rel_tol: float = 1e-4):
    """Unpatched vs patched (offloaded checkpointing on): same loss, same gradient of every trainable weight."""
    from llmforge.kernels.patch import patch_model, unpatch_rope

    ref = tiny_lora_model(arch)
    patched = copy.deepcopy(ref)
    for m in (ref, patched):
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_ref, grads_ref = loss_and_grads(ref)
    report = patch_model(patched, offload_checkpointing=checkpointing)
    try:
        loss_new, grads_new = loss_and_grads(patched)
    finally:
        unpatch_rope(patched)
    assert report.supported and report.backend == expect_backend, report
    assert report.rms_norm > 0 and report.rope and report.fused_cross_entropy, report.summary()
    assert report.lora_linear > 0, report.summary()
    if checkpointing:
        assert report.offloaded_checkpoint_layers == 1, report.summary()  # 2 layers, the last is not offloaded
    assert abs(loss_new - loss_ref) <= rel_tol * abs(loss_ref), f"{arch}: loss {loss_new} vs {loss_ref}"
    assert grads_new.keys() == grads_ref.keys()
    for name, g in grads_ref.items():
        err = float((grads_new[name] - g).abs().max())
        assert err <= rel_tol * max(float(g.abs().max()), 1e-3), f"{arch} {name}: grad differs by {err:.3g}"
        assert float(g.abs().max()) > 0, f"{arch} {name}: reference gradient is zero (test would be vacuous)"
    return report
