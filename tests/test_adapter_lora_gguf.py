"""GGUF LoRA adapters: llama.cpp applies them at run time (``lora_path``) and must equal the merged GGUF."""

from __future__ import annotations

import pytest
from adapter_helpers import llama_with_lora_logits, make_adapter, token_ids
from gguf import GGUFReader
from oracles import llama_cpp_logits, rel_error

from llmforge.errors import LlmforgeError
from llmforge.export.adapter import convert_adapter
from llmforge.export.convert import convert_model

CASES = {
    # llama GGUF arch: Q/K row permutation on lora_b; embed (flipped layout) and lm_head; rsLoRA + patterns
    "mistral": dict(r=8, lora_alpha=16, use_rslora=True, rank_pattern={"k_proj": 4}, alpha_pattern={"down_proj": 3},
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "embed_tokens", "lm_head"]),
    # fused qkv / gate_up
    "phi3": dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
}


@pytest.fixture(scope="module")
def base_ggufs(tiny_model_dir, tmp_path_factory):
    out = {}
    for arch in CASES:
        path = tmp_path_factory.mktemp(f"base-{arch}") / "base.gguf"
        convert_model(tiny_model_dir(arch), path, "f32", progress=False)
        out[arch] = path
    return out


@pytest.mark.parametrize("arch", list(CASES))
def test_lora_gguf_applied_by_llama_cpp_equals_merged(arch, tiny_model_dir, base_ggufs, tmp_path):
    base = tiny_model_dir(arch)
    adapter_dir, _ = make_adapter(base, tmp_path / "adapter", seed=21, **CASES[arch])
    lora = tmp_path / "adapter.gguf"
    report = convert_adapter(adapter_dir, lora, "f32", lora_only=True)
    assert report.path == lora
    fields = GGUFReader(lora)
    assert fields.get_field("general.type").contents() == "adapter"
    assert fields.get_field("adapter.type").contents() == "lora"
    assert fields.get_field("adapter.lora.alpha").contents() == pytest.approx(CASES[arch]["lora_alpha"])
    names = {t.name for t in fields.tensors}
    assert all(n.endswith((".lora_a", ".lora_b")) for n in names)
    assert "blk.0.attn_output.weight.lora_a" in names

    merged = tmp_path / "merged.gguf"
    convert_adapter(adapter_dir, merged, "f32")
    ids = token_ids(arch)
    merged_logits = llama_cpp_logits(merged, ids)
    assert rel_error(llama_cpp_logits(base_ggufs[arch], ids), merged_logits) > 1e-2   # the adapter matters
    assert rel_error(llama_with_lora_logits(base_ggufs[arch], lora, ids), merged_logits) < 1e-4


def test_lora_gguf_f16_is_close(tiny_model_dir, base_ggufs, tmp_path):
    base = tiny_model_dir("phi3")
    adapter_dir, _ = make_adapter(base, tmp_path / "adapter", seed=22, **CASES["phi3"])
    lora = tmp_path / "adapter-f16.gguf"
    convert_adapter(adapter_dir, lora, "f16", lora_only=True)
    assert {t.tensor_type.name for t in GGUFReader(lora).tensors} == {"F16"}
    merged = tmp_path / "merged.gguf"
    convert_adapter(adapter_dir, merged, "f32")
    ids = token_ids("phi3")
    assert rel_error(llama_with_lora_logits(base_ggufs["phi3"], lora, ids), llama_cpp_logits(merged, ids)) < 2e-3


@pytest.mark.parametrize("kwargs, match", [
    (dict(use_dora=True, target_modules=["q_proj"]), "DoRA"),
    (dict(target_modules=["q_proj"], modules_to_save=["model.norm"]), "whole tensors"),
])
def test_unrepresentable_adapters_are_refused(kwargs, match, tiny_model_dir, tmp_path):
    adapter_dir, _ = make_adapter(tiny_model_dir("mistral"), tmp_path / "adapter", r=2, lora_alpha=4, **kwargs)
    out = tmp_path / "a.gguf"
    with pytest.raises(LlmforgeError, match=match):
        convert_adapter(adapter_dir, out, "f16", lora_only=True)
    assert not out.exists() and list(tmp_path.glob(".a.gguf*")) == []
    with pytest.raises(LlmforgeError, match="f16 or f32"):
        convert_adapter(adapter_dir, out, "q4_0", lora_only=True)
