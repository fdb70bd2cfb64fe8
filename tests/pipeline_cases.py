"""Shared by the whole-file pipeline tests (CPU and GPU): tiny llama GGUFs in f32/f16/bf16, the llama.cpp
oracle for a whole file, and a numpy stand-in for the pipeline's kernels."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from llmforge.quant.api import quantize_array, resolve_ftype
from llmforge.quant.imatrix import load_imatrix, write_imatrix
from quant_oracle import llama_quantize_file

SOURCES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16}


def llama_gguf(path: Path, source: str = "f32", n_layer: int = 2, n_embd: int = 512, n_ff: int = 768,
               rows: int = 6, vocab: int = 10, seed: int = 0) -> dict[str, tuple[int, ...]]:
    """A llama GGUF whose weights are ``source`` (norms f32), each weight a few rows; ffn_down rows are
    n_ff long (3 super-blocks), the others n_embd (2), so pieces of rows cross super-blocks and importance
    columns."""
    rng = np.random.default_rng(seed)
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (vocab, n_embd), "output_norm.weight": (n_embd,),
                                          "output.weight": (vocab, n_embd)}
    for i in range(n_layer):
        for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up"):
            shapes[f"blk.{i}.{t}.weight"] = (rows, n_embd)
        shapes[f"blk.{i}.ffn_down.weight"] = (rows, n_ff)
        shapes[f"blk.{i}.attn_norm.weight"] = (n_embd,)
        shapes[f"blk.{i}.ffn_norm.weight"] = (n_embd,)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(n_layer)
    w.add_context_length(64)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(8)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type({"f32": 0, "f16": 1, "bf16": 32}[source])
    for name, shape in shapes.items():
        x = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if len(shape) == 1 or source == "f32":
            w.add_tensor(name, x)
        elif source == "f16":
            w.add_tensor(name, x.astype(np.float16))
        else:   # bf16: round to nearest even, stored as the top 16 bits
            bits = x.view(np.uint32)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            w.add_tensor(name, bits, raw_dtype=T.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return shapes


def random_imatrix(path: Path, shapes: dict[str, tuple[int, ...]], seed: int = 3) -> Path:
    rng = np.random.default_rng(seed)
    importance = {n: (rng.random(s[-1]) * 2).astype(np.float32) ** 2
                  for n, s in shapes.items() if len(s) == 2 and "token_embd" not in n}
    return write_imatrix(path, importance)


def source_models(root: Path) -> dict:
    """f32/f16/bf16 copies of one tiny llama GGUF in ``root`` ("f32" -> path, "f32-shapes" -> shapes, ...) and
    an importance matrix for it ("imatrix")."""
    out: dict = {}
    for source in SOURCES:
        out[source] = root / f"{source}.gguf"
        out[source + "-shapes"] = llama_gguf(out[source], source)
    out["imatrix"] = random_imatrix(root / "imatrix.gguf", out["f32-shapes"])
    return out


def llama_cpp_file(src: Path, dst: Path, quant: str, imatrix: Path | None = None, nthread: int = 2) -> bytes:
    llama_quantize_file(src, dst, resolve_ftype(quant).file_type,
                        importance=load_imatrix(imatrix) if imatrix else None, nthread=nthread)
    return dst.read_bytes()


def numpy_kernels() -> tuple[frozenset[T], object]:
    """The pipeline's kernel contract met by the numpy packers (K-types, Q8_0, unweighted Q4_0..Q5_1), on CPU
    tensors."""
    from llmforge.quant.kquants import K_TYPES

    def run(qtype: T, x: torch.Tensor, imp: torch.Tensor | None, block0: int, bpr: int, bpe: int) -> torch.Tensor:
        a = np.nan_to_num(x.numpy(), posinf=0.0, neginf=0.0)   # a GPU kernel packs NaN too; the pipeline refuses
        if imp is None:
            out = quantize_array(a, qtype, threads=1)
        else:   # row r of the piece belongs to expert (block0 / bpr + r) // (rows per expert)
            per_expert = imp.numpy().reshape(-1, a.shape[1])
            row0, rows_per_expert = block0 // bpr, bpe // bpr
            out = np.concatenate([quantize_array(a[r:r + 1], qtype, per_expert[(row0 + r) // rows_per_expert],
                                                 threads=1) for r in range(a.shape[0])])
        return torch.from_numpy(np.ascontiguousarray(out).view(np.uint8).reshape(-1))

    return frozenset(K_TYPES) | {T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1}, run


def q8_edge_rows() -> np.ndarray:
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal(256), rng.standard_t(2, 256), np.zeros(256), np.full(256, -0.75),
            rng.standard_normal(256) * 1e15, rng.standard_normal(256) * 1e-30, rng.integers(-5, 6, 256),
            np.where(rng.random(256) < 0.5, -0.0, 0.0), rng.integers(-254, 255, 256) / 2.0,
            rng.standard_normal(256) * 1e-42, rng.standard_normal(256) * 3e6]
    x = np.stack([np.asarray(r, np.float32) for r in rows])
    x[8, ::32] = 127.0          # amax 127: x * id lands on .5 ties
    return x
