"""Quantization speed: llmforge (numpy path, torch CPU path, and on CUDA the fused Triton kernels and the eager
torch path) vs llama.cpp.

Builds one f32 GGUF with a ~1B-parameter llama layout (TinyLlama-1.1B shapes, random weights; ``--layers``
makes it smaller), then quantizes it to q4_k_m, q6_k and q8_0 with each quantizer in the same run and prints
throughput (MB of f32 input per second) and the ratio llmforge / llama.cpp. llama.cpp runs through
llama-cpp-python's ``llama_model_quantize`` with ``nthread`` = the cores llmforge uses. Every llmforge
output is also compared with llama.cpp's, byte for byte.

    .venv/bin/python benchmarks/quantize.py                 # ~1.1B parameters (4.4 GB f32; slow on 2 cores)
    .venv/bin/python benchmarks/quantize.py --layers 2      # ~0.2B parameters
    python3 benchmarks/quantize.py --backends cuda --dir /dev/shm --repeat 3 --probe --gpu-settings 12x32,12x32xmmap

On CUDA, ``quantize_gguf`` runs the whole-file pipeline (llmforge.quant.gpu_pipeline); ``--gpu-settings`` tries
lane counts and piece sizes, ``--probe`` measures its host-side limits (preadv, H2D, pwrite) on the same file.
The first run of a process includes CUDA's start-up and Triton's kernel loading: ``--repeat`` shows each run.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
import time
import warnings
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


def probe_host(src: Path, tmp: Path, lanes: int, chunk: int, say) -> None:
    """What bounds the GPU pipeline's host side: preadv of the input into pinned slots (1 and ``lanes``
    threads), H2D copies from ``lanes`` streams, pwrite of a quarter of the input's size (``lanes`` threads)."""
    import threading

    import torch

    size = src.stat().st_size
    bufs = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(lanes)]
    offsets = list(range(0, size - chunk + 1, chunk))

    def in_threads(n: int, work) -> float:
        t0 = time.perf_counter()
        ths = [threading.Thread(target=work, args=(i, n)) for i in range(n)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        return time.perf_counter() - t0

    fd = os.open(src, os.O_RDONLY)
    try:
        for n in (1, lanes):
            t = in_threads(n, lambda i, n: [os.preadv(fd, [bufs[i].numpy()], off) for off in offsets[i::n]])
            say(f"probe: preadv -> pinned, {n:2} threads: {len(offsets) * chunk / t / 1e9:5.1f} GB/s")
    finally:
        os.close(fd)
    dev = [torch.empty(chunk, dtype=torch.uint8, device="cuda") for _ in range(lanes)]
    streams = [torch.cuda.Stream() for _ in range(lanes)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for k in range(len(offsets)):
        with torch.cuda.stream(streams[k % lanes]):
            dev[k % lanes].copy_(bufs[k % lanes], non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter() - t0
    say(f"probe: H2D pinned, {lanes:2} streams:      {len(offsets) * chunk / t / 1e9:5.1f} GB/s")
    probe_registered(src, lanes, chunk, dev, streams, say)
    from llmforge.quant import gpu_pipeline

    say(f"probe: {host_pages(tmp)}")
    quarter = offsets[: max(1, len(offsets) // 4)]
    # the pipeline's ways to write the output, into a fresh file (label, mode, gpu_pipeline settings)
    for label, mode, setting in (("pwrite", "pwrite", {}), ("mmap", "mmap", {}),
                                 ("mmap huge", "mmap", {"HUGEPAGES": True}),
                                 ("mmap ahead2", "mmap", {"POPULATE_AHEAD": 2})):
        out = tmp / "probe.bin"
        fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        saved = {name: getattr(gpu_pipeline, name) for name in setting}
        for name, value in setting.items():
            setattr(gpu_pipeline, name, value)
        try:
            os.ftruncate(fd, len(quarter) * chunk)
            t0 = time.perf_counter()     # from the output's opening (populating threads start there)
            sink = gpu_pipeline._Output(fd, mode)
            in_threads(lanes, lambda i, n: [sink.write(bufs[i].numpy(), k * chunk)
                                            for k in range(i, len(quarter), n)])
            t = time.perf_counter() - t0
            sink.close()
            say(f"probe: {label:11} output, {lanes:2} threads:   {len(quarter) * chunk / t / 1e9:5.1f} GB/s")
        finally:
            for name, value in saved.items():
                setattr(gpu_pipeline, name, value)
            os.close(fd)
            out.unlink()


def host_pages(folder: Path) -> str:
    """The kernel's transparent-huge-page policy for shmem and the mount options of ``folder``'s file system."""
    def read(path: str) -> str:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return "?"
    mounts = [line.split() for line in read("/proc/mounts").splitlines()]
    best = max((m for m in mounts if len(m) > 3 and str(folder.resolve()).startswith(m[1])),
               key=lambda m: len(m[1]), default=None)
    return (f"THP shmem_enabled [{read('/sys/kernel/mm/transparent_hugepage/shmem_enabled')}], "
            f"enabled [{read('/sys/kernel/mm/transparent_hugepage/enabled')}]; "
            f"{folder}: {best[2] + ' ' + best[3] if best else '?'}")


def probe_registered(src: Path, lanes: int, chunk: int, dev: list, streams: list, say) -> None:
    """The zero-copy alternative to preadv: the input's read-only mapping registered with CUDA
    (cudaHostRegisterReadOnly), then H2D straight from the page cache."""
    import mmap

    import torch

    size = src.stat().st_size
    with open(src, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED)
    arr = np.frombuffer(mm, dtype=np.uint8)
    cudart = torch.cuda.cudart()
    try:
        t0 = time.perf_counter()
        err = cudart.cudaHostRegister(arr.ctypes.data, size, 8)       # cudaHostRegisterReadOnly
        t_reg = time.perf_counter() - t0
        if int(err) != 0:
            say(f"probe: cudaHostRegister(read-only mapping) failed: {err}")
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            host = torch.frombuffer(mm, dtype=torch.uint8)
        offsets = list(range(0, size - chunk + 1, chunk))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for k, off in enumerate(offsets):
            with torch.cuda.stream(streams[k % lanes]):
                dev[k % lanes].copy_(host[off:off + chunk], non_blocking=True)
        torch.cuda.synchronize()
        t_copy = time.perf_counter() - t0
        t0 = time.perf_counter()
        cudart.cudaHostUnregister(arr.ctypes.data)
        say(f"probe: registered mapping: register {size / t_reg / 1e9:5.1f} GB/s, "
            f"H2D {len(offsets) * chunk / t_copy / 1e9:5.1f} GB/s, unregister {time.perf_counter() - t0:.3f} s")
        del host
    except Exception as exc:  # noqa: BLE001 - a probe: report and go on
        say(f"probe: registered mapping failed: {exc!r}")
    finally:
        del arr
        try:
            mm.close()
        except BufferError:
            pass


def same_file(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    return bool(np.array_equal(np.memmap(a, dtype=np.uint8, mode="r"), np.memmap(b, dtype=np.uint8, mode="r")))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=22, help="22 = TinyLlama-1.1B")
    ap.add_argument("--quants", default="q4_k_m,q6_k,q8_0")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--backends", default="", help="only these: numpy, cpu, cuda (Triton), cuda-eager")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp folder)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per llmforge backend (the best is the ratio)")
    ap.add_argument("--gpu-settings", default="",
                    help="cuda pipeline settings to try, LANESxCHUNK_MB[xmmap][xnoalloc][xhuge][xaheadN], e.g. "
                         "12x32,12x32xnoalloc,12x32xmmapxahead2 (mmap: LLMFORGE_GPU_WRITE=mmap; noalloc: "
                         "LLMFORGE_GPU_PREALLOCATE=0; huge: LLMFORGE_GPU_HUGEPAGES=1; aheadN: "
                         "LLMFORGE_GPU_POPULATE_AHEAD=N)")
    ap.add_argument("--probe", action="store_true", help="also measure the GPU pipeline's host-side limits")
    ap.add_argument("--out", default=None, help="also write the lines printed to this file")
    args = ap.parse_args()
    threads = default_workers()
    import torch

    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")

    cuda = ["cuda", "cuda-eager"] if torch.cuda.is_available() else []
    backends = ["numpy"] + ([] if args.no_torch else ["cpu"] + cuda)
    if args.backends:
        backends = [b for b in args.backends.split(",") if b in backends]
    try:
        settings = [parse_setting(s) for s in args.gpu_settings.split(",") if s] or [None]
    except (ValueError, IndexError):
        ap.error(f"--gpu-settings {args.gpu_settings!r}: each setting is LANESxCHUNK_MB[xmmap][xnoalloc][xhuge]"
                 "[xaheadN], e.g. 16x32xmmapxahead2")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        src = Path(tmp) / "model-f32.gguf"
        n = build_f32(src, args.layers)
        mb = src.stat().st_size / 1e6
        gpu = f"{torch.cuda.get_device_name()}, triton {__import__('triton').__version__}" if cuda else "no GPU"
        say(f"input: {n / 1e9:.2f}B parameters, {mb:.0f} MB f32 in {args.dir or 'a temp folder'}; {threads} cores; "
            f"torch {torch.__version__} threads {torch.get_num_threads()}; {gpu}; {os.uname().machine}; "
            f"load {os.getloadavg()[0]:.1f}")
        if args.probe and cuda:
            from llmforge.quant import gpu_pipeline

            probe_host(src, Path(tmp), gpu_pipeline.default_lanes(), gpu_pipeline.CHUNK_BYTES, say)
        for quant in args.quants.split(","):
            ref = Path(tmp) / f"ref-{quant}.gguf"
            t0 = time.perf_counter()
            llama_cpp_quantize(src, ref, quant, threads)
            t_ref = time.perf_counter() - t0
            say(f"{quant:7} llama.cpp ({threads} threads) {mb / t_ref:8.1f} MB/s")
            for backend in backends:
                if quant == "q8_0" and backend in ("cpu", "cuda-eager"):
                    continue        # no torch path for q8_0 outside the cuda pipeline
                for setting in settings if backend == "cuda" else [None]:
                    run_backend(src, ref, Path(tmp), quant, backend, setting, args.repeat, mb, t_ref, say)
            ref.unlink()


def parse_setting(text: str) -> dict:
    """``LANESxCHUNK_MB[xmmap][xnoalloc][xhuge][xaheadN]`` -> the gpu_pipeline module attributes it sets."""
    parts = text.split("x")
    ahead = [int(p[5:]) for p in parts if p.startswith("ahead")]
    return {"LANES": int(parts[0]), "CHUNK_BYTES": int(parts[1]) << 20,
            "WRITE_MODE": "mmap" if "mmap" in parts else "pwrite",
            "PREALLOCATE": "noalloc" not in parts, "HUGEPAGES": "huge" in parts,
            "POPULATE_AHEAD": ahead[0] if ahead else 0}


def run_backend(src: Path, ref: Path, tmp: Path, quant: str, backend: str, setting: dict | None,
                repeat: int, mb: float, t_ref: float, say) -> None:
    from llmforge.quant import gpu_pipeline

    out = tmp / f"ours-{quant}-{backend}.gguf"
    label = {"numpy": "numpy", "cpu": "torch CPU", "cuda": "CUDA Triton", "cuda-eager": "CUDA eager"}[backend]
    saved = {name: getattr(gpu_pipeline, name) for name in (setting or {})}
    for name, value in (setting or {}).items():
        setattr(gpu_pipeline, name, value)
    if backend == "cuda":
        lanes = gpu_pipeline.LANES or gpu_pipeline.default_lanes()
        label += (f" {lanes:2} lanes x {gpu_pipeline.CHUNK_BYTES >> 20:3} MiB {gpu_pipeline.WRITE_MODE:6}"
                  f"{'' if gpu_pipeline.PREALLOCATE else ' no fallocate'}{' huge' if gpu_pipeline.HUGEPAGES else ''}"
                  f"{f' ahead {gpu_pipeline.POPULATE_AHEAD}' if gpu_pipeline.POPULATE_AHEAD else ''}")
    if backend == "cuda-eager":
        os.environ["LLMFORGE_KQUANT_GPU"] = "eager"    # A/B: TorchOps instead of the Triton kernels
    times = []
    try:
        for _ in range(repeat):
            out.unlink(missing_ok=True)         # as for llama.cpp: no old file to free inside the timed call
            gpu_pipeline.wait_unmapped()        # nor the previous run's output mapping still being torn down
            t0 = time.perf_counter()
            quantize_gguf(src, out, quant, progress=False, backend=backend.removesuffix("-eager"))
            times.append(time.perf_counter() - t0)
            same = same_file(ref, out)
            if not same:
                same = "tensors only" if same_tensors(ref, out) else False
            if same is False:
                break
    finally:
        os.environ.pop("LLMFORGE_KQUANT_GPU", None)
        for name, value in saved.items():
            setattr(gpu_pipeline, name, value)
    runs = " ".join(f"{mb / t:.0f}" for t in times)
    say(f"{quant:7} llmforge {label:10} {mb / min(times):8.1f} MB/s   ratio {t_ref / min(times):5.2f}   "
        f"identical to llama.cpp: {same}   (runs, MB/s: {runs})")
    st = gpu_pipeline.LAST_STATS
    if backend == "cuda" and st:
        stages = ", ".join(f"{k} {st[k]:.2f}" for k in gpu_pipeline.STAGES if st[k])
        say(f"{'':7}   last run: lanes' wall {st['wall']:.3f} s of {times[-1]:.3f} s, {st['pieces']:.0f} pieces; "
            f"stage seconds summed over {st['lanes']:.0f} lanes: {stages}")
    out.unlink()


if __name__ == "__main__":
    main()
