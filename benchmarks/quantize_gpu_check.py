"""One-shot GPU check of llmforge's K-quant GPU paths: bytes vs the numpy path (and llama.cpp), then speed.

Two GPU paths: ``eager`` (torch ops through TorchOps) and ``triton`` (the fused kernels of
``llmforge.quant.kquants_triton``, what ``quantize_k_torch`` runs on CUDA by default).

Run on a CUDA machine from the repository root:

    python benchmarks/quantize_gpu_check.py            # both paths, full check + throughput
    python benchmarks/quantize_gpu_check.py --quick    # smaller inputs
    python benchmarks/quantize_gpu_check.py --paths triton --oracle llama   # Triton only, bytes vs llama.cpp

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


def eager(x, qtype, imp, dev, **kw):
    os.environ["LLMFORGE_KQUANT_GPU"] = "eager"
    try:
        return quantize_k_torch(x, qtype, imp, device=dev, **kw)
    finally:
        os.environ.pop("LLMFORGE_KQUANT_GPU", None)


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
    ap.add_argument("--paths", default="eager,triton", help="GPU paths to check: eager, triton or both")
    ap.add_argument("--oracle", default="both", choices=["both", "numpy", "llama"],
                    help="reference bytes: the numpy path, llama.cpp (if installed) or both")
    ap.add_argument("--blocks", default="", help="Triton BLOCK sizes to sweep in the throughput part, e.g. 32,64,128")
    ap.add_argument("--chunks", default="", help="host chunk sizes (super-blocks) to sweep for the h2d path, e.g. 8192,32768")
    ap.add_argument("--imatrix-speed", action="store_true", help="also time the imatrix variants")
    ap.add_argument("--types", default="", help="restrict to these K types, e.g. Q4_K,Q6_K")
    ap.add_argument("--dists", default="", help="restrict to these input distributions, e.g. normal,mixed_edge")
    ap.add_argument("--tiny", action="store_true", help="a few super-blocks only (smoke test, e.g. TRITON_INTERPRET=1)")
    args = ap.parse_args()
    dev = args.device
    paths = [p for p in args.paths.split(",") if p]
    if dev == "cuda" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        print("no CUDA device: this script checks the GPU path")
        return 2
    name = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
    import triton
    print(f"device: {name}, torch {torch.__version__}, triton {triton.__version__}, CPU cores {os.cpu_count()}")
    lib = ggml_lib()
    print("llama.cpp oracle:", "libggml-base via llama-cpp-python" if lib else "not installed (numpy path only)")
    use_numpy = args.oracle in ("both", "numpy") or lib is None
    use_llama = args.oracle in ("both", "llama") and lib is not None
    rows, cols = (2, 512) if args.tiny else (64, 4096) if args.quick else (256, 8192)
    types = [T[t] for t in args.types.split(",")] if args.types else list(K_TYPES)
    data = distributions(rows, cols)
    if args.dists:
        data = {k: v for k, v in data.items() if k in args.dists.split(",")}
    rng = np.random.default_rng(1)
    importance = (rng.random(cols).astype(np.float32) * 4) ** 2
    importance[::97] = 0.0

    from llmforge.quant.kquants_triton import quantize_blocks_triton, quantize_k_device, quantize_k_triton

    runners = {"eager": lambda x, q, imp: eager(x, q, imp, dev),
               "triton": lambda x, q, imp: quantize_k_triton(x, q, imp, device=dev)}
    failures = 0
    print(f"\nbit-exactness, {rows}x{cols} per distribution ({rows * cols // 256} super-blocks);"
          f" differing super-blocks per path vs each reference:")
    head = f"{'type':6} {'weights':8} {'distribution':14}"
    for p in paths:
        head += (f" {p + '!=numpy':>13}" if use_numpy else "") + (f" {p + '!=llama':>13}" if use_llama else "")
    if use_numpy and use_llama:
        head += f" {'numpy!=llama':>13}"
    print(head + "  seconds(path)")
    for qtype in types:
        for imp in (None, importance):
            for dname, x in data.items():
                refs = {}
                if use_numpy:
                    refs["numpy"] = quantize_k(x, qtype, imp)
                if use_llama:
                    refs["llama"] = ggml_quantize(lib, x, qtype, imp, os.cpu_count() or 1)
                line = f"{qtype.name:6} {'imatrix' if imp is not None else 'none':8} {dname:14}"
                secs = []
                for p in paths:
                    t0 = time.perf_counter()
                    got = runners[p](x, qtype, imp)
                    secs.append(f"{p} {time.perf_counter() - t0:.2f}")
                    for r in refs.values():
                        bad = bad_blocks(got, r, qtype)
                        failures += bad
                        line += f" {bad:>13}"
                if use_numpy and use_llama:
                    bad = bad_blocks(refs["numpy"], refs["llama"], qtype)
                    failures += bad
                    line += f" {bad:>13}"
                print(line + "  " + ", ".join(secs), flush=True)

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    def timed(fn, reps: int = 3) -> tuple[float, object]:
        best, out = float("inf"), None
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            out = fn()
            sync()
            best = min(best, time.perf_counter() - t0)
        return best, out

    print("\nthroughput (MB of f32 input per second, best of 3; 'dev' = input already on the GPU, bytes left there;"
          " 'h2d' = numpy in, numpy out, copies included):")
    n_rows = 2 if args.tiny else 1024 if dev == "cpu" else 4096 if args.quick else 16384
    big = np.random.default_rng(2).standard_normal((n_rows, 4096)).astype(np.float32)
    big_dev = torch.from_numpy(big).to(dev)
    mb = big.nbytes / 1e6
    threads = os.cpu_count() or 1
    speed_imps = [None] + ([importance[:4096]] if args.imatrix_speed else [])
    for qtype in [t for t in (T.Q4_K, T.Q6_K, T.Q2_K, T.Q3_K, T.Q5_K) if t in types]:
        for imp in speed_imps:
            tag = f"{qtype.name}{'+imatrix' if imp is not None else ''}"
            line = f"{tag:13}"
            t_c = None
            ref = None
            if lib is not None:
                t_c, ref = timed(lambda: ggml_quantize(lib, big, qtype, imp, threads), reps=1)
                line += f" llama.cpp {threads} thr {mb / t_c:8.1f}"
            if "triton" in paths:
                quantize_k_device(big_dev[:64], qtype, imp)          # compile
                t_dev, out_dev = timed(lambda: quantize_k_device(big_dev, qtype, imp))
                t_h2d, out_h = timed(lambda: quantize_k_triton(big, qtype, imp, device=dev))
                line += f" | triton dev {mb / t_dev:8.1f} h2d {mb / t_h2d:8.1f}"
                if t_c is not None:
                    line += f" | x llama.cpp: dev {t_c / t_dev:6.2f} h2d {t_c / t_h2d:6.2f}"
                if ref is not None:
                    bad = bad_blocks(out_dev.cpu().numpy(), ref, qtype) + bad_blocks(out_h, ref, qtype)
                    failures += bad
                    line += f" | differing {bad}"
            if "eager" in paths and imp is None:
                t_e, out_e = timed(lambda: eager(big, qtype, imp, dev), reps=1)
                line += f" | eager h2d {mb / t_e:8.1f}" + (f" ({t_c / t_e:5.2f}x)" if t_c else "")
                if ref is not None:
                    bad = bad_blocks(out_e, ref, qtype)
                    failures += bad
                    line += f" differing {bad}"
            print(line, flush=True)
    if args.blocks and "triton" in paths:
        print("\nTriton BLOCK sweep (dev, MB/s):")
        blocks = big_dev.reshape(-1, 256)
        for qtype in [t for t in (T.Q4_K, T.Q6_K, T.Q2_K, T.Q3_K, T.Q5_K) if t in types]:
            line = f"{qtype.name:6}"
            for b in (int(v) for v in args.blocks.split(",")):
                quantize_blocks_triton(qtype, blocks[:64], block=b)
                t, _ = timed(lambda: quantize_blocks_triton(qtype, blocks, block=b))
                line += f"  BLOCK {b}: {mb / t:8.1f}"
            print(line, flush=True)
    if args.chunks and "triton" in paths:
        print("\nh2d chunk sweep (numpy in, numpy out, MB/s):")
        for qtype in [t for t in (T.Q4_K, T.Q3_K, T.Q6_K) if t in types]:
            line = f"{qtype.name:6}"
            for c in (int(v) for v in args.chunks.split(",")):
                t, got = timed(lambda: quantize_k_triton(big, qtype, device=dev, chunk_blocks=c))
                line += f"  chunk {c}: {mb / t:8.1f}"
            print(line, flush=True)
    print("RESULT:", "all bytes identical" if failures == 0 else f"{failures} differing blocks")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
