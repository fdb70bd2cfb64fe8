"""Worker pools for the converter: each job reads, merges and packs one row block in a worker, the parent only
writes finished blocks in file order.

Workers are forked once per conversion, after the tensor plan exists and before the vocabulary is read, so they
inherit the source (file names, adapter factors' locations) and share the parent's pages; a job is sent as a
few integers and only packed bytes travel back. This is used for numpy-native sources only: the workers never
import torch (forking a process whose OpenMP pool has run is not safe for the child's own OpenMP use).

On the GPU path the parent holds CUDA and cannot fork: :class:`ThreadWorkers` runs the same jobs in threads
(numpy releases the GIL in its large copies and reductions, so reading and merging overlap the GPU packing,
which :func:`llmforge.quant.api.quantize_array` serialises).
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import numpy as np

_TASK: Callable[..., Any] | None = None


def _run(*args: Any) -> Any:
    assert _TASK is not None, "worker forked without a task"
    return _TASK(*args)


def _ready() -> int:
    return os.getpid()


def _openblas() -> tuple[Callable[[int], Any], Callable[[], int]] | None:
    """(set_num_threads, get_num_threads) of the OpenBLAS bundled with numpy, or None where it is not found."""
    import ctypes
    import glob

    libs = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    for path in glob.glob(os.path.join(libs, "*openblas*")):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas_", "64_"), ("scipy_openblas_", ""), ("openblas_", "64_"),
                               ("openblas_", "")):
            setter = getattr(lib, f"{prefix}set_num_threads{suffix}", None)
            getter = getattr(lib, f"{prefix}get_num_threads{suffix}", None)
            if setter is not None and getter is not None:
                return setter, getter
    return None


def set_blas_threads(n: int) -> int | None:
    """Set numpy's OpenBLAS thread count; returns the previous count (None where the library is not found)."""
    blas = _openblas()
    if blas is None:
        return None
    setter, getter = blas
    previous = int(getter())
    setter(n)
    return previous


def single_threaded_blas() -> bool:
    """Limit numpy's OpenBLAS to one thread in this process. Workers already fill the cores (its idle threads
    spin, measured ~5 CPU-s of 18 on the 0.5B adapter benchmark), and every pool then runs the LoRA products
    with the same single-threaded kernels, so forked and threaded workers write the same bytes: a
    multi-threaded sgemm picks its kernels per thread tile, and an H100 host's 16 threads gave a merged
    tensor whose Q6_K bytes differed from the forked workers'. Returns False where the library is not found."""
    return set_blas_threads(1) is not None


def can_fork() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


class ForkWorkers:
    """``workers`` forked processes running ``task(*args)``; the task is inherited through fork, not pickled.

    One instance at a time per process (the task lives in a module global while the pool exists)."""

    def __init__(self, task: Callable[..., Any], workers: int):
        global _TASK
        if _TASK is not None:
            raise RuntimeError("another ForkWorkers pool is open in this process")
        _TASK = task
        self.workers = workers
        try:
            self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                             initializer=single_threaded_blas)
            self._pool.submit(_ready).result()  # fork now, while the parent is small
        except BaseException:
            _TASK = None
            raise

    def submit(self, *args: Any) -> Future:
        return self._pool.submit(_run, *args)

    def close(self) -> None:
        global _TASK
        self._pool.shutdown(wait=True, cancel_futures=True)
        _TASK = None

    def __enter__(self) -> ForkWorkers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ThreadWorkers:
    """``workers`` threads running ``task(*args)``, with :class:`ForkWorkers`' interface."""

    def __init__(self, task: Callable[..., Any], workers: int):
        self.task = task
        self.workers = workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="llmforge-export")
        self._blas_threads = set_blas_threads(1)   # as in ForkWorkers: same kernels, same bytes

    def submit(self, *args: Any) -> Future:
        return self._pool.submit(self.task, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._blas_threads is not None:
            set_blas_threads(self._blas_threads)


Item = np.ndarray | Future


def write_in_place(path: str | os.PathLike, offset: int, arrays: list[np.ndarray]) -> int:
    """Write ``arrays`` back to back at ``offset`` of an existing file (little-endian hosts); returns the bytes
    written. Workers put their blocks straight into the output file: nothing travels back to the parent."""
    fd = os.open(path, os.O_WRONLY)
    try:
        total = 0
        for array in arrays:
            view = memoryview(np.ascontiguousarray(array)).cast("B")
            while view:
                n = os.pwrite(fd, view, offset + total)
                view, total = view[n:], total + n
        return total
    finally:
        os.close(fd)


def in_order(streams: Iterable[Iterable[Item]], window: int) -> Iterator[tuple[int, np.ndarray | None]]:
    """Flatten per-tensor streams of arrays and futures into ``(tensor index, array)`` in order, resolving
    futures as late as possible: up to ``window`` futures are in flight while earlier ones are written.

    Each tensor starts with ``(index, None)`` (so empty tensors are seen too); a future may resolve to one
    array or a list of consecutive arrays."""
    pending: deque[tuple[int, Item | None]] = deque()
    in_flight = 0

    def drain(limit: int) -> Iterator[tuple[int, np.ndarray | None]]:
        nonlocal in_flight
        while pending and (in_flight > limit or not isinstance(pending[0][1], Future)):
            index, item = pending.popleft()
            if isinstance(item, Future):
                in_flight -= 1
                result = item.result()
                for array in (result if isinstance(result, list) else [result]):
                    yield index, array
            else:
                yield index, item

    for index, stream in enumerate(streams):
        pending.append((index, None))
        for item in stream:
            pending.append((index, item))
            if isinstance(item, Future):
                in_flight += 1
            yield from drain(window)
        yield from drain(window)
    yield from drain(-1)
