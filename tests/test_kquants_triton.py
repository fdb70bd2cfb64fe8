"""The fused Triton K-quant kernels give the numpy path's bytes (itself checked against llama.cpp), for every
K type with and without importance, run by Triton's CPU interpreter on a few super-blocks per input kind.

The interpreter computes with numpy float32, so it checks the algorithm and the byte layout, not FMA
contraction or GPU division/sqrt (benchmarks/quantize_gpu_check.py does that on a GPU). Triton reads
``TRITON_INTERPRET`` when first imported and collection imports it here already, so the kernels run in
one child process: ``python tests/test_kquants_triton.py`` prints one JSON line ``{case: "ok" | error}``.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from kernels_cases import report_cases, run_interpreted

TYPES = ["Q4_K", "Q6_K", "Q5_K", "Q2_K", "Q3_K"]
CASES = [f"{t}-{w}" for t in TYPES for w in ("plain", "imatrix")]
COLS = 512


def inputs(seed: int = 0) -> np.ndarray:
    """Rows of 2 super-blocks, one input kind per row (llama.cpp's edge cases included)."""
    rng = np.random.default_rng(seed)
    rows = {
        "normal": rng.standard_normal(COLS),
        "heavy_tailed": rng.standard_t(2, COLS),
        "all_zero": np.zeros(COLS),
        "constant": np.full(COLS, -0.75),
        "huge": rng.standard_normal(COLS) * 1e15,
        "tiny": rng.standard_normal(COLS) * 1e-30,
        "small_ints": rng.integers(-5, 6, COLS),
        "signed_zeros": np.where(rng.random(COLS) < 0.5, -0.0, 0.0),
    }
    x = np.stack([np.asarray(v, dtype=np.float32) for v in rows.values()])
    x[6, 256:] = np.abs(x[6, 256:])                 # small positive ints: ties of the first max
    x[7, 300:310] = np.float32(0.5)                 # signed zeros around a few equal values
    return x


def importance(seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    imp = (rng.random(COLS) * 3).astype(np.float32) ** 2
    imp[::50] = 0.0
    return imp


@pytest.fixture(scope="module")
def results() -> dict[str, str]:
    pytest.importorskip("triton")
    return run_interpreted(__file__, CASES, timeout=1800)


@pytest.mark.parametrize("case", CASES)
def test_triton_kernel_bytes_equal_numpy_path(results, case):
    assert results[case] == "ok", results[case]


def test_gpu_path_choice(monkeypatch):
    """CUDA takes the Triton kernels unless LLMFORGE_KQUANT_GPU=eager; CPU tensors stay on the eager path."""
    pytest.importorskip("triton")
    import torch

    from llmforge.quant.kquants_torch import gpu_kernel_path

    monkeypatch.delenv("LLMFORGE_KQUANT_GPU", raising=False)
    assert gpu_kernel_path(torch.device("cuda")) == "triton"
    assert gpu_kernel_path(torch.device("cpu")) == "eager"
    monkeypatch.setenv("LLMFORGE_KQUANT_GPU", "eager")
    assert gpu_kernel_path(torch.device("cuda")) == "eager"


# ------------------------------------------------------------------------------------ child side
def _run_case(case: str) -> None:
    from gguf import GGMLQuantizationType as T

    from llmforge.quant.kquants import BLOCK_BYTES, quantize_k
    from llmforge.quant.kquants_triton import quantize_k_triton

    name, mode = case.split("-")
    qtype = T[name]
    x = inputs()
    imp = importance() if mode == "imatrix" else None
    got = quantize_k_triton(x, qtype, imp, device="cpu")
    want = quantize_k(x, qtype, imp, threads=1)
    n = BLOCK_BYTES[qtype]
    bad = np.flatnonzero((got.reshape(-1, n) != want.reshape(-1, n)).any(axis=1))
    assert bad.size == 0, f"super-blocks {bad.tolist()} differ (rows {sorted(set((bad // 2).tolist()))})"


def main(cases: list[str]) -> None:
    import warnings

    warnings.simplefilter("ignore")          # the interpreter warns on the C code's inf/NaN intermediates
    report_cases(cases, _run_case)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through pytest (the child needs TRITON_INTERPRET=1)"
    main(sys.argv[1:])
