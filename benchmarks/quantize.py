"""Quantization speed: llmforge (numpy path, torch CPU path, and on CUDA the fused Triton kernels and the eager
torch path) vs llama.cpp.

Builds one f32 GGUF with a ~1B-parameter llama layout (TinyLlama-1.1B shapes, random weights; ``--layers``
makes it smaller), then quantizes it to q4_k_m, q6_k and q8_0 with each quantizer in the same run and prints
throughput (MB of f32 input per second) and the ratio llmforge / llama.cpp. llama.cpp runs through
llama-cpp-python's ``llama_model_quantize`` with ``nthread`` = the cores llmforge uses. Every llmforge
output is also compared with llama.cpp's, byte for byte.

    .venv/bin/python benchmarks/quantize.py                 # ~1.1B parameters (4.4 GB f32; slow on 2 cores)
    .venv/bin/python benchmarks/quantize.py --layers 2      # ~0.2B parameters
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import GGUFReader  # noqa: E402

from llmforge.export.writer import StreamingGGUFWriter  # noqa: E402
from llmforge.quant.api import resolve_ftype  # noqa: E402
from llmforge.quant.kquants import default_workers  # noqa: E402
from llmforge.quant.requantize import quantize_gguf  # noqa: E402

N_EMBD, N_FF, N_HEAD, N_KV, VOCAB = 2048, 5632, 32, 4, 32000   # TinyLlama-1.1B


def build_f32(path: Path, n_layer: int) -> int:
    w = StreamingGGUFWriter("llama")
    g = w.gguf
    g.add_block_count(n_layer)
    g.add_context_length(2048)
    g.add_embedding_length(N_EMBD)
    g.add_feed_forward_length(N_FF)
    g.add_head_count(N_HEAD)
    g.add_head_count_kv(N_KV)
    g.add_layer_norm_rms_eps(1e-5)
    g.add_file_type(0)
    kv = N_EMBD // N_HEAD * N_KV
    shapes = {"token_embd.weight": (VOCAB, N_EMBD), "output_norm.weight": (N_EMBD,), "output.weight": (VOCAB, N_EMBD)}
    for i in range(n_layer):
        shapes |= {f"blk.{i}.attn_q.weight": (N_EMBD, N_EMBD), f"blk.{i}.attn_k.weight": (kv, N_EMBD),
                   f"blk.{i}.attn_v.weight": (kv, N_EMBD), f"blk.{i}.attn_output.weight": (N_EMBD, N_EMBD),
                   f"blk.{i}.ffn_gate.weight": (N_FF, N_EMBD), f"blk.{i}.ffn_up.weight": (N_FF, N_EMBD),
                   f"blk.{i}.ffn_down.weight": (N_EMBD, N_FF), f"blk.{i}.attn_norm.weight": (N_EMBD,),
                   f"blk.{i}.ffn_norm.weight": (N_EMBD,)}
    for name, shape in shapes.items():
        w.plan(name, shape, T.F32)
    rng = np.random.default_rng(0)
    w.write(path, lambda t: (rng.standard_normal(t.shape, dtype=np.float32) * np.float32(0.02)), progress=False)
    return sum(int(np.prod(s)) for s in shapes.values())


def llama_cpp_quantize(src: Path, dst: Path, quant: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = int(resolve_ftype(quant).file_type)
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError("llama_model_quantize failed")


def same_tensors(a: Path, b: Path) -> bool:
    ra, rb = GGUFReader(a), GGUFReader(b)
    tb = {t.name: t for t in rb.tensors}
    return all(t.tensor_type == tb[t.name].tensor_type and np.array_equal(np.asarray(t.data), np.asarray(tb[t.name].data))
               for t in ra.tensors)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=22, help="22 = TinyLlama-1.1B")
    ap.add_argument("--quants", default="q4_k_m,q6_k,q8_0")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--backends", default="", help="only these: numpy, cpu, cuda (Triton), cuda-eager")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp folder)")
    args = ap.parse_args()
    threads = default_workers()
    import torch

    cuda = ["cuda", "cuda-eager"] if torch.cuda.is_available() else []
    backends = ["numpy"] + ([] if args.no_torch else ["cpu"] + cuda)
    if args.backends:
        backends = [b for b in args.backends.split(",") if b in backends]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        src = Path(tmp) / "model-f32.gguf"
        n = build_f32(src, args.layers)
        mb = src.stat().st_size / 1e6
        print(f"input: {n / 1e9:.2f}B parameters, {mb:.0f} MB f32; {threads} cores; torch threads "
              f"{torch.get_num_threads()}; {os.uname().machine}", flush=True)
        for quant in args.quants.split(","):
            ref = Path(tmp) / f"ref-{quant}.gguf"
            t0 = time.perf_counter()
            llama_cpp_quantize(src, ref, quant, threads)
            t_ref = time.perf_counter() - t0
            print(f"{quant:7} llama.cpp ({threads} threads) {mb / t_ref:8.1f} MB/s", flush=True)
            for backend in backends:
                if quant == "q8_0" and backend != "numpy":
                    continue        # q8_0 is gguf-py's numpy quantizer whatever the backend
                out = Path(tmp) / f"ours-{quant}-{backend}.gguf"
                if backend == "cuda-eager":
                    os.environ["LLMFORGE_KQUANT_GPU"] = "eager"    # A/B: TorchOps instead of the Triton kernels
                t0 = time.perf_counter()
                try:
                    quantize_gguf(src, out, quant, progress=False, backend=backend.removesuffix("-eager"))
                finally:
                    os.environ.pop("LLMFORGE_KQUANT_GPU", None)
                t = time.perf_counter() - t0
                label = {"numpy": "numpy", "cpu": "torch CPU", "cuda": "CUDA Triton", "cuda-eager": "CUDA eager"}[backend]
                print(f"{quant:7} llmforge {label:10} {mb / t:8.1f} MB/s   ratio {t_ref / t:5.2f}   "
                      f"identical to llama.cpp: {same_tensors(ref, out)}", flush=True)
                out.unlink()
            ref.unlink()


if __name__ == "__main__":
    main()
