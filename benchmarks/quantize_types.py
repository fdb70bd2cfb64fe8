"""K-quant micro-benchmark: llama.cpp's C ``quantize_<type>`` (ctypes) vs llmforge's numpy ``quantize_k``.

One f32 tensor (default 1024x4096, standard normal), per type plain and with an importance vector, at 1
and 2 threads; C and numpy are timed interleaved in the same run (best of ``--repeat``) because the machine
may be shared. C's N threads are N Python threads over row chunks (ctypes releases the GIL); numpy's are
``quantize_k(threads=N)``: the calling process and N - 1 pool helpers. Every numpy output is checked byte for
byte against C's.

    .venv/bin/python benchmarks/quantize_types.py --types q6_k,q3_k --threads 1,2
    git show REV:llmforge/quant/kquants.py > /tmp/kq_before.py      # an older version, timed alongside:
    .venv/bin/python benchmarks/quantize_types.py --baseline /tmp/kq_before.py
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gguf import GGMLQuantizationType as T  # noqa: E402

from llmforge.quant.kquants import BLOCK_BYTES, quantize_k  # noqa: E402


def ggml_fn(lib: ctypes.CDLL, qtype: T):
    fn = getattr(lib, f"quantize_{qtype.name[:-2].lower()}_K")
    fp = ctypes.POINTER(ctypes.c_float)
    fn.restype = ctypes.c_size_t
    fn.argtypes = [fp, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, fp]
    return fn


def ggml_quantize(fn, data: np.ndarray, qtype: T, importance: np.ndarray | None, threads: int,
                  pool: ThreadPoolExecutor) -> np.ndarray:
    rows, cols = data.shape
    out = np.zeros((rows, cols // 256 * BLOCK_BYTES[qtype]), dtype=np.uint8)
    fp = ctypes.POINTER(ctypes.c_float)
    qw = None if importance is None else importance.ctypes.data_as(fp)
    step = -(-rows // threads)

    def work(r0: int) -> None:
        r1 = min(rows, r0 + step)
        fn(data[r0:r1].ctypes.data_as(fp), out[r0:r1].ctypes.data, r1 - r0, cols, qw)

    list(pool.map(work, range(0, rows, step)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="q2_k,q3_k,q4_k,q5_k,q6_k")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-imatrix", action="store_true")
    ap.add_argument("--baseline", default=None, help="an older kquants.py, timed in the same run")
    args = ap.parse_args()
    base = None
    if args.baseline:
        spec = importlib.util.spec_from_file_location("kquants_baseline", args.baseline)
        base = importlib.util.module_from_spec(spec)
        sys.modules["kquants_baseline"] = base
        spec.loader.exec_module(base)
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    rng = np.random.default_rng(0)
    data = rng.standard_normal((args.rows, args.cols), dtype=np.float32)
    imp = (rng.random(args.cols, dtype=np.float32) * 4 + 0.01).astype(np.float32)
    mb = data.nbytes / 1e6
    print(f"{args.rows}x{args.cols} f32 ({mb:.1f} MB), best of {args.repeat}")
    if base is None:
        print("| type | threads | C MB/s | numpy MB/s | ratio | same bytes |")
        print("|---|---|---|---|---|---|")
    else:
        print("| type | threads | C MB/s | before MB/s (ratio) | after MB/s (ratio) | speedup | same bytes |")
        print("|---|---|---|---|---|---|---|")
    bad = 0
    for threads in (int(t) for t in args.threads.split(",")):
        pool = ThreadPoolExecutor(threads)
        quantize_k(data[:64], T.Q6_K, threads=threads)          # start the worker pool outside the timing
        if base is not None:
            base.quantize_k(data[:64], T.Q6_K, threads=threads)
        for name in args.types.split(","):
            qtype = T[name.upper()]
            fn = ggml_fn(lib, qtype)
            for weights in ([None] if args.no_imatrix else [None, imp]):
                t_c, t_np, t_base = float("inf"), float("inf"), float("inf")
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    ref = ggml_quantize(fn, data, qtype, weights, threads, pool)
                    t_c = min(t_c, time.perf_counter() - t0)
                    if base is not None:
                        t0 = time.perf_counter()
                        old = base.quantize_k(data, qtype, weights, threads=threads)
                        t_base = min(t_base, time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    ours = quantize_k(data, qtype, weights, threads=threads)
                    t_np = min(t_np, time.perf_counter() - t0)
                same = np.array_equal(ref, ours) and (base is None or np.array_equal(ref, old))
                bad += not same
                label = qtype.name + (" imatrix" if weights is not None else "")
                if base is None:
                    print(f"| {label} | {threads} | {mb / t_c:.1f} | {mb / t_np:.1f} | {t_c / t_np:.2f} | {same} |",
                          flush=True)
                else:
                    print(f"| {label} | {threads} | {mb / t_c:.1f} | {mb / t_base:.1f} ({t_c / t_base:.2f}) | "
                          f"{mb / t_np:.1f} ({t_c / t_np:.2f}) | {t_base / t_np:.2f} | {same} |", flush=True)
        pool.shutdown()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
