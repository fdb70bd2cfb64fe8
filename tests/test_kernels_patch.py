"""``patch_model`` on tiny models of every supported architecture: the patched model's loss and gradients
equal the unpatched model's, with the torch fallbacks (in process) and with the Triton kernels (interpreted,
in a child process); the report says what was and was not patched."""

from __future__ import annotations

import pytest
import torch

from kernels_cases import run_cases
from kernels_models import ARCHS, batch, check_patched_matches, loss_and_grads, tiny_lora_model
from llmforge.kernels.patch import patch_model, unpatch_rope


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    return run_cases(["patched_models"])


def test_patched_models_match_with_triton_kernels_interpreted(interpreted):
    assert interpreted["patched_models"] == "ok", interpreted["patched_models"]


@pytest.mark.parametrize("arch", ARCHS)
def test_patched_model_matches_with_torch_fallbacks(arch):
    report = check_patched_matches(arch, expect_backend="torch")
    if arch == "qwen2":  # q/k/v carry a bias: PEFT's modules stay, and the report says so
        assert report.lora_linear == 2 and report.qkv_fused_lora == 0
        assert any("base has a bias" in s for s in report.not_patched)
    if arch == "phi3":  # fused gate_up_proj and qkv_proj: activation kernel, LoRA per projection
        assert report.mlp_fused_lora == 0 and report.mlp_activation_only == 2 and report.lora_linear == 8
        assert report.qkv_fused_lora == 0
    if arch not in ("qwen2", "phi3"):  # Q/K/V in one node per layer, o_proj alone
        assert report.mlp_fused_lora == 2 and report.qkv_fused_lora == 2 and report.lora_linear == 2
        assert not report.not_patched and "2 fused LoRA QKV" in report.summary()


def test_lora_dropout_falls_back_to_peft():
    model = tiny_lora_model("llama", lora_dropout=0.1)
    report = patch_model(model, offload_checkpointing=False)
    try:
        assert report.lora_linear == 0 and report.mlp_fused_lora == 0
        assert any("lora_dropout" in s for s in report.not_patched)
    finally:
        unpatch_rope(model)


def test_full_finetune_model_without_peft_matches():
    ref = tiny_lora_model("gemma2", peft=False)
    patched = tiny_lora_model("gemma2", peft=False)
    loss_ref, grads_ref = loss_and_grads(ref)
    report = patch_model(patched)
    try:
        loss_new, grads_new = loss_and_grads(patched)
    finally:
        unpatch_rope(patched)
    assert report.lora_linear == 0 and report.mlp_activation_only == 2 and report.fused_cross_entropy
    assert abs(loss_new - loss_ref) < 1e-5
    for name, g in grads_ref.items():  # includes the (tied) embedding / lm_head weight through the fused CE
        assert torch.allclose(grads_new[name], g, rtol=1e-4, atol=1e-6), name


def test_unsupported_architecture_is_reported_not_patched():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    report = patch_model(model)
    assert not report.supported and "not supported" in report.summary()


def test_eval_without_grad_keeps_logits():
    model = tiny_lora_model("llama")
    patch_model(model)
    try:
        with torch.no_grad():
            out = model(**batch())
        assert out.logits is not None and out.logits.shape[-1] == 300 and torch.isfinite(out.loss)
    finally:
        unpatch_rope(model)
