"""Patched vs unpatched tiny vision-language models (the vision tests' tiny Gemma 3, Qwen2.5-VL and Qwen2-VL) on an
image+text batch of the bundled vision example, encoded and masked by ``llmforge.trainer.vision``; shared by the
in-process torch-fallback tests and the interpreted child (``kernels_cases.case_patched_vlms``)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

VLMS = ("gemma3", "qwen2_5_vl", "qwen2_vl")
PROJECTOR = {"gemma3": "multi_modal_projector", "qwen2_5_vl": "merger", "qwen2_vl": "merger"}
VISION = {"gemma3": ["model.vision_tower", "model.multi_modal_projector"], "qwen2_5_vl": ["model.visual"],
          "qwen2_vl": ["model.visual"]}


def build_vlm(arch: str, out_dir: Path) -> Path:
    """The vision tests' tiny random ``arch`` VLM (2 text layers), tokenizer and processor in ``out_dir``."""
    if arch == "gemma3":
        from llmforge.trainer.vision_example import build_base_model

        return build_base_model(out_dir)
    from vision_qwen_model import build_qwen_vlm

    return build_qwen_vlm(out_dir, version="2" if arch == "qwen2_vl" else "2.5")


def image_text_batch(arch: str, model_dir: Path) -> dict[str, torch.Tensor]:
    """Two rows of the bundled example (an image each, different lengths: padding), labels on the replies only."""
    from llmforge.export.vision import find_vision_arch
    from llmforge.trainer.data import load_examples
    from llmforge.trainer.vision import collate_vision, encode_vision_all
    from llmforge.trainer.vision_example import DATA_PATH

    if arch == "gemma3":
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(model_dir))
    else:
        from vision_qwen_model import processor as qwen_processor

        processor = qwen_processor(model_dir)
    spec = find_vision_arch(json.loads((model_dir / "config.json").read_text()))
    _, examples = load_examples(DATA_PATH)
    rows, _ = encode_vision_all(examples[:2], processor, processor.tokenizer.chat_template, 128, DATA_PATH.parent,
                                spec=spec)
    assert len({len(r.input_ids) for r in rows}) == 2, "rows of one length: padding not exercised"
    return collate_vision(rows, processor.tokenizer.pad_token_id, torch.device("cpu"))


def compact_vocab(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut a tied-embedding VLM's vocabulary to the batch's tokens (Qwen's 151,936 rows make the interpreted
    cross-entropy kernel take minutes); returns the batch in the new ids."""
    config = model.config
    special = [config.image_token_id, config.video_token_id]
    keep = sorted(set(batch["input_ids"].flatten().tolist()) | set(special))
    old_to_new = torch.full((config.get_text_config().vocab_size,), -100, dtype=torch.long)
    old_to_new[keep] = torch.arange(len(keep))
    old = model.get_input_embeddings()
    assert model.lm_head.weight is old.weight, "not tied"
    embed = torch.nn.Embedding(len(keep), old.weight.shape[1])
    with torch.no_grad():
        embed.weight.copy_(old.weight[keep])
    model.set_input_embeddings(embed)
    model.lm_head = torch.nn.Linear(embed.weight.shape[1], len(keep), bias=False)
    model.lm_head.weight = embed.weight
    config.image_token_id, config.video_token_id = (int(old_to_new[i]) for i in special)
    config.get_text_config().vocab_size = len(keep)
    labels = batch["labels"]
    return dict(batch, input_ids=old_to_new[batch["input_ids"]],
                labels=torch.where(labels == -100, labels, old_to_new[labels.clamp(min=0)]))


def tiny_lora_vlm(arch: str, model_dir: Path, checkpointing: bool = True,
                  compact: dict[str, torch.Tensor] | None = None) -> Any:
    """fp32 eager VLM with the vision trainer's LoRA (language model projections, r=4, random B) and a trained
    projector (``modules_to_save``); ``compact``: a batch whose tokens the vocabulary is cut to (see
    ``compact_vocab``; the batch in the new ids is ``model.compact_batch``)."""
    from transformers import AutoModelForImageTextToText

    from llmforge.trainer.config import LoraConfig
    from llmforge.trainer.lora import add_lora
    from llmforge.trainer.vision import language_targets

    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32,
                                                        attn_implementation="eager")
    model.config.use_cache = False
    compact_batch = compact_vocab(model, compact) if compact is not None else None
    lora = LoraConfig(r=4, alpha=8, modules_to_save=[PROJECTOR[arch]])
    torch.manual_seed(0)
    model = add_lora(model, lora, gradient_checkpointing=checkpointing, target_modules=language_targets(model, lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.compact_batch = compact_batch
    return model


def loss_and_grads(model: Any, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    """The trainer's summed loss (``sft.token_loss_sum``) and the gradient of every trainable weight."""
    from llmforge.trainer.sft import token_loss_sum

    model.train()
    loss, count = token_loss_sum(model, batch)
    assert count > 0
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return float(loss), grads


def expected_counts(arch: str) -> dict[str, int]:
    """What the report must count on the 2-layer tiny models."""
    if arch == "gemma3":  # 4 norms + q/k norms per layer + final; Q/K/V fused, o_proj alone
        return dict(rms_norm=13, mlp_fused_lora=2, qkv_fused_lora=2, lora_linear=2)
    # Qwen: 2 norms per layer + final; q/k/v carry a bias: each on PEFT's path, o_proj fused
    return dict(rms_norm=5, mlp_fused_lora=2, qkv_fused_lora=0, lora_linear=2)


def check_vlm_patched_matches(arch: str, model_dir: Path, *, expect_backend: str, compact: bool = False,
                              rel_tol: float = 1e-4):
    """Unpatched vs patched (offloaded checkpointing on): same loss, same gradient of every trainable weight
    (LoRA and projector); only the language model patched. ``compact``: vocabulary cut to the batch's tokens."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from llmforge.kernels import patch as patch_module
    from llmforge.kernels.offload import offloaded_checkpoint
    from llmforge.kernels.patch import patch_model, unpatch_rope

    batch = image_text_batch(arch, model_dir)
    ref = tiny_lora_vlm(arch, model_dir, compact=batch if compact else None)
    batch = ref.compact_batch if compact else batch
    patched = copy.deepcopy(ref)
    loss_ref, grads_ref = loss_and_grads(ref, batch)
    report = patch_model(patched, offload_checkpointing=True)
    rotated = []  # q/k pairs the patched RoPE handed to the kernel (Triton) or its fallback
    original_rope = patch_module.apply_rope_
    patch_module.apply_rope_ = lambda *a, **k: (rotated.append(1), original_rope(*a, **k))[1]
    try:
        loss_new, grads_new = loss_and_grads(patched, batch)
    finally:
        patch_module.apply_rope_ = original_rope
        unpatch_rope(patched)
    if expect_backend != "torch":  # every layer's q/k went through the kernel, forward and recomputation
        assert len(rotated) == 4, f"{arch}: RoPE kernel ran {len(rotated)} times, not 2 layers x 2 passes"
    summary = report.summary()
    assert report.supported and report.backend == expect_backend, summary
    assert report.text_model == "model.language_model" and report.left_as_is == VISION[arch], summary
    for part, n in expected_counts(arch).items():
        assert getattr(report, part) == n, f"{arch} {part}: {getattr(report, part)} != {n}: {summary}"
    assert report.rope and report.fused_cross_entropy and report.offloaded_checkpoint_layers == 1, summary
    names = [m.split(":")[0] for m in report.modules()]
    assert all(n.startswith("model.language_model.") for n in names if "." in n), report.modules()
    if arch != "gemma3":
        assert sum("base has a bias" in s for s in report.not_patched) == 6, summary  # q/k/v of 2 layers
    base = patched.get_base_model()
    vision_layers = [m for name, m in base.named_modules() if isinstance(m, GradientCheckpointingLayer)
                     and not name.startswith("model.language_model.")]
    assert vision_layers and all(m._gradient_checkpointing_func is not offloaded_checkpoint for m in vision_layers)
    assert abs(loss_new - loss_ref) <= rel_tol * abs(loss_ref), f"{arch}: loss {loss_new} vs {loss_ref}"
    assert grads_new.keys() == grads_ref.keys()
    assert any(PROJECTOR[arch] in n for n in grads_ref), "projector not trained: vision path not checked"
    for name, g in grads_ref.items():
        err = float((grads_new[name] - g).abs().max())
        assert err <= rel_tol * max(float(g.abs().max()), 1e-3), f"{arch} {name}: grad differs by {err:.3g}"
        assert float(g.abs().max()) > 0, f"{arch} {name}: reference gradient is zero (test would be vacuous)"
    return report
