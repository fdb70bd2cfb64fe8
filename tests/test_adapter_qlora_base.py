"""QLoRA: adapters whose base is a bitsandbytes 4-bit checkpoint (saved by transformers + bitsandbytes here).

With only the 4-bit base, the merge goes onto the NF4-dequantized weights (and says so); with the 16-bit
folder beside it (``name`` next to ``name-bnb-4bit``), that one is used.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from adapter_helpers import load_f32, logits_of, make_adapter, token_ids
from oracles import llama_cpp_logits, rel_error

from llmforge.export.adapter import convert_adapter

F = pytest.importorskip("bitsandbytes.functional")
TARGETS = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])


@pytest.fixture(scope="module")
def bases(tiny_model_dir, tmp_path_factory):
    """(16-bit folder, 4-bit folder saved by bitsandbytes, f32 model holding the dequantized 4-bit weights)."""
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    root = tmp_path_factory.mktemp("qlora")
    sixteen = root / "tiny-mistral"
    shutil.copytree(tiny_model_dir("mistral"), sixteen)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model4 = AutoModelForCausalLM.from_pretrained(sixteen, quantization_config=q, dtype=torch.bfloat16)
    four = root / "tiny-mistral-bnb-4bit"
    model4.save_pretrained(four)
    for f in sixteen.glob("tokenizer*"):
        shutil.copy(f, four / f.name)
    state = {}
    for name, module in model4.named_modules():
        if isinstance(module, Linear4bit):
            state[f"{name}.weight"] = F.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    reference = load_f32(sixteen)
    for name, p in model4.state_dict().items():
        if name in reference.state_dict() and name not in state:
            state[name] = p.float()
    reference.load_state_dict(state)
    return sixteen, four, reference


def _adapter_on(base_model, base_dir, tmp_path):
    """A random adapter, computed on ``base_model``, recorded as trained on ``base_dir``."""
    folder = tmp_path / "adapter"
    base_model.save_pretrained(tmp_path / "ref")
    for f in base_dir.glob("tokenizer*"):
        shutil.copy(f, tmp_path / "ref" / f.name)
    _, peft_model = make_adapter(tmp_path / "ref", folder, seed=31, **TARGETS)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base_dir)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder, peft_model


def test_merge_onto_dequantized_nf4_base(bases, tmp_path):
    sixteen, four, reference = bases
    lonely = tmp_path / "only4" / "tiny-mistral-bnb-4bit"      # no 16-bit folder beside it
    shutil.copytree(four, lonely)
    adapter, peft_model = _adapter_on(reference, lonely, tmp_path)
    out = tmp_path / "merged.gguf"
    report = convert_adapter(adapter, out, "f32")
    assert any("NF4-dequantized" in c for c in report.checks)
    ids = token_ids("mistral")
    expected = logits_of(peft_model.merge_and_unload(), ids)
    assert rel_error(llama_cpp_logits(out, ids), expected) < 1e-4
    from llmforge.export.merge import merge_to_hf

    report = merge_to_hf(adapter, tmp_path / "merged", dtype="f32", progress=False)
    assert any("NF4-dequantized" in n for n in report["notes"])
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    assert rel_error(logits_of(load_f32(tmp_path / "merged"), ids), expected) < 1e-5
    # the dequantized base really differs from the 16-bit one, so the check above tells them apart
    assert rel_error(logits_of(load_f32(sixteen), ids), logits_of(reference, ids)) > 1e-3


def test_sixteen_bit_base_beside_the_4bit_one_is_preferred(bases, tmp_path):
    sixteen, four, _ = bases
    adapter, peft_model = _adapter_on(load_f32(sixteen), four, tmp_path)
    out = tmp_path / "merged.gguf"
    report = convert_adapter(adapter, out, "f32")
    assert any("16-bit base" in c for c in report.checks)
    ids = token_ids("mistral")
    assert rel_error(llama_cpp_logits(out, ids), logits_of(peft_model.merge_and_unload(), ids)) < 1e-4
