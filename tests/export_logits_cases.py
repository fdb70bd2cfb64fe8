"""Shared body of the per-architecture GGUF-vs-transformers tests (split over two files for xdist)."""

from __future__ import annotations

import pytest

from oracles import hf_greedy, hf_logits, llama_cpp_logits, llama_cpp_logits_and_greedy, rel_error, sample_ids

QUANTS = ("f32", "f16", "bf16", "q8_0")
# issue #2's tolerances: max|llama.cpp - transformers| / max|transformers|
TOLERANCE = {"f32": 1e-4, "f16": 2e-2, "bf16": 2e-2, "q8_0": 5e-2}
GEMMA_F32 = 1e-3  # llama.cpp's own Gemma 2/3 runtime differs by ~3e-4 from transformers
N_GREEDY = 16


def tolerance(arch: str, quant: str) -> float:
    return GEMMA_F32 if quant == "f32" and arch.startswith("gemma") else TOLERANCE[quant]


class Reference:
    """transformers' logits and greedy continuation for one tiny model, computed once."""

    def __init__(self, model_dir):
        self.model_dir = model_dir
        self.ids = sample_ids(model_dir)
        self.logits = hf_logits(model_dir, self.ids)
        self._greedy = None

    @property
    def greedy(self) -> list[int]:
        if self._greedy is None:
            self._greedy = hf_greedy(self.model_dir, self.ids, N_GREEDY)
        return self._greedy


def check_conversion(arch: str, quant: str, ref: Reference, tmp_path) -> None:
    from llmforge.export.convert import convert_model

    out = tmp_path / f"{arch}-{quant}.gguf"
    report = convert_model(ref.model_dir, out, quant, progress=False)
    assert report.path == out and out.is_file()
    assert any("read back" in c for c in report.checks)
    if quant == "f32":
        got, greedy = llama_cpp_logits_and_greedy(out, ref.ids, N_GREEDY)
        assert greedy == ref.greedy
    else:
        got = llama_cpp_logits(out, ref.ids)
    assert got.shape == ref.logits.shape
    err = rel_error(got, ref.logits)
    assert err < tolerance(arch, quant), f"{arch} {quant}: relative logit error {err:.2e}"
    out.unlink()


def make_reference_fixture(archs):
    @pytest.fixture(scope="module", params=archs)
    def reference(request, tiny_model_dir):
        return request.param, Reference(tiny_model_dir(request.param))

    return reference
