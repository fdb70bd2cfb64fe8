"""HF -> GGUF for llama, mistral, qwen2, qwen3: llama.cpp's logits match transformers (f32/f16/bf16/q8_0); f32 greedy is identical."""

import pytest

from export_logits_cases import QUANTS, check_conversion, make_reference_fixture

reference = make_reference_fixture(["llama","mistral","qwen2","qwen3"])


@pytest.mark.parametrize("quant", QUANTS)
def test_gguf_logits_match_transformers(reference, quant, tmp_path):
    arch, ref = reference
    check_conversion(arch, quant, ref, tmp_path)
