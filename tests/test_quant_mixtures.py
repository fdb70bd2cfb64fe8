"""Quant mixtures: ``llmforge convert --quant X`` gives llama.cpp's tensor types and bytes.

Reference: ``llama_model_quantize`` (llama-cpp-python 0.3.36) quantizing llmforge's own f32 GGUF of the
same tiny model with the same ftype. Every ftype runs on the tiny mistral model (GQA 2, untied); q4_k_m
and q2_k also run on every supported arch (tied embeddings, GQA >= 4, gemma/phi3 shapes). The quantized
files load in llama.cpp and their logits stay within a per-type tolerance of the f32 file's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmforge.export.convert import convert
from llmforge.quant import mixtures
from llmforge.quant.api import FTYPES, TensorContext, choose_tensor_type, resolve_ftype
from oracles import llama_cpp_logits, rel_error
from quant_oracle import gguf_tensors, llama_quantize_file
from tiny_models import TINY_ARCHS

ALL_FTYPES = list(FTYPES)

# max |logit diff| / max |f32 logit| of llama.cpp on the quantized tiny mistral vs its f32 GGUF, as measured
# with llama-cpp-python 0.3.36 (random weights, std 0.08, 2 layers: a worst case, real models do far better):
# q2_k 0.997, q3_k_s 0.751, q3_k_m 0.720, q3_k_l 0.767, q4_0 0.517, q4_1 0.436, q4_k_s 0.421, q4_k_m 0.449,
# q5_0 0.306, q5_1 0.244, q5_k_s 0.284, q5_k_m 0.284, q6_k 0.130, q8_0 0.0459, f16 0.00198, bf16 0.0203, f32 0.
# Limits: measured x1.3 (the bytes are identical to llama.cpp's, so these only guard loading and sanity).
MEASURED_LOGIT_ERROR = {
    "q2_k": 0.997, "q3_k_s": 0.751, "q3_k_m": 0.720, "q3_k_l": 0.767, "q4_0": 0.517, "q4_1": 0.436,
    "q4_k_s": 0.421, "q4_k_m": 0.449, "q5_0": 0.306, "q5_1": 0.244, "q5_k_s": 0.284, "q5_k_m": 0.284,
    "q6_k": 0.130, "q8_0": 0.0459, "f16": 0.00198, "bf16": 0.0203, "f32": 0.0,
}
LOGIT_TOLERANCE = {q: max(1.3 * e, 1e-6) for q, e in MEASURED_LOGIT_ERROR.items()}
TOKENS = [1, 415, 2936, 9060, 285, 1142, 28705, 28770, 28734, 754, 272, 17898, 3914, 28723, 13, 2]


@pytest.fixture(scope="session")
def f32_gguf(tiny_model_dir, tmp_path_factory):
    """llmforge's own f32 GGUF of each tiny arch, built once."""
    cache: dict[str, tuple[Path, Path]] = {}

    def build(arch: str) -> tuple[Path, Path]:
        if arch not in cache:
            model = tiny_model_dir(arch)
            out = tmp_path_factory.mktemp(f"f32-{arch}") / f"{arch}-f32.gguf"
            convert(model, out, "f32")
            cache[arch] = (model, out)
        return cache[arch]

    return build


def compare_with_llama_cpp(model: Path, f32: Path, quant: str, tmp: Path) -> tuple[Path, dict[str, str]]:
    ours = tmp / f"ours-{quant}.gguf"
    ref = tmp / f"ref-{quant}.gguf"
    convert(model, ours, quant)
    llama_quantize_file(f32, ref, resolve_ftype(quant).file_type)
    a, b = gguf_tensors(ref), gguf_tensors(ours)
    assert set(a) == set(b)
    wrong_type = {n: (a[n][0], b[n][0]) for n in a if a[n][0] != b[n][0]}
    assert not wrong_type, f"{quant}: types differ (llama.cpp, llmforge): {wrong_type}"
    wrong_bytes = [n for n in a if a[n][1] != b[n][1]]
    assert not wrong_bytes, f"{quant}: bytes differ for {wrong_bytes}"
    return ours, {n: mixtures.T(t).name for n, (t, _) in b.items()}


@pytest.mark.parametrize("quant", ALL_FTYPES)
def test_every_ftype_matches_llama_cpp_and_loads(f32_gguf, tmp_path, quant):
    model, f32 = f32_gguf("mistral")
    ours, types = compare_with_llama_cpp(model, f32, quant, tmp_path)
    err = rel_error(llama_cpp_logits(ours, TOKENS), llama_cpp_logits(f32, TOKENS))
    assert err <= LOGIT_TOLERANCE[quant], f"{quant}: logits rel error {err:.3g}"


def test_error_shrinks_with_bits():
    e = MEASURED_LOGIT_ERROR
    assert e["q2_k"] > e["q3_k_m"] > e["q4_k_m"] > e["q5_k_m"] > e["q6_k"] > e["q8_0"] > e["f16"] > e["f32"]


def test_more_bits_schedule_matches_llama_cpp_docs():
    # the layers llama.cpp's use_more_bits picks for n = 32: 0-3, 6, 9, ..., 27, 28-31
    expected = set(range(4)) | set(range(6, 28, 3)) | set(range(28, 32))
    assert {i for i in range(32) if mixtures.use_more_bits(i, 32)} == expected


def test_planner_and_stateless_choice_agree_on_dense_models():
    names = ["output.weight", "token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{t}.weight" for i in range(32)
        for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_gate", "ffn_down", "attn_norm")]
    for quant in ALL_FTYPES:
        mixture = mixtures.BY_NAME[quant]
        facts = mixtures.ModelFacts("llama", 32, 32, 8)
        planner = mixtures.TypePlanner(mixture, facts, names)
        for name in mixtures.weights_map_order(names):
            shape = (4096,) if "norm" in name else (4096, 4096)
            ctx = TensorContext(name, shape, "llama", 32, 32, 8)
            assert planner.tensor_type(name, shape) == choose_tensor_type(FTYPES[quant], ctx), (quant, name)


def test_row_length_fallbacks():
    # tensor_type_fallback: Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, else F16
    T = mixtures.T
    assert [mixtures.fallback(t, 288).name for t in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)] == \
        ["Q4_0", "Q4_0", "Q5_0", "Q5_1", "Q8_0"]
    assert mixtures.fallback(T.Q4_K, 100) == T.F16
    assert np.all([mixtures.fallback(t, 512) == t for t in (T.Q2_K, T.Q6_K)])
