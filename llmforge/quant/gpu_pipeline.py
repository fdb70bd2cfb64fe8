"""Whole-file requantization on the GPU: reading, copies, kernels and writing overlap over tensor boundaries.

The output is planned first (:class:`llmforge.export.writer.StreamingGGUFWriter`: every tensor's offset is
known before any data), then each tensor is cut into pieces of whole rows (at most ``chunk_bytes`` of source
data) and ``lanes`` threads take the pieces in file order. A lane owns a pinned input slot, a pinned output
slot and a CUDA stream, and runs one piece at a time::

    os.preadv(the piece's source bytes -> pinned slot)      no memmap page faults, no extra copy, GIL released
    H2D copy; f16/bf16 widened to f32 on the device (exact); NaN/Inf count; the Triton kernel; D2H copy
    event.synchronize()                                      GIL released
    os.pwrite(packed bytes -> their planned offset in the temp output file)

so while one lane reads, others copy, quantize or write: the lanes are the ring of slots. Tensors that keep
their source type (norms) are copied raw; types without a kernel go through :func:`api.quantize_array` on the
host inside the lane (one thread each). The file is written under a temporary name and renamed on success.

The kernels are a parameter: :func:`triton_kernels` on CUDA (or on the CPU under ``TRITON_INTERPRET=1``);
tests also run the pipeline with a numpy stand-in on ``device="cpu"`` (no pinned memory, no streams).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ..errors import LlmforgeError
from ..export.writer import PlannedTensor, Progress, StreamingGGUFWriter, WriteResult

# (qtype, x (rows, cols) float32, importance (n_expert * cols,) or None, first super-block of the piece
#  in the tensor, super-blocks per row, super-blocks per expert) -> the piece's packed bytes (uint8, flat)
Kernel = Callable[[T, torch.Tensor, "torch.Tensor | None", int, int, int], torch.Tensor]

UNWEIGHTED_ONLY = frozenset({T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1})   # with importance: legacy_weighted, host
SOURCE_DTYPES: dict[T, torch.dtype] = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}


def env_number(name: str, default: str, cast: Callable[[str], float] = int) -> float:
    """The tuning knob ``name`` from the environment as a number >= 0 (``default`` when unset); a value that is
    not one stops with one line naming the variable."""
    text = os.environ.get(name, default)
    try:
        value = cast(text)
    except ValueError:
        value = -1
    if not value >= 0:
        kind = "whole number" if cast is int else "number"
        raise LlmforgeError(f"{name}={text!r} is not a {kind} >= 0", hint=f"unset it or give e.g. {default}")
    return value


CHUNK_BYTES = int(env_number("LLMFORGE_GPU_CHUNK_MB", "32", float) * 2**20)
LANES = env_number("LLMFORGE_GPU_LANES", "0")       # 0: min(12, cores)
# "mmap" (default: lanes populate and fill their own pages in parallel; H100 host, q8_0 7.9x llama.cpp vs 5.0x with
# pwrite, whose writes to one tmpfs file are serial) or "pwrite" (see _Output)
WRITE_MODE = os.environ.get("LLMFORGE_GPU_WRITE", "mmap")
PREALLOCATE = os.environ.get("LLMFORGE_GPU_PREALLOCATE", "1") != "0"   # see _Output
PREALLOCATE_STEP = 256 << 20
# "mmap" output: ask for transparent huge pages (MADV_HUGEPAGE; tmpfs honours it when shmem_enabled is "advise"):
# 512x fewer page faults and page-table entries to populate and tear down. Elsewhere a harmless no-op. Off by
# default: the one GPU host measured (H200, shmem_enabled "never") ignored it (q8_0 8.83x vs 8.88x without).
HUGEPAGES = os.environ.get("LLMFORGE_GPU_HUGEPAGES", "0") != "0"
# "mmap" output: threads that populate the mapping in file order from the start (MADV_POPULATE_WRITE), ahead of
# the lanes, whose copies then find their pages in place. tmpfs inserts one file's pages one at a time, so this
# starts that serial work at once instead of after the first pieces are read and packed. 0: off (not yet measured)
POPULATE_AHEAD = env_number("LLMFORGE_GPU_POPULATE_AHEAD", "0")
POPULATE_AHEAD_STEP = 8 << 20
_MADV_POPULATE_WRITE = 23                                    # Linux 5.14+
_MADV_HUGEPAGE = 14


@dataclass(frozen=True)
class Piece:
    """Rows ``row0 .. row0 + rows`` of planned tensor ``tensor``: where they are read and written."""

    tensor: int
    kind: str            # "raw" (bytes copied), "gpu" (a kernel), "host" (api.quantize_array, whole tensor)
    src: int             # file offsets and sizes
    src_bytes: int
    dst: int
    dst_bytes: int
    row0: int
    rows: int


def tensor_rows(t: PlannedTensor) -> tuple[int, int]:
    """(rows, cols) of a planned tensor (a vector is one row)."""
    cols = t.shape[-1] if t.shape else 1
    return (t.n_elements // cols if cols else 0), cols


def plan_pieces(tensors: list[PlannedTensor], src_offsets: Mapping[str, int], dst_offsets: Mapping[str, int],
                kernel_types: frozenset[T], chunk_bytes: int, weighted: frozenset[str] = frozenset()) -> list[Piece]:
    """Cut every tensor into pieces of whole rows of at most ``chunk_bytes`` source bytes (at least one row);
    ``t.source`` is the tensor's type in the input file; ``weighted``: the tensors with importance (the legacy
    types then take llama.cpp's weighted path, on the host)."""
    pieces = []
    for i, t in enumerate(tensors):
        source = T(t.source)
        rows, cols = tensor_rows(t)
        if rows == 0:
            continue
        row_src = cols * SOURCE_DTYPES[source].itemsize
        row_dst = t.nbytes // rows
        if t.qtype == source:
            kind = "raw"
        elif t.qtype in kernel_types and not (t.qtype in UNWEIGHTED_ONLY and t.name in weighted):
            kind = "gpu"
        else:
            kind = "host"
        per = rows if kind == "host" else max(1, chunk_bytes // row_src)
        if per >= 16:       # whole multiples of 16 rows: the kernels' integer arguments stay divisible by 16
            per -= per % 16     # (Triton compiles a variant per divisibility)
        src0, dst0 = src_offsets[t.name], dst_offsets[t.name]
        for r0 in range(0, rows, per):
            n = min(per, rows - r0)
            pieces.append(Piece(i, kind, src0 + r0 * row_src, n * row_src, dst0 + r0 * row_dst, n * row_dst, r0, n))
    return pieces


def triton_kernels() -> tuple[frozenset[T], Kernel]:
    """The fused Triton kernels: K-quants (Q2_K..Q6_K, with and without importance), Q8_0 (importance
    unused, as in llama.cpp) and Q4_0/Q4_1/Q5_0/Q5_1 without importance."""
    from .kquants import QK_K
    from .kquants_triton import (K_TYPES_TRITON, LEGACY_TYPES_TRITON, quantize_blocks_triton,
                                 quantize_legacy_device, quantize_q8_0_device)

    def run(qtype: T, x: torch.Tensor, imp: torch.Tensor | None, block0: int, bpr: int, bpe: int) -> torch.Tensor:
        if qtype == T.Q8_0:
            return quantize_q8_0_device(x)
        if qtype in LEGACY_TYPES_TRITON:
            return quantize_legacy_device(x, qtype)
        return quantize_blocks_triton(qtype, x.reshape(-1, QK_K), imp, block0, bpr, bpe).reshape(-1)

    return frozenset(K_TYPES_TRITON) | {T.Q8_0} | frozenset(LEGACY_TYPES_TRITON), run


# what quantize_gguf(..., backend="cuda") runs on (tests put the CPU and a stand-in kernel here)
DEVICE = "cuda"
KERNELS: Callable[[], tuple[frozenset[T], Kernel]] = triton_kernels


# ----------------------------------------------------------------------------- file I/O without the GIL


def pread_into(fd: int, buf: np.ndarray, offset: int) -> None:
    """Fill ``buf`` (uint8) from ``fd`` at ``offset``; a short file is an error."""
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise LlmforgeError(f"input GGUF ends at byte {offset + done}, its header says tensor data "
                                f"goes to {offset + len(view)}", hint="the file is truncated; copy it again")
        done += n


def pwrite_all(fd: int, buf: np.ndarray, offset: int) -> None:
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_FALLOCATE = getattr(_LIBC, "fallocate", None)
if _FALLOCATE is not None:
    _FALLOCATE.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, offset: int, length: int) -> bool:
    """Allocate ``fd``'s blocks in [offset, offset + length) (Linux fallocate(2), mode 0: the size stays);
    False where the system or file system cannot (the caller just goes on without)."""
    return _FALLOCATE is not None and _FALLOCATE(fd, 0, offset, length) == 0


class _Output:
    """Where the lanes put packed bytes. "pwrite": each call holds the file's inode lock, so writes to one
    file are serial whatever the number of threads. "mmap": the output mapped shared; a lane populates the
    pages of its range (MADV_POPULATE_WRITE: a full disk is then an ENOSPC error, not a SIGBUS) and copies
    into them, in parallel with the other lanes. A kernel without MADV_POPULATE_WRITE falls back to pwrite.

    With :data:`PREALLOCATE`, a thread allocates the file's blocks (fallocate(2), in steps, from the start)
    while the lanes read their first pieces: page allocation then leaves the writes' critical path (on tmpfs
    it costs more than the copy). Best effort: a file system without fallocate just skips it (never glibc's
    zero-writing emulation, which could race with the lanes).

    With :data:`POPULATE_AHEAD` threads, the mapping is populated in file order from the start (see there);
    they stop at the first error, leaving it to the lane that writes there to report."""

    def __init__(self, fd: int, mode: str):
        self.fd, self.mm, self.mapped, self.base, self._arr = fd, None, False, 0, None
        size = os.fstat(fd).st_size
        self._stop, self._allocator, self._populators = threading.Event(), None, []
        self._next_ahead, self._ahead_lock = 0, threading.Lock()
        if PREALLOCATE and size:
            self._allocator = threading.Thread(target=self._preallocate, args=(size,), daemon=True)
            self._allocator.start()
        if mode == "mmap" and size:
            try:
                self.mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError:     # a file system that cannot map the output: pwrite (same bytes)
                return
            self._arr = np.frombuffer(self.mm, dtype=np.uint8)
            self.base, self.mapped = self._arr.ctypes.data, True
            if HUGEPAGES:       # best effort: before any page is touched
                _LIBC.madvise(ctypes.c_void_p(self.base), ctypes.c_size_t(size), _MADV_HUGEPAGE)
            self._populators = [threading.Thread(target=self._populate_ahead, args=(size,), daemon=True,
                                                 name="llmforge-populate") for _ in range(POPULATE_AHEAD)]
            for thread in self._populators:
                thread.start()

    def _populate_ahead(self, size: int) -> None:
        while not self._stop.is_set():
            with self._ahead_lock:
                offset, self._next_ahead = self._next_ahead, self._next_ahead + POPULATE_AHEAD_STEP
            if offset >= size or _LIBC.madvise(ctypes.c_void_p(self.base + offset),
                                               ctypes.c_size_t(min(POPULATE_AHEAD_STEP, size - offset)),
                                               _MADV_POPULATE_WRITE) != 0:
                return

    def _preallocate(self, size: int) -> None:
        for offset in range(0, size, PREALLOCATE_STEP):
            if self._stop.is_set() or not fallocate(self.fd, offset, min(PREALLOCATE_STEP, size - offset)):
                return

    def write(self, buf: np.ndarray, offset: int) -> None:
        if not self.mapped:
            pwrite_all(self.fd, buf, offset)
            return
        start = offset - offset % mmap.PAGESIZE
        # through ctypes, which releases the GIL (mmap.madvise holds it while the pages are populated, stalling
        # the other lanes' Python)
        if _LIBC.madvise(ctypes.c_void_p(self.base + start), ctypes.c_size_t(offset + buf.nbytes - start),
                         _MADV_POPULATE_WRITE) != 0:
            err = ctypes.get_errno()
            if err == errno.EINVAL:             # an older kernel: pwrite from now on (same page cache)
                self.mapped = False
                pwrite_all(self.fd, buf, offset)
                return
            raise OSError(errno.ENOSPC, f"could not allocate output pages ({os.strerror(err)})")
        ctypes.memmove(self.base + offset, buf.ctypes.data, buf.nbytes)    # ctypes releases the GIL

    def close(self, background: bool = False) -> None:
        """Stop the allocator and the populating threads, and unmap the output: with ``background`` (a finished
        file) later, on a thread
        that :func:`unmap_pending` starts (see :func:`unmap_later`), else now (a failed or interrupted write
        leaves nothing behind)."""
        self._stop.set()
        if self._allocator is not None:    # before the caller closes the fd (its number could be reused)
            self._allocator.join()
        for thread in self._populators:    # before the mapping goes (they write through its addresses)
            thread.join()
        self._populators = []
        self.mapped, self._arr = False, None
        mm, self.mm = self.mm, None
        if mm is not None:
            if background:
                _PENDING.append((mm, self.base))
            else:
                mm.close()


_UNMAPPING: list[threading.Thread] = []
_PENDING: list[tuple[mmap.mmap, int]] = []   # finished outputs (mapping, address) awaiting their read-back
_MADV_DONTNEED = 4
RELEASE_STEP = 32 << 20


def unmap_pending() -> None:
    """Start tearing down the finished outputs' mappings (:func:`unmap_later`), once the file has been read
    back and renamed: the read-back maps the file, which would wait for a teardown holding the mapping lock."""
    while _PENDING:
        unmap_later(*_PENDING.pop())


def _release(mm: mmap.mmap, base: int) -> None:
    """Drop the mapping's page-table entries 32 MiB at a time (MADV_DONTNEED: for a shared file mapping the
    data stays in the page cache, dirty state included), then unmap what is left, now cheap. One munmap of a
    populated 1.2 GB mapping holds the process's mapping lock for ~50 ms, stalling every thread that maps
    memory meanwhile (any allocation of a new arena); step by step the stall stays ~1 ms."""
    for offset in range(0, len(mm), RELEASE_STEP):
        _LIBC.madvise(ctypes.c_void_p(base + offset), ctypes.c_size_t(min(RELEASE_STEP, len(mm) - offset)),
                      _MADV_DONTNEED)     # ctypes releases the GIL; a failure leaves the work to munmap
    mm.close()


def unmap_later(mm: mmap.mmap, base: int) -> None:
    """Release ``mm`` (mapped at ``base``) on a daemon thread (:func:`_release`). The bytes are in the page
    cache as soon as they are copied in, so the file can be renamed and read at once; tearing down a populated
    mapping costs ~50-70 ms per GB (the pages of a 1.17 GB q8_0 output: ~20% of the whole GPU pass), which
    need not delay the caller."""
    _UNMAPPING[:] = [t for t in _UNMAPPING if t.is_alive()]
    thread = threading.Thread(target=_release, args=(mm, base), daemon=True, name="llmforge-unmap")
    thread.start()
    _UNMAPPING.append(thread)


def wait_unmapped() -> None:
    """Wait for the outputs being unmapped in the background (pending ones first start)."""
    unmap_pending()
    for thread in list(_UNMAPPING):
        thread.join()
    _UNMAPPING.clear()


# ----------------------------------------------------------------------------- lanes


STAGES = ("read", "launch", "wait", "write", "host")


class StageClock:
    """Seconds spent per pipeline stage by one lane (``launch`` includes waiting for the launch lock, ``wait``
    the GPU work and copies of the lane's piece)."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - t0


# the last write_pipelined call: wall seconds, lanes, pieces, and the stage seconds summed over the lanes
LAST_STATS: dict[str, float] = {}


class _Lane:
    """One slot of the ring: pinned input and output buffers, the device input buffer, a stream, an event."""

    def __init__(self, dev: torch.device, cap_in: int, cap_out: int):
        cuda = dev.type == "cuda"
        self.cap_in, self.cap_out = cap_in, cap_out
        self.inp = torch.empty(cap_in, dtype=torch.uint8, pin_memory=cuda)
        self.out = torch.empty(cap_out, dtype=torch.uint8, pin_memory=cuda)
        self.bad = torch.zeros(1, dtype=torch.int64, pin_memory=cuda)
        self.inp_np, self.out_np = self.inp.numpy(), self.out.numpy()
        self.dev_in = torch.empty(cap_in, dtype=torch.uint8, device=dev) if cuda else None
        self.stream = torch.cuda.Stream(dev) if cuda else None
        # blocking: a waiting lane sleeps instead of spinning on a core the readers need
        self.done = torch.cuda.Event(blocking=True) if cuda else None
        self.clock = StageClock()


# pinning memory is slow: the lanes are kept for the process, per device (one pipeline at a time)
_LANES: dict[str, list[_Lane]] = {}
_PIPELINE_LOCK = threading.Lock()


def _lanes(dev: torch.device, n: int, cap_in: int, cap_out: int) -> list[_Lane]:
    """``n`` lanes whose slots hold ``cap_in`` / ``cap_out`` bytes, reusing the kept ones that are big enough."""
    have = [ln for ln in _LANES.get(str(dev), []) if ln.cap_in >= cap_in and ln.cap_out >= cap_out]
    while len(have) < n:
        have.append(_Lane(dev, max(cap_in, 1), max(cap_out, 1)))
    _LANES[str(dev)] = have
    return have[:n]


def release_lanes() -> None:
    """Drop the kept pinned buffers (they are reused by the next pipelined write otherwise)."""
    with _PIPELINE_LOCK:
        _LANES.clear()


def _widen(raw: torch.Tensor, source: T) -> torch.Tensor:
    x = raw.view(SOURCE_DTYPES[source])
    return x if source == T.F32 else x.to(torch.float32)     # f16/bf16 -> f32 is exact


def _host_f32(raw: np.ndarray, source: T) -> np.ndarray:
    if source == T.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return raw.view(np.float16).astype(np.float32) if source == T.F16 else raw.view(np.float32)


class _Run:
    """One pipelined write: the pieces, the shared cursor, per-tensor NaN/Inf counts and progress."""

    def __init__(self, tensors: list[PlannedTensor], pieces: list[Piece], fd_in: int, out: _Output,
                 dev: torch.device, kernel: Kernel, importance: Mapping[str, np.ndarray], bar: Progress):
        self.tensors, self.pieces, self.fd_in, self.out = tensors, pieces, fd_in, out
        self.dev, self.kernel, self.importance, self.bar = dev, kernel, importance, bar
        self.cuda = dev.type == "cuda"
        self.lock = threading.Lock()
        self.launch = threading.Lock()      # one thread launches at a time (Triton's JIT, its interpreter)
        self.next = 0
        self.errors: list[BaseException] = []
        self.bad = [0] * len(tensors)
        self.left = [0] * len(tensors)
        for p in pieces:
            self.left[p.tensor] += 1
        self.finished = sum(1 for n in self.left if n == 0)
        self.imp_dev: dict[str, tuple[torch.Tensor, int]] = {}
        for p in pieces:
            t = tensors[p.tensor]
            imp = importance.get(t.name)
            if p.kind == "gpu" and imp is not None and t.name not in self.imp_dev:
                rows, cols = tensor_rows(t)
                flat = np.ascontiguousarray(imp, dtype=np.float32).reshape(-1, cols)
                bpe = max(1, rows // flat.shape[0]) * (cols // 256)
                self.imp_dev[t.name] = (torch.from_numpy(flat.reshape(-1)).to(dev), bpe)
        if self.cuda:
            torch.cuda.synchronize(dev)

    def take(self) -> Piece | None:
        with self.lock:
            if self.errors or self.next == len(self.pieces):
                return None
            self.next += 1
            return self.pieces[self.next - 1]

    def lane_loop(self, lane: _Lane) -> None:
        try:
            if self.cuda:
                torch.cuda.set_device(self.dev)      # the current device is per thread
            while (piece := self.take()) is not None:
                getattr(self, f"_{piece.kind}")(lane, piece)
                with self.lock:
                    self.left[piece.tensor] -= 1
                    if self.left[piece.tensor] == 0:
                        self.finished += 1
                        self.bar.update(self.finished, self.tensors[piece.tensor].name)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller's thread
            with self.lock:
                self.errors.append(exc)

    def _raw(self, lane: _Lane, p: Piece) -> None:
        buf = lane.inp_np[:p.src_bytes]
        with lane.clock("read"):
            pread_into(self.fd_in, buf, p.src)
        with lane.clock("write"):
            self.out.write(buf, p.dst)

    def _gpu(self, lane: _Lane, p: Piece) -> None:
        t = self.tensors[p.tensor]
        rows, cols = tensor_rows(t)
        with lane.clock("read"):
            pread_into(self.fd_in, lane.inp_np[:p.src_bytes], p.src)
        imp, bpe = self.imp_dev.get(t.name, (None, 1))
        bpr = max(1, cols // 256)
        with lane.clock("launch"), self.launch, torch.no_grad(), \
                torch.cuda.stream(lane.stream) if self.cuda else nullcontext():
            raw = lane.inp[:p.src_bytes]
            if self.cuda:
                raw = lane.dev_in[:p.src_bytes].copy_(raw, non_blocking=True)
            x = _widen(raw, T(t.source)).reshape(p.rows, cols)
            lane.bad.copy_(torch.isfinite(x).logical_not_().sum().reshape(1), non_blocking=self.cuda)
            packed = self.kernel(t.qtype, x, imp, p.row0 * bpr, bpr, bpe if imp is not None else rows * bpr)
            if packed.numel() != p.dst_bytes:
                raise RuntimeError(f"{t.name}: kernel gave {packed.numel()} bytes, planned {p.dst_bytes}")
            lane.out[:p.dst_bytes].copy_(packed.reshape(-1), non_blocking=self.cuda)
            if self.cuda:
                lane.done.record(lane.stream)
        if self.cuda:
            with lane.clock("wait"):
                lane.done.synchronize()
        bad = int(lane.bad[0])
        if bad:
            with self.lock:
                self.bad[p.tensor] += bad
            return
        with lane.clock("write"):
            self.out.write(lane.out_np[:p.dst_bytes], p.dst)

    def _host(self, lane: _Lane, p: Piece) -> None:
        from .api import quantize_array

        t = self.tensors[p.tensor]
        raw = np.empty(p.src_bytes, dtype=np.uint8)
        pread_into(self.fd_in, raw, p.src)
        x = _host_f32(raw, T(t.source)).reshape(t.shape)
        bad = int(x.size - np.count_nonzero(np.isfinite(x)))
        if bad:
            with self.lock:
                self.bad[p.tensor] += bad
            return
        with lane.clock("host"):
            out = quantize_array(x, t.qtype, self.importance.get(t.name), name=t.name, threads=1, backend="numpy")
        self.out.write(np.ascontiguousarray(out).view(np.uint8).reshape(-1), p.dst)


def pipelined() -> bool:
    """Whether ``quantize_gguf(..., backend="cuda")`` takes this pipeline (``LLMFORGE_KQUANT_GPU=eager``: the
    tensor-by-tensor eager torch path instead, for A/B checks)."""
    return os.environ.get("LLMFORGE_KQUANT_GPU", "").lower() != "eager"


def default_lanes() -> int:
    return LANES or max(2, min(12, os.cpu_count() or 2))


def write_pipelined(writer: StreamingGGUFWriter, out_path: str | Path, in_path: str | Path,
                    src_offsets: Mapping[str, int], importance: Mapping[str, np.ndarray] | None = None, *,
                    device: str | None = None, kernels: tuple[frozenset[T], Kernel] | None = None,
                    lanes: int | None = None, chunk_bytes: int | None = None, write_mode: str | None = None,
                    progress: bool = True) -> WriteResult:
    """Write ``writer``'s planned tensors (``t.source`` = the input type, ``src_offsets`` = where each
    tensor's data starts in ``in_path``) to ``out_path`` atomically through the lanes; same bytes as
    :meth:`StreamingGGUFWriter.write` with :func:`api.quantize_array`. ``kernels``: (types, kernel), default
    :func:`triton_kernels`; ``device`` default :data:`DEVICE`; ``write_mode`` "pwrite" or "mmap" (default
    :data:`WRITE_MODE`, see :class:`_Output`). NaN/Inf in a tensor that is converted is one
    error naming the first such tensor."""
    importance = importance or {}
    types, kernel = kernels or KERNELS()
    dev = torch.device(device or DEVICE)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    n_lanes = lanes or default_lanes()
    chunk = chunk_bytes or CHUNK_BYTES
    bar = Progress(len(writer.tensors), f"writing {Path(out_path).name}", progress)

    def fill(fd_out: int) -> None:
        pieces = plan_pieces(writer.tensors, src_offsets, writer.data_offsets, types, chunk, frozenset(importance))
        # slots sized for a full chunk (so a smaller file after a bigger one reuses them); Q8_0 from f16 packs
        # 64 source bytes into 34, the largest ratio of the kernel types
        big = max((p.src_bytes for p in pieces if p.kind != "host"), default=0)
        cap_in = max(big, chunk) if big else 0
        cap_out = max(max((p.dst_bytes for p in pieces if p.kind == "gpu"), default=0), cap_in * 17 // 32)
        fd_in = os.open(in_path, os.O_RDONLY)
        out = _Output(fd_out, write_mode or WRITE_MODE)
        finished = False
        try:
            with _PIPELINE_LOCK:
                ring = _lanes(dev, n_lanes, cap_in, cap_out)
                run = _Run(writer.tensors, pieces, fd_in, out, dev, kernel, importance, bar)
                for lane in ring:
                    lane.clock = StageClock()
                threads = [threading.Thread(target=run.lane_loop, args=(lane,), daemon=True) for lane in ring]
                t0 = time.perf_counter()
                for th in threads:
                    th.start()
                try:
                    for th in threads:
                        th.join()
                except BaseException as exc:   # Ctrl-C: lanes stop after their piece, before the files close
                    with run.lock:
                        run.errors.append(exc)
                    for th in threads:
                        th.join()
                    raise
                LAST_STATS.clear()
                LAST_STATS.update(wall=time.perf_counter() - t0, lanes=len(ring), pieces=len(pieces))
                for stage in STAGES:
                    LAST_STATS[stage] = sum(lane.clock.seconds[stage] for lane in ring)
                finished = not run.errors and not any(run.bad)   # the file will be kept
        finally:
            out.close(background=finished)
            os.close(fd_in)
        if run.errors:
            raise run.errors[0]
        for t, bad in zip(writer.tensors, run.bad):
            if bad:
                raise LlmforgeError(f"tensor {t.name!r} holds {bad} NaN/Inf value(s)",
                                    hint="fix or re-export the checkpoint; quantizing it would give a broken model")

    try:
        return writer.write_in_place(out_path, fill)   # reads the file back, then renames it
    finally:
        unmap_pending()
