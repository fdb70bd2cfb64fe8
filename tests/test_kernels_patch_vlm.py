"""``patch_model`` on the vision tests' tiny VLMs (Gemma 3, Qwen2.5-VL, Qwen2-VL): only the language model is
patched; on an image+text batch of the bundled vision example the patched model's loss and LoRA / projector
gradients equal the unpatched model's, with the torch fallbacks (in process) and with the Triton kernels
(interpreted, in a child process); the report lists the patched modules and what was left as is; the vision
trainer applies the kernels under the text trainer's rule and reports them in its summary."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kernels_cases import run_cases
from kernels_vlm import VLMS, build_vlm, check_vlm_patched_matches, tiny_lora_vlm
from llmforge.kernels.patch import patch_model, unpatch_rope

pytest.importorskip("PIL")


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlms")
    return {arch: build_vlm(arch, root / arch) for arch in VLMS}


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    return run_cases(["patched_vlms"])


def test_patched_vlms_match_with_triton_kernels_interpreted(interpreted):
    assert interpreted["patched_vlms"] == "ok", interpreted["patched_vlms"]


@pytest.mark.parametrize("arch", VLMS)
def test_patched_vlm_matches_with_torch_fallbacks(arch, vlm_dirs):
    report = check_vlm_patched_matches(arch, vlm_dirs[arch], expect_backend="torch")
    modules = report.modules()
    assert "model.language_model.layers.0.mlp: fused LoRA MLP" in modules
    assert "model.language_model.norm: RMSNorm" in modules
    assert "lm_head: fused linear cross-entropy" in modules and "apply_rotary_pos_emb: RoPE" in modules
    if arch == "gemma3":  # (1 + w) q/k norms, Q/K/V in one node
        assert "model.language_model.layers.1.self_attn.k_norm: RMSNorm" in modules
        assert "model.language_model.layers.1.self_attn: fused LoRA QKV" in modules
    assert "left as is: model." in report.summary()


def test_mrope_applied_inside_attention_leaves_rope_unpatched(vlm_dirs, monkeypatch):
    """A text model whose rotary embedding hands the attention (3, B, T, D) M-RoPE tables (sections applied in
    the attention, as before transformers folded them): RoPE stays HF's and the report says why."""
    import sys

    model = tiny_lora_vlm("qwen2_5_vl", vlm_dirs["qwen2_5_vl"], checkpointing=False)
    rotary = model.get_base_model().model.language_model.rotary_emb
    folded = rotary.forward
    monkeypatch.setattr(rotary, "forward", lambda x, ids: tuple(t.expand(3, *t.shape) for t in folded(x, ids)))
    modeling = sys.modules[type(model.get_base_model()).__module__]
    before = modeling.apply_rotary_pos_emb
    report = patch_model(model, offload_checkpointing=False)
    try:
        assert not report.rope and modeling.apply_rotary_pos_emb is before
        assert report.not_patched[0].startswith("RoPE: M-RoPE sections applied in attention (4-D"), report.not_patched
        assert "RoPE no" in report.summary() and report.rms_norm == 5 and report.fused_cross_entropy
    finally:
        unpatch_rope(model)


def test_vision_trainer_applies_kernels_under_the_sft_rule(vlm_dirs, monkeypatch):
    """``maybe_patch_kernels`` as ``train_vision`` calls it: off without CUDA or with ``train.kernels: false``;
    with CUDA (faked here; the model stays on the CPU) the language model is patched, host weights never."""
    from llmforge.trainer.config import load_config
    from llmforge.trainer.run import maybe_patch_kernels

    model = tiny_lora_vlm("gemma3", vlm_dirs["gemma3"], checkpointing=False)
    config = load_config(None, ["train.offload_embeddings=on"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert maybe_patch_kernels(model, config, host_weights=False) == "off (no CUDA device)"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert maybe_patch_kernels(model, load_config(None, ["train.kernels=false"]), host_weights=False) == \
        "off (train.kernels is false)"
    try:
        summary = maybe_patch_kernels(model, config, host_weights=False)
    finally:
        unpatch_rope(model)
    assert summary.startswith("kernels (") and "on gemma3 (language model model.language_model): 13 RMSNorm" in summary
    assert "left as is: model.vision_tower, model.multi_modal_projector" in summary and "host weights" not in summary
