"""Whole-file requantization on the worker pool (llmforge.quant.file_tasks): f16/bf16 sources, 3-D expert
tensors with per-expert importance, legacy fallback types and tensors split over many tasks give the file
``llama_model_quantize`` writes, byte for byte."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from llmforge.quant import file_tasks
from llmforge.quant.api import resolve_ftype
from llmforge.quant.imatrix import load_imatrix, write_imatrix
from llmforge.quant.requantize import quantize_gguf
from quant_oracle import gguf_tensors, llama_quantize_file

N_EXPERT = 2


def moe_gguf(path, rng) -> dict[str, tuple[int, ...]]:
    """A 2-layer llama-MoE header whose tensors come as f32, f16 and bf16, one with a row length that is no
    multiple of 256 (the mixtures' legacy fallbacks)."""
    w = gguf.GGUFWriter(path, "llama")
    for key, value in (("block_count", 2), ("context_length", 64), ("embedding_length", 256),
                       ("feed_forward_length", 288), ("attention.head_count", 4), ("attention.head_count_kv", 2),
                       ("expert_count", N_EXPERT), ("expert_used_count", 1)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    shapes: dict[str, tuple[int, ...]] = {}

    def add(name: str, shape: tuple[int, ...], dtype: T) -> None:
        x = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        if dtype == T.F16:
            w.add_tensor(name, x.astype(np.float16))
        elif dtype == T.BF16:
            bits = (x.view(np.uint32) >> 16).astype(np.uint16)
            w.add_tensor(name, bits, raw_shape=shape, raw_dtype=T.BF16)
        else:
            w.add_tensor(name, x)
        shapes[name] = shape

    add("token_embd.weight", (16, 256), T.F16)
    add("output_norm.weight", (256,), T.F32)
    add("output.weight", (16, 256), T.BF16)
    for i in range(2):
        src = (T.F32, T.BF16)[i]
        for t in ("attn_q", "attn_k", "attn_v", "attn_output"):
            add(f"blk.{i}.{t}.weight", (8, 256), src)
        add(f"blk.{i}.ffn_gate_inp.weight", (N_EXPERT, 256), T.F32)
        add(f"blk.{i}.ffn_gate_exps.weight", (N_EXPERT, 288, 256), src)
        add(f"blk.{i}.ffn_up_exps.weight", (N_EXPERT, 288, 256), T.F16)
        add(f"blk.{i}.ffn_down_exps.weight", (N_EXPERT, 256, 288), src)
        add(f"blk.{i}.attn_norm.weight", (256,), T.F32)
        add(f"blk.{i}.ffn_norm.weight", (256,), T.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return shapes


@pytest.mark.parametrize("quant, weighted", [("q4_k_m", True), ("q8_0", False), ("q4_0", True), ("q3_k_s", False)])
def test_pool_writes_llama_cpp_file(tmp_path, monkeypatch, quant, weighted):
    monkeypatch.setattr(file_tasks, "TASK_ELEMENTS", 3000)    # many tasks per tensor, none crossing an expert
    rng = np.random.default_rng(7)
    src = tmp_path / "moe.gguf"
    shapes = moe_gguf(src, rng)
    imatrix = None
    if weighted:
        entries = {n: (rng.random(s[0] * s[-1] if len(s) == 3 else s[-1]) * 2).astype(np.float32) ** 2
                   for n, s in shapes.items() if len(s) >= 2 and "token_embd" not in n}
        imatrix = write_imatrix(tmp_path / "imatrix.gguf",
                                {n: v.reshape(N_EXPERT, -1) if len(shapes[n]) == 3 else v for n, v in entries.items()})
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    llama_quantize_file(src, ref, resolve_ftype(quant).file_type,
                        importance=None if imatrix is None else load_imatrix(imatrix))
    quantize_gguf(src, ours, quant, imatrix=imatrix, progress=False, backend="numpy")
    a, b = gguf_tensors(ref), gguf_tensors(ours)
    assert {n: t for n, (t, _) in a.items()} == {n: t for n, (t, _) in b.items()}
    assert [n for n in a if a[n][1] != b[n][1]] == []
    assert ref.read_bytes() == ours.read_bytes()


def test_row_ranges_split_within_experts():
    assert file_tasks.row_ranges((2, 5, 256), 512) == [(0, 2, 0), (2, 4, 0), (4, 5, 0), (5, 7, 1), (7, 9, 1),
                                                       (9, 10, 1)]
    assert file_tasks.row_ranges((3, 4096), 1 << 20) == [(0, 3, 0)]
    assert file_tasks.row_ranges((1, 8192), 100) == [(0, 1, 0)]


def test_q8_0_matches_ggml_on_edge_inputs():
    """The Q8_0 packer (quantize_array's): exact halves (roundf's ties), zero blocks, tiny, subnormal, huge
    (fp16 scale overflow) and f16-rounded inputs, over slab boundaries, against ggml's quantize_q8_0."""
    from llmforge.quant import q8_0
    from quant_oracle import ggml_quantize_any

    rng = np.random.default_rng(11)
    halves = np.tile(np.arange(-127, 128, 8, dtype=np.float32), (16, 1))[:, :32] + np.float32(0.5)
    halves[:, 0] = 127                                            # amax 127: scale 1, x * id == x
    normal = rng.standard_normal((80, 1024)).astype(np.float32)
    subnormal = np.zeros((4, 256), np.float32)
    subnormal[0, :5] = np.float32(1e-39)
    subnormal[1, 7] = np.float32(-3e-45)
    subnormal[2] = normal[0, :256] * np.float32(1e-38)
    cases = [halves.reshape(-1, 256), -halves.reshape(-1, 256), np.zeros((3, 256), np.float32), normal,
             normal * np.float32(1e-30), normal * np.float32(1e37), subnormal,
             (normal * 0.02).astype(np.float16).astype(np.float32), np.round(normal * 20)]
    for x in cases:
        with np.errstate(all="ignore"):
            assert np.array_equal(q8_0.quantize_q8_0(x), ggml_quantize_any(x, T.Q8_0))
    assert q8_0.quantize_q8_0(normal[0]).shape == (1024 // 32 * 34,)
    assert normal.size // 32 > 2 * q8_0.SLAB_BLOCKS


def test_helpers_start_the_next_tensor_before_the_last_one_is_done(tmp_path, monkeypatch):
    """The pipeline over tensor boundaries: with 2 helpers and one task per tensor, every tensor's task runs
    while another tensor's does (the parent does not wait for a tensor before submitting the next)."""
    import json
    import os
    import time

    from llmforge.quant import kquants, requantize
    from quant_oracle import synthetic_gguf

    log = tmp_path / "tasks.jsonl"
    real = file_tasks.pack_rows

    def pack_rows(task, start, stop, expert):
        began = time.monotonic()
        n = real(task, start, stop, expert)
        time.sleep(0.05)         # every task outlasts the parent's submit of the next tensor
        with open(log, "a") as f:
            f.write(json.dumps([task.name, began, time.monotonic(), os.getpid()]) + "\n")
        return n

    pack_rows.__module__, pack_rows.__qualname__ = file_tasks.__name__, "pack_rows"   # pickled by name
    monkeypatch.setattr(file_tasks, "pack_rows", pack_rows)
    monkeypatch.setattr(requantize, "default_workers", lambda: 2)
    kquants.drop_worker_pool()           # the helpers are forked with the patched task
    src = tmp_path / "f32.gguf"
    synthetic_gguf(src, 2, 8, 2, False, 256, 256)
    try:
        quantize_gguf(src, tmp_path / "out.gguf", "q8_0", progress=False, backend="numpy")
    finally:
        kquants.drop_worker_pool()
    tasks = [json.loads(line) for line in log.read_text().splitlines()]
    order = [p.name for p in requantize.GGUFReader(tmp_path / "out.gguf").tensors if p.tensor_type == T.Q8_0]
    span = {name: (began, ended) for name, began, ended, _ in tasks}
    assert len(tasks) == len(order) > 4 and len({pid for *_, pid in tasks}) == 2
    # one tensor at a time (the parent waiting for a tensor before submitting the next) overlaps none
    overlapped = [a for a in order if any(b != a and span[b][0] < span[a][1] and span[a][0] < span[b][1]
                                          for b in order)]
    assert overlapped == order
