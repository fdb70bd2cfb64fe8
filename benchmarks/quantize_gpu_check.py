"""One-shot GPU check of llmforge's torch K-quant path: bytes vs the numpy path (and llama.cpp), then speed.

Run on a CUDA machine from the repository root:

    python benchmarks/quantize_gpu_check.py            # full check + throughput (a few minutes on an H100)
    python benchmarks/quantize_gpu_check.py --quick    # smaller inputs

Needs numpy, torch (CUDA), gguf; llama-cpp-python is optional (then llama.cpp's C quantizers are
also compared and timed on all CPU cores through ctypes, which releases the GIL, one thread per core).
Prints a table; exit status 1 if any block differs.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gguf import GGMLQuantizationType as T  # noqa: E402

from llmforge.quant.kquants import BLOCK_BYTES, K_TYPES, quantize_k  # noqa: E402
from llmforge.quant.kquants_torch import quantize_k_torch  # noqa: E402


def distributions(rows: int, cols: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    normal = rng.standard_normal((rows, cols)).astype(np.float32)
    mixed = normal.copy()
    mixed[::7] = 0.0                                   # all-zero rows
    mixed[1::7] = 0.25                                 # constant rows
    mixed[2::7, :128] = 0.0                            # half-zero super-blocks
    mixed[3::7] *= 1e15                                # huge (x*x stays finite)
    mixed[4::7] *= 1e-30                               # tiny
    return {
        "normal": normal,
        "student_t3": rng.standard_t(3, (rows, cols)).astype(np.float32) * 0.02,
        "positive": np.abs(normal) + 0.1,
        "f16_rounded": (normal * 0.05).astype(np.float16).astype(np.float32),
        "bf16_rounded": torch.from_numpy(normal * 0.03).to(torch.bfloat16).float().numpy(),
        "small_ints": rng.integers(-4, 5, (rows, cols)).astype(np.float32),
        "mixed_edge": mixed,
    }


def ggml_lib():
    try:
        import llama_cpp
    except ImportError:
        return None
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    fp = ctypes.POINTER(ctypes.c_float)
    for name in ("q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q8_0"):
        fn = getattr(lib, f"quantize_{name}")
        fn.restype = ctypes.c_size_t
        fn.argtypes = [fp, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, fp]
    return lib


def ggml_quantize(lib, data: np.ndarray, qtype: T, importance: np.ndarray | None, threads: int) -> np.ndarray:
    """llama.cpp's quantize_<type> over row chunks on ``threads`` threads (ctypes drops the GIL)."""
    from gguf.constants import GGML_QUANT_SIZES

    rows, cols = data.shape
    block, size = GGML_QUANT_SIZES[qtype]
    out = np.zeros((rows, cols // block * size), dtype=np.uint8)
    fn = getattr(lib, f"quantize_{qtype.name.lower().replace('_k', '_K')}")
    fp = ctypes.POINTER(ctypes.c_float)
    qw = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32).ctypes.data_as(fp)
    step = max(1, -(-rows // (threads * 4)))

    def work(r0: int) -> None:
        r1 = min(rows, r0 + step)
        fn(data[r0:r1].ctypes.data_as(fp), out[r0:r1].ctypes.data, r1 - r0, cols, qw)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(0, rows, step)))
    return out


def bad_blocks(a: np.ndarray, b: np.ndarray, qtype: T) -> int:
    n = BLOCK_BYTES[qtype]
    return int((a.reshape(-1, n) != b.reshape(-1, n)).any(axis=1).sum())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu, to try the script without a GPU")
    args = ap.parse_args()
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this script checks the GPU path")
        return 2
    name = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, CPU cores {os.cpu_count()}")
    lib = ggml_lib()
    print("llama.cpp oracle:", "libggml-base via llama-cpp-python" if lib else "not installed (numpy path only)")
    rows, cols = (64, 4096) if args.quick else (256, 8192)
    data = distributions(rows, cols)
    rng = np.random.default_rng(1)
    importance = (rng.random(cols).astype(np.float32) * 4) ** 2
    importance[::97] = 0.0

    failures = 0
    print(f"\nbit-exactness, {rows}x{cols} per distribution ({rows * cols // 256} super-blocks):")
    print(f"{'type':6} {'weights':8} {'distribution':14} {'cuda!=numpy':>12} {'numpy!=llama.cpp':>17}"
          f" {'cumsum-mode!=numpy':>19}")
    cumsum_bad = 0
    for qtype in K_TYPES:
        for imp in (None, importance):
            for name, x in data.items():
                got = quantize_k_torch(x, qtype, imp, device=dev)
                ref = quantize_k(x, qtype, imp)
                diff = bad_blocks(got, ref, qtype)
                cdiff = bad_blocks(quantize_k_torch(x, qtype, imp, device=dev, cumsum=True), ref, qtype)
                cumsum_bad += cdiff
                c_diff = "-" if lib is None else str(bad_blocks(ggml_quantize(lib, x, qtype, imp, 4), ref, qtype))
                failures += diff + (0 if c_diff == "-" else int(c_diff))
                print(f"{qtype.name:6} {'imatrix' if imp is not None else 'none':8} {name:14} {diff:>12} {c_diff:>17}"
                      f" {cdiff:>19}")

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    print("\nthroughput (MB of f32 input per second; same run):")
    n_rows = 1024 if dev == "cpu" else 4096 if args.quick else 16384
    big = np.random.default_rng(2).standard_normal((n_rows, 4096)).astype(np.float32)
    mb = big.nbytes / 1e6
    threads = os.cpu_count() or 1
    for qtype in (T.Q4_K, T.Q6_K, T.Q2_K, T.Q3_K, T.Q5_K):
        quantize_k_torch(big[:512], qtype, device=dev)          # warm-up
        sync()
        t0 = time.perf_counter()
        gpu = quantize_k_torch(big, qtype, device=dev)
        sync()
        t_gpu = time.perf_counter() - t0
        t0 = time.perf_counter()
        quantize_k_torch(big, qtype, device=dev, cumsum=True)
        sync()
        t_cum = time.perf_counter() - t0
        line = f"{qtype.name}: llmforge CUDA {mb / t_gpu:8.1f} MB/s (cumsum mode {mb / t_cum:8.1f})"
        if lib is not None:
            t0 = time.perf_counter()
            ref = ggml_quantize(lib, big, qtype, None, threads)
            t_c = time.perf_counter() - t0
            same = bad_blocks(gpu, ref, qtype)
            failures += same
            line += (f" | llama.cpp {threads} threads {mb / t_c:8.1f} MB/s | ratio {t_c / t_gpu:5.2f}x"
                     f" | differing blocks {same}")
        print(line, flush=True)
    print(f"\ncumsum mode (not the default): {cumsum_bad} differing blocks")
    print("RESULT:", "all bytes identical" if failures == 0 else f"{failures} differing blocks")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
