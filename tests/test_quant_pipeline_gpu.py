"""The whole-file GPU pipeline on CUDA (skipped without a GPU): ``quantize_gguf(..., backend="cuda")`` writes
llama.cpp's file byte for byte, from f32/f16/bf16 sources, with and without importance, in small pieces over
several lanes and at the default settings; the Q8_0 kernel gives ggml's bytes on edge inputs; NaN is refused.
The CPU side of the same checks: tests/test_quant_pipeline.py. Times go to ``$OUT/quant_pipeline_gpu.txt``
when ``OUT`` is set."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

from gguf import GGMLQuantizationType as T  # noqa: E402

from llmforge.errors import LlmforgeError  # noqa: E402
from llmforge.quant import gpu_pipeline  # noqa: E402
from llmforge.quant.requantize import quantize_gguf  # noqa: E402
from pipeline_cases import llama_cpp_file, llama_gguf, q8_edge_rows, source_models  # noqa: E402
from quant_oracle import ggml_quantize_any, nonfinite_gguf  # noqa: E402


def note(line: str) -> None:
    print(line)
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "quant_pipeline_gpu.txt", "a") as f:
            f.write(line + "\n")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return source_models(tmp_path_factory.mktemp("pipeline-gpu"))


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1], ids=lambda q: q.name)
def test_block32_kernels_give_ggml_bytes(qtype):
    from llmforge.quant.kquants_triton import quantize_legacy_device, quantize_q8_0_device

    rng = np.random.default_rng(1)
    x = np.concatenate([q8_edge_rows(), rng.standard_normal((64, 256)).astype(np.float32),
                        rng.standard_t(2, (64, 256)).astype(np.float32),
                        np.concatenate([[-0.0, 0.0] * 16, np.zeros(224)]).astype(np.float32)[None]])
    dev = torch.from_numpy(x).cuda()
    got = quantize_q8_0_device(dev) if qtype == T.Q8_0 else quantize_legacy_device(dev, qtype)
    got = got.cpu().numpy().reshape(x.shape[0], -1)
    bad = np.flatnonzero((got != ggml_quantize_any(x, qtype)).any(axis=1))
    assert bad.size == 0, f"rows {bad.tolist()} differ"


# each K type and weighting is a Triton compile on a fresh machine: few cases here, the rest on the CPU
CASES = [("f32", "q4_k_m", False), ("f32", "q8_0", False), ("f32", "q4_0", False), ("f16", "q4_k_m", False),
         ("bf16", "q8_0", False), ("f16", "q5_1", False), ("f32", "q4_k_m", True), ("f32", "q4_0", True)]

SMALL_PIECES = {("f32", "q4_k_m"), ("bf16", "q8_0")}


@pytest.mark.parametrize("source,quant,imatrix", CASES, ids=[f"{s}-{q}{'-imatrix' * i}" for s, q, i in CASES])
def test_pipeline_writes_llama_cpp_file(models, tmp_path, monkeypatch, source, quant, imatrix):
    """Whole tensors per piece over 4 lanes; for two cases also pieces of 1-2 rows, many of a tensor in flight."""
    monkeypatch.setattr(gpu_pipeline, "LANES", 4)
    imx = models["imatrix"] if imatrix else None
    want = llama_cpp_file(models[source], tmp_path / "ref.gguf", quant, imx)
    for chunk in (1 << 20, 4096) if (source, quant) in SMALL_PIECES else (1 << 20,):
        monkeypatch.setattr(gpu_pipeline, "CHUNK_BYTES", chunk)
        ours = tmp_path / "ours.gguf"
        quantize_gguf(models[source], ours, quant, imatrix=imx, progress=False, backend="cuda")
        assert ours.read_bytes() == want, f"pieces of {chunk} bytes"


@pytest.mark.parametrize("quant", ["q4_k_m", "q8_0"])
def test_default_settings_on_a_wider_model(tmp_path_factory, tmp_path, quant):
    """TinyLlama's row lengths (2048, 5632), 2 layers of 1,024-row weights, a 16,384-row vocabulary (~0.3 GB
    f32): default lanes and chunks, against llama.cpp on every core."""
    root = tmp_path_factory.getbasetemp() / "wide"
    src = root / "wide-f32.gguf"
    if not src.exists():
        root.mkdir(exist_ok=True)
        llama_gguf(src, "f32", n_layer=2, n_embd=2048, n_ff=5632, rows=1024, vocab=16384)
    ours = tmp_path / "ours.gguf"
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        quantize_gguf(src, ours, quant, progress=False, backend="cuda")
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    want = llama_cpp_file(src, tmp_path / "ref.gguf", quant, nthread=os.cpu_count() or 2)
    t_ref = time.perf_counter() - t0
    mb = src.stat().st_size / 1e6
    note(f"wide model {mb:.0f} MB f32 {quant}: pipeline cold {mb / times[0]:.0f} MB/s, warm {mb / times[1]:.0f} MB/s "
         f"({gpu_pipeline.default_lanes()} lanes, {gpu_pipeline.CHUNK_BYTES >> 20} MiB pieces); "
         f"llama.cpp {os.cpu_count()} threads {mb / t_ref:.0f} MB/s")
    assert ours.read_bytes() == want


def test_nan_is_refused_by_name(tmp_path):
    src = nonfinite_gguf(tmp_path / "nan.gguf", 64, {(40, 3): np.nan})
    for quant in ("q4_k_m", "q8_0"):
        with pytest.raises(LlmforgeError, match=r"'blk.0.attn_k.weight' holds 1 NaN/Inf"):
            quantize_gguf(src, tmp_path / "out.gguf", quant, progress=False, backend="cuda")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.gguf"]


def test_ctrl_c_stops_the_lanes_and_the_next_file_is_whole(models, tmp_path, monkeypatch):
    """SIGINT on the kernel's third piece: KeyboardInterrupt once every lane has stopped, nothing left in the
    output folder; the kept lanes then write the next file byte for byte."""
    import signal
    import threading

    types, kernel = gpu_pipeline.KERNELS()
    calls = []

    def interrupting(*args):
        calls.append(1)
        if len(calls) == 3:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        return kernel(*args)

    monkeypatch.setattr(gpu_pipeline, "LANES", 4)
    monkeypatch.setattr(gpu_pipeline, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(gpu_pipeline, "KERNELS", lambda: (types, interrupting))
    out = tmp_path / "out"
    out.mkdir()
    before = set(threading.enumerate())
    with pytest.raises(KeyboardInterrupt):
        quantize_gguf(models["f32"], out / "x.gguf", "q4_k_m", progress=False, backend="cuda")
    assert not [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert list(out.iterdir()) == []
    monkeypatch.setattr(gpu_pipeline, "KERNELS", lambda: (types, kernel))
    quantize_gguf(models["f32"], out / "x.gguf", "q4_k_m", progress=False, backend="cuda")
    assert (out / "x.gguf").read_bytes() == llama_cpp_file(models["f32"], tmp_path / "ref.gguf", "q4_k_m")
