"""The whole-file GPU pipeline (llmforge.quant.gpu_pipeline) on the CPU: ``quantize_gguf(..., backend="cuda")``
run with the pipeline's device set to "cpu" writes llama.cpp's file, byte for byte.

In-process, the kernels are a numpy stand-in (the pipeline logic: row pieces, lanes over tensor boundaries,
f16/bf16 widening, importance indexing, pwrite at the planned offsets, raw copies, host-packed types, NaN
refusal). One child process runs the real Triton kernels under ``TRITON_INTERPRET=1`` (Triton reads it when
first imported): the Q8_0 kernel against gguf-py and ggml on edge inputs, whole q8_0 files from f32/f16/bf16
sources through the pipeline, and K-kernel pieces that start mid-tensor and cross experts.
The same pipeline on a GPU: tests/test_quant_pipeline_gpu.py.
"""

from __future__ import annotations

import os
import sys
import warnings
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from llmforge.errors import LlmforgeError
from llmforge.export import writer as writer_module
from llmforge.quant import gpu_pipeline, requantize
from llmforge.quant.requantize import quantize_gguf
from kernels_cases import report_cases, run_interpreted
from pipeline_cases import llama_cpp_file, llama_gguf, numpy_kernels, q8_edge_rows, source_models
from quant_oracle import nonfinite_gguf

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def cpu_pipeline(monkeypatch):
    """quantize_gguf's cuda branch on the CPU with the numpy stand-in, 3 lanes, pieces of ~2 rows."""
    monkeypatch.setattr(requantize, "resolve_backend", lambda backend: "cuda")
    monkeypatch.setattr(gpu_pipeline, "DEVICE", "cpu")
    monkeypatch.setattr(gpu_pipeline, "KERNELS", numpy_kernels)
    monkeypatch.setattr(gpu_pipeline, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(gpu_pipeline, "LANES", 3)
    monkeypatch.delenv("LLMFORGE_KQUANT_GPU", raising=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return source_models(tmp_path_factory.mktemp("pipeline"))


CASES = [("f32", "q4_k_m", False), ("f32", "q6_k", False), ("f32", "q8_0", False), ("f32", "q4_0", False),
         ("f16", "q4_k_m", False), ("bf16", "q8_0", False), ("bf16", "q3_k_m", False),
         ("f32", "q4_k_m", True), ("f32", "q4_0", True), ("f16", "q5_k_s", True),
         ("f32", "f16", False), ("bf16", "bf16", False)]     # F16 packed on the host; bf16 -> bf16 copied raw


@pytest.mark.parametrize("source,quant,imatrix", CASES, ids=[f"{s}-{q}{'-imatrix' * i}" for s, q, i in CASES])
def test_pipeline_writes_llama_cpp_file(cpu_pipeline, models, tmp_path, source, quant, imatrix):
    imx = models["imatrix"] if imatrix else None
    ours = tmp_path / "ours.gguf"
    report = quantize_gguf(models[source], ours, quant, imatrix=imx, progress=False)
    weighted = [n for n, s in models["f32-shapes"].items() if len(s) == 2 and n != "token_embd.weight"]
    assert report.imatrix_entries == (len(weighted) if imatrix else 0)
    assert ours.read_bytes() == llama_cpp_file(models[source], tmp_path / "ref.gguf", quant, imx)


@pytest.mark.parametrize("quant,advice", [("q8_0", None), ("q4_k_m", None), ("q4_k_m", 9999)])
def test_mapped_output_writes_the_same_file(cpu_pipeline, models, tmp_path, monkeypatch, quant, advice):
    """LLMFORGE_GPU_WRITE=mmap: lanes copy into the mapped output (pages populated first), same bytes; a
    kernel that refuses the advice (EINVAL, here an unknown one) falls back to pwrite."""
    monkeypatch.setattr(gpu_pipeline, "WRITE_MODE", "mmap")
    if advice is not None:
        monkeypatch.setattr(gpu_pipeline, "_MADV_POPULATE_WRITE", advice)
    ours = tmp_path / "ours.gguf"
    quantize_gguf(models["f16"], ours, quant, progress=False)
    assert ours.read_bytes() == llama_cpp_file(models["f16"], tmp_path / "ref.gguf", quant)  # while still mapped
    gpu_pipeline.wait_unmapped()


def test_the_read_back_runs_before_the_mapping_is_torn_down(cpu_pipeline, models, tmp_path, monkeypatch):
    """The file's read-back check maps it; an unmap running at the same time would hold the process's mapping
    lock, so the teardown starts only after the check (and after a failed one too)."""
    monkeypatch.setattr(gpu_pipeline, "WRITE_MODE", "mmap")
    seen = []
    verify = writer_module.verify_gguf

    def recording_verify(path, planned):
        seen.append((len(gpu_pipeline._PENDING), len([t for t in gpu_pipeline._UNMAPPING if t.is_alive()])))
        return verify(path, planned)

    monkeypatch.setattr(writer_module, "verify_gguf", recording_verify)
    gpu_pipeline.wait_unmapped()
    quantize_gguf(models["f16"], tmp_path / "ours.gguf", "q8_0", progress=False)
    assert seen == [(1, 0)] and not gpu_pipeline._PENDING   # pending during the check, started after it
    gpu_pipeline.wait_unmapped()


def test_an_output_that_cannot_be_mapped_is_written_with_pwrite(tmp_path, monkeypatch):
    fd = os.open(tmp_path / "out.bin", os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, 1 << 16)

        def refuse(*args, **kwargs):
            raise OSError(19, "No such device")

        monkeypatch.setattr(gpu_pipeline.mmap, "mmap", refuse)
        out = gpu_pipeline._Output(fd, "mmap")
        assert not out.mapped and out.mm is None
        out.write(np.full(100, 3, dtype=np.uint8), 500)
        out.close()
        assert os.pread(fd, 100, 500) == bytes([3]) * 100
    finally:
        os.close(fd)


def test_the_output_is_unmapped_in_the_background(tmp_path):
    """close() leaves the mapping to a thread that unmap_pending starts: the file is whole at once, and the
    mapping does get closed."""
    fd = os.open(tmp_path / "out.bin", os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, 1 << 20)
        out = gpu_pipeline._Output(fd, "mmap")
        mm = out.mm
        out.write(np.full(4096, 7, dtype=np.uint8), 8192)
        out.close(background=True)
        assert out.mm is None and os.pread(fd, 4096, 8192) == bytes([7]) * 4096
        assert not mm.closed and [m for m, _ in gpu_pipeline._PENDING] == [mm]
        gpu_pipeline.unmap_pending()
        gpu_pipeline.wait_unmapped()
        assert mm.closed and not gpu_pipeline._PENDING
        assert os.pread(fd, 4096, 8192) == bytes([7]) * 4096     # dropping the page-table entries kept the data
        failed = gpu_pipeline._Output(fd, "mmap")     # a failed write unmaps at once
        mm = failed.mm
        failed.close()
        assert mm.closed
    finally:
        os.close(fd)


@pytest.mark.parametrize("text", ["two", "-1", "1.5", "nan"])
def test_a_bad_tuning_variable_stops_with_one_line(monkeypatch, text):
    from llmforge.errors import LlmforgeError

    monkeypatch.setenv("LLMFORGE_GPU_POPULATE_AHEAD", text)
    with pytest.raises(LlmforgeError, match=r"LLMFORGE_GPU_POPULATE_AHEAD='.*' is not a whole number >= 0"):
        gpu_pipeline.env_number("LLMFORGE_GPU_POPULATE_AHEAD", "0")
    monkeypatch.setenv("LLMFORGE_GPU_CHUNK_MB", "1.5")
    assert gpu_pipeline.env_number("LLMFORGE_GPU_CHUNK_MB", "32", float) == 1.5
    monkeypatch.delenv("LLMFORGE_GPU_POPULATE_AHEAD")
    assert gpu_pipeline.env_number("LLMFORGE_GPU_POPULATE_AHEAD", "0") == 0


@pytest.mark.parametrize("huge", [False, True])
def test_huge_pages_are_asked_for_only_when_set_and_keep_the_bytes(tmp_path, monkeypatch, huge):
    monkeypatch.setattr(gpu_pipeline, "HUGEPAGES", huge)
    advice = []
    real = gpu_pipeline._LIBC.madvise

    class Libc:     # records each madvise's advice and passes the call on
        def madvise(self, addr, length, adv):
            advice.append(adv)
            return real(addr, length, adv)

    monkeypatch.setattr(gpu_pipeline, "_LIBC", Libc())
    data = np.random.default_rng(0).integers(0, 256, 5 << 20, dtype=np.uint8)
    fd = os.open(tmp_path / "out.bin", os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, data.nbytes)
        out = gpu_pipeline._Output(fd, "mmap")
        assert out.mapped
        out.write(data[: 3 << 20], 0)
        out.write(data[3 << 20:], 3 << 20)
        out.close()
        assert os.pread(fd, data.nbytes, 0) == data.tobytes()
    finally:
        os.close(fd)
    assert (gpu_pipeline._MADV_HUGEPAGE in advice) == huge
    assert advice.count(gpu_pipeline._MADV_POPULATE_WRITE) == 2


def test_populating_ahead_keeps_the_bytes_and_its_threads_end_with_the_output(tmp_path, monkeypatch):
    """Threads populate the mapping from the start while the lanes write; close() joins them before unmapping,
    also when it comes before they are done."""
    monkeypatch.setattr(gpu_pipeline, "POPULATE_AHEAD", 2)
    monkeypatch.setattr(gpu_pipeline, "POPULATE_AHEAD_STEP", 1 << 20)
    data = np.random.default_rng(1).integers(0, 256, 9 << 20, dtype=np.uint8)
    fd = os.open(tmp_path / "out.bin", os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, data.nbytes)
        out = gpu_pipeline._Output(fd, "mmap")
        assert len(out._populators) == 2
        for offset in range(0, data.nbytes, 3 << 20):
            out.write(data[offset:offset + (3 << 20)], offset)
        for thread in out._populators:      # they finish on their own once past the end
            thread.join(timeout=30)
        assert out._next_ahead >= data.nbytes
        out.close()
        assert os.pread(fd, data.nbytes, 0) == data.tobytes()
        early = gpu_pipeline._Output(fd, "mmap")    # closed at once: the threads are stopped and joined
        threads = list(early._populators)
        early.close()
        assert threads and not any(t.is_alive() for t in threads)
    finally:
        os.close(fd)


@pytest.mark.parametrize("mode,available", [("pwrite", True), ("mmap", True), ("pwrite", False)])
def test_preallocating_the_output_writes_the_same_file(cpu_pipeline, models, tmp_path, monkeypatch, mode, available):
    """The output's blocks are allocated by a thread in small steps while the lanes write (racing them on
    purpose); without fallocate the lanes just write. Same bytes as llama.cpp either way."""
    monkeypatch.setattr(gpu_pipeline, "WRITE_MODE", mode)
    monkeypatch.setattr(gpu_pipeline, "PREALLOCATE", True)
    monkeypatch.setattr(gpu_pipeline, "PREALLOCATE_STEP", 4096)
    if not available:
        monkeypatch.setattr(gpu_pipeline, "_FALLOCATE", None)
    ours = tmp_path / "ours.gguf"
    quantize_gguf(models["f16"], ours, "q8_0", progress=False)
    assert ours.read_bytes() == llama_cpp_file(models["f16"], tmp_path / "ref.gguf", "q8_0")


def test_populating_ahead_writes_the_same_file(cpu_pipeline, models, tmp_path, monkeypatch):
    """The whole pipeline with two populating threads racing the lanes (page-sized steps): llama.cpp's bytes."""
    monkeypatch.setattr(gpu_pipeline, "WRITE_MODE", "mmap")
    monkeypatch.setattr(gpu_pipeline, "POPULATE_AHEAD", 2)
    monkeypatch.setattr(gpu_pipeline, "POPULATE_AHEAD_STEP", 4096)
    ours = tmp_path / "ours.gguf"
    quantize_gguf(models["f16"], ours, "q8_0", progress=False)
    assert ours.read_bytes() == llama_cpp_file(models["f16"], tmp_path / "ref.gguf", "q8_0")


def test_fallocate_allocates_blocks_and_keeps_the_size(tmp_path):
    folder = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    fd, name = tempfile.mkstemp(dir=folder)
    try:
        os.ftruncate(fd, 1 << 20)
        assert os.fstat(fd).st_blocks * 512 < 1 << 20          # sparse
        assert gpu_pipeline.fallocate(fd, 0, 1 << 20)
        assert os.fstat(fd).st_size == 1 << 20 and os.fstat(fd).st_blocks * 512 >= 1 << 20
        assert os.pread(fd, 16, 12345) == bytes(16)
    finally:
        os.close(fd)
        os.unlink(name)


def test_pieces_cover_every_byte_once(models):
    """Row pieces tile each tensor's source and output ranges exactly, in file order."""
    from gguf import GGUFReader

    from llmforge.export.writer import StreamingGGUFWriter
    from gguf import GGMLQuantizationType as T

    reader = GGUFReader(models["f16"])
    w = StreamingGGUFWriter("llama")
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        w.plan(t.name, shape, T.Q8_0 if len(shape) == 2 else T(t.tensor_type), source=T(t.tensor_type))
    dst = {t.name: 1000 * i for i, t in enumerate(w.tensors)}
    src = {t.name: int(t.data_offset) for t in reader.tensors}
    pieces = gpu_pipeline.plan_pieces(w.tensors, src, dst, frozenset({T.Q8_0}), 3000)
    for i, t in enumerate(w.tensors):
        mine = [p for p in pieces if p.tensor == i]
        assert sum(p.src_bytes for p in mine) == int(reader.tensors[i].n_bytes)
        assert sum(p.dst_bytes for p in mine) == t.nbytes
        assert all(a.src + a.src_bytes == b.src and a.dst + a.dst_bytes == b.dst for a, b in zip(mine, mine[1:]))
        assert all(p.src_bytes <= 3000 or p.rows == 1 for p in mine)
        assert {p.kind for p in mine} == {"gpu" if len(t.shape) == 2 else "raw"}
    assert [p.tensor for p in pieces] == sorted(p.tensor for p in pieces)


def test_nan_is_one_error_and_no_output(cpu_pipeline, tmp_path):
    src = nonfinite_gguf(tmp_path / "nan.gguf", 40, {(33, 3): np.inf, (1, 7): np.nan})
    with pytest.raises(LlmforgeError, match=r"'blk.0.attn_k.weight' holds 2 NaN/Inf"):
        quantize_gguf(src, tmp_path / "out.gguf", "q4_k_m", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.gguf"]


def test_lane_failure_is_raised_and_leaves_no_output(cpu_pipeline, models, tmp_path, monkeypatch):
    types, run = numpy_kernels()

    def failing(qtype, x, *args):
        if x.shape[1] == 768:
            raise RuntimeError("kernel exploded")
        return run(qtype, x, *args)

    monkeypatch.setattr(gpu_pipeline, "KERNELS", lambda: (types, failing))
    with pytest.raises(RuntimeError, match="kernel exploded"):
        quantize_gguf(models["f32"], tmp_path / "out.gguf", "q6_k", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_eager_switch_keeps_the_tensor_by_tensor_path(monkeypatch):
    monkeypatch.setenv("LLMFORGE_KQUANT_GPU", "eager")
    assert not gpu_pipeline.pipelined()
    monkeypatch.delenv("LLMFORGE_KQUANT_GPU")
    assert gpu_pipeline.pipelined()


# ------------------------------------------------------------------------- Triton's interpreter, in a child

INTERP_CASES = ["q8_0-kernel", "legacy-kernels", "q8_0-f32", "q8_0-f16", "q8_0-bf16", "q5_1-bf16", "k-pieces"]


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton")
    root = tmp_path_factory.mktemp("interp")
    return run_interpreted(__file__, INTERP_CASES, args=(str(root),), timeout=600, path=(REPO, REPO / "tests"))


@pytest.mark.parametrize("case", INTERP_CASES)
def test_triton_kernels_through_the_pipeline(interpreted, case):
    assert interpreted[case] == "ok", interpreted[case]


def _child_case(case: str, root: Path) -> None:
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    from llmforge.quant.kquants import quantize_k
    from llmforge.quant.kquants_triton import quantize_q8_0_device
    from quant_oracle import ggml_quantize_any

    if case == "q8_0-kernel":
        x = q8_edge_rows()
        got = quantize_q8_0_device(torch.from_numpy(x)).numpy().reshape(x.shape[0], -1)
        for name, want in (("gguf-py", quants.quantize(x, T.Q8_0)), ("ggml", ggml_quantize_any(x, T.Q8_0))):
            bad = np.flatnonzero((got != want.reshape(got.shape)).any(axis=1))
            assert bad.size == 0, f"rows {bad.tolist()} differ from {name}"
    elif case == "legacy-kernels":     # ggml, not gguf-py: they differ on blocks of signed zeros (rows 7, 12)
        from llmforge.quant.kquants_triton import quantize_legacy_device

        x = np.concatenate([q8_edge_rows(), np.stack([
            np.where(np.arange(256) % 3 == 0, -1.0, 1.0) * (np.arange(256) % 4),      # |max| ties of both signs
            np.concatenate([[-0.0, 0.0] * 16, [0.0, -0.0] * 16, np.zeros(192)]),
            np.linspace(99.0, 101.0, 256)]).astype(np.float32)])
        for qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):
            got = quantize_legacy_device(torch.from_numpy(x), qtype).numpy().reshape(x.shape[0], -1)
            bad = np.flatnonzero((got != ggml_quantize_any(x, qtype)).any(axis=1))
            assert bad.size == 0, f"{qtype.name}: rows {bad.tolist()} differ from ggml"
    elif case in ("q8_0-f32", "q8_0-f16", "q8_0-bf16", "q5_1-bf16"):
        quant, source = case.split("-")
        src = root / f"{source}.gguf"
        if not src.exists():
            llama_gguf(src, source, n_layer=1)
        gpu_pipeline.DEVICE, gpu_pipeline.CHUNK_BYTES, gpu_pipeline.LANES = "cpu", 4096, 2
        requantize.resolve_backend = lambda backend: "cuda"
        quantize_gguf(src, root / f"ours-{case}.gguf", quant, progress=False)
        want = llama_cpp_file(src, root / f"ref-{case}.gguf", quant)
        assert (root / f"ours-{case}.gguf").read_bytes() == want
    else:   # a 3-expert Q6_K tensor with importance, in two pieces: the second starts mid-expert
        rng = np.random.default_rng(5)
        x = rng.standard_normal((3, 2, 512)).astype(np.float32)
        imp = (rng.random((3, 512)) * 2).astype(np.float32) ** 2
        _, kernel = gpu_pipeline.triton_kernels()
        rows, flat = x.reshape(6, 512), torch.from_numpy(imp.reshape(-1))
        got = np.concatenate([kernel(T.Q6_K, torch.from_numpy(rows[a:b]), flat, a * 2, 2, 4).numpy()
                              for a, b in ((0, 3), (3, 6))])
        want = quantize_k(x, T.Q6_K, imp, threads=1).reshape(-1)
        assert np.array_equal(got, want), f"{int((got != want).sum())} bytes differ"


def main(root: str, cases: list[str]) -> None:
    warnings.simplefilter("ignore")          # the interpreter warns on inf/NaN intermediates
    report_cases(cases, lambda case: _child_case(case, Path(root)))


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through pytest (the child needs TRITON_INTERPRET=1)"
    main(sys.argv[1], sys.argv[2:])


def test_ctrl_c_stops_the_lanes_before_the_files_close(cpu_pipeline, models, tmp_path, monkeypatch):
    """SIGINT while the lanes run: KeyboardInterrupt out of quantize_gguf only once every lane has stopped
    (they had kept reading and writing through closed descriptors), and no output or temp file is left."""
    import signal
    import threading
    import time

    types, run = numpy_kernels()
    calls = []

    def slow(qtype, x, *args):
        calls.append(1)
        if len(calls) == 3:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        time.sleep(0.05)
        return run(qtype, x, *args)

    monkeypatch.setattr(gpu_pipeline, "KERNELS", lambda: (types, slow))
    before = set(threading.enumerate())
    with pytest.raises(KeyboardInterrupt):
        quantize_gguf(models["f32"], tmp_path / "out.gguf", "q6_k", progress=False)
    assert not [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert list(tmp_path.iterdir()) == []
    assert len(calls) < 12   # the lanes stopped taking pieces
