"""K-quant packing is byte-identical to llama.cpp (llama-cpp-python 0.3.36), with and without importance.

Oracles: ``llama_model_quantize`` on a GGUF holding the random tensors (whole-file path, ``pure`` so every
tensor gets the ftype's K type, importance passed as llama-quantize passes an imatrix), and ggml's
``quantize_<type>`` through ctypes for block-level checks.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F

from llmforge.errors import LlmforgeError
from llmforge.quant.api import quantize_array
from llmforge.quant import kquants
from llmforge.quant.kquants import BLOCK_BYTES, K_TYPES, quantize_k
from llmforge.quant.kquants_torch import quantize_k_torch
from llmforge.quant.legacy_weighted import quantize_legacy_weighted
from quant_oracle import gguf_tensors, ggml_quantize, ggml_quantize_any, llama_quantize_file

COLS = 1024


def distributions(rows: int = 24, cols: int = COLS, seed: int = 0, huge: float = 3e4) -> dict[str, np.ndarray]:
    """Test inputs. ``huge``: llama-quantize rejects files whose fp16 super-block scales overflow, so the
    whole-file test stays below that (3e4); the block-level test also runs 1e15 (inf scales, same bytes)."""
    rng = np.random.default_rng(seed)
    normal = rng.standard_normal((rows, cols)).astype(np.float32)
    zero_const = normal.copy()
    zero_const[::3] = 0.0
    zero_const[1::3] = -0.75
    zero_const[2::3, :256] = 0.0                     # a zero super-block inside a normal row
    return {
        "normal": normal,
        "student_t2": rng.standard_t(2, (rows, cols)).astype(np.float32),
        "zero_and_constant_rows": zero_const,
        "huge": normal * np.float32(huge),
        "tiny_1e-30": normal * np.float32(1e-30),
        "f16_rounded": (normal * 0.02).astype(np.float16).astype(np.float32),
        "bf16_rounded": torch.from_numpy(normal * 0.02).to(torch.bfloat16).float().numpy(),
        "small_ints": rng.integers(-5, 6, (rows, cols)).astype(np.float32),
        "positive": np.abs(normal) + 0.5,
    }


def importance_for(cols: int = COLS, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    imp = (rng.random(cols) * 3).astype(np.float32) ** 2
    imp[::50] = 0.0
    return imp


# K type -> (llama_ftype whose default type it is, with pure=True every tensor gets that type)
FTYPE_OF = {T.Q2_K: F.MOSTLY_Q2_K, T.Q3_K: F.MOSTLY_Q3_K_M, T.Q4_K: F.MOSTLY_Q4_K_M,
            T.Q5_K: F.MOSTLY_Q5_K_M, T.Q6_K: F.MOSTLY_Q6_K}


@pytest.fixture(scope="module")
def random_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """An f32 GGUF with a minimal llama header holding one tensor per distribution."""
    path = tmp_path_factory.mktemp("kq") / "random-f32.gguf"
    tensors = {f"blk.{i}.ffn_up.weight": x for i, x in enumerate(distributions().values())}
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(len(tensors))
    w.add_context_length(64)
    w.add_embedding_length(COLS)
    w.add_feed_forward_length(COLS)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(int(F.ALL_F32))
    for name, x in tensors.items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, tensors


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_k_types_match_llama_model_quantize(random_gguf, tmp_path, qtype, weighted):
    src, tensors = random_gguf
    importance = {name: importance_for(seed=i) for i, name in enumerate(tensors)} if weighted else None
    dst = tmp_path / "ref.gguf"
    llama_quantize_file(src, dst, FTYPE_OF[qtype], importance, pure=True)
    ref = gguf_tensors(dst)
    labels = list(distributions())
    for i, (name, x) in enumerate(tensors.items()):
        assert ref[name][0] == int(qtype)
        got = quantize_k(x, qtype, None if importance is None else importance[name])
        expected = np.frombuffer(ref[name][1], dtype=np.uint8).reshape(got.shape)
        n = BLOCK_BYTES[qtype]
        bad = int((got.reshape(-1, n) != expected.reshape(-1, n)).any(axis=1).sum())
        assert bad == 0, f"{qtype.name} {labels[i]}: {bad} of {expected.size // n} super-blocks differ"


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_block_oracle_many_rows_and_torch_path(qtype, weighted, monkeypatch):
    """More blocks against ggml's quantize_<type>; the torch CPU path gives the same bytes."""
    x = np.concatenate(list(distributions(rows=16, seed=7, huge=1e15).values()))
    imp = importance_for(seed=3) if weighted else None
    expected = ggml_quantize(x, qtype, imp)
    monkeypatch.setattr(kquants, "CHUNK_BLOCKS", 64)   # small chunks: several worker-process tasks
    got = quantize_k(x, qtype, imp, threads=2)   # over worker processes: the split must not change bytes
    assert np.array_equal(got, expected)
    assert np.array_equal(quantize_k_torch(x[::4], qtype, imp, device="cpu"), expected[::4])


def test_3d_expert_tensor_uses_each_experts_importance():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 8, 512)).astype(np.float32)
    imp = rng.random((2, 512)).astype(np.float32)
    got = quantize_k(x, T.Q4_K, imp)
    for e in range(2):
        assert np.array_equal(got[e], ggml_quantize(x[e], T.Q4_K, imp[e]))


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1], ids=lambda t: t.name)
def test_legacy_types_with_importance_match_ggml(qtype):
    """imatrix mixtures also hit Q4_0..Q5_1 (fallbacks, q4_0/q5_0 ftypes): llama.cpp weights those too."""
    x = np.concatenate([d[:4, :320] for d in distributions(rows=4).values()])
    imp = importance_for(320)
    assert np.array_equal(quantize_legacy_weighted(x, qtype, imp), ggml_quantize_any(x, qtype, imp))
    assert np.array_equal(quantize_array(x, qtype), ggml_quantize_any(x, qtype))   # gguf-py, no weights


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_tensors_are_refused_by_name(bad):
    x = np.ones((4, 256), dtype=np.float32)
    x[2, 7] = bad
    with pytest.raises(LlmforgeError, match="blk.3.attn_q.weight"):
        quantize_array(x, T.Q4_K, name="blk.3.attn_q.weight")
