"""Whole-file requantization on the K-quant worker pool: each task reads a row range of one tensor from the
input GGUF, packs it and writes it in place into the output file.

The parent process only submits tasks: a tensor's all at once, the next tensor's as soon as the writer (which
resolves them in file order) has at most its window of earlier ones unfinished. So while tensor i's last tasks
finish, the helpers already read and pack tensor i+1, and nothing but a byte count travels back (no copy of
the input or output through the parent). Every packed type goes this
way -- K-types, Q8_0 and Q4_0..Q5_1 (with or without importance) -- through
:func:`llmforge.quant.api.quantize_array` in the helper, so the bytes are those of the one-process path.
"""

from __future__ import annotations

from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import quant_shape_to_byte_shape

from ..export.parallel import write_in_place
from .api import quantize_array
from .kquants import K_TYPES, drop_worker_pool, worker_pool

POOLED_TYPES = frozenset(K_TYPES) | {T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1}
TASK_ELEMENTS = 1 << 20          # 4 MB of f32 per task: 10-100 ms of K-quant packing per task
# Q8_0 packs ~1 GB/s per core: 4x larger tasks keep the parent's ~0.4 ms per task (submit, result) off the
# critical path on many cores
_TASK_SCALE = {T.Q8_0: 4}
WINDOW_PER_WORKER = 4            # tasks in flight per helper while the parent waits for the oldest one
_SOURCE_DTYPES = {T.F32: np.float32, T.F16: np.float16, T.BF16: np.uint16}


@dataclass(frozen=True)
class TensorTask:
    """One tensor to pack: where its data is in the input file, and where its bytes go in the output file."""

    name: str
    src_path: str
    src_offset: int                      # absolute offset of the tensor's data in ``src_path``
    src_type: T                          # F32, F16 or BF16
    shape: tuple[int, ...]               # numpy order: (..., rows, cols)
    qtype: T
    importance: np.ndarray | None        # (cols,) or, for a 3-D tensor, (n_expert, cols)
    dst_path: str
    dst_offset: int                      # absolute offset of the tensor's data in ``dst_path``

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def row_bytes(self) -> int:
        return int(quant_shape_to_byte_shape((self.cols,), self.qtype)[0])


def _read_rows(task: TensorTask, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` (of the tensor flattened to 2-D) as float32, read from the input file (exact from
    f16/bf16)."""
    dtype = np.dtype(_SOURCE_DTYPES[task.src_type])
    count = (stop - start) * task.cols
    offset = task.src_offset + start * task.cols * dtype.itemsize
    raw = np.fromfile(task.src_path, dtype=dtype, count=count, offset=offset)
    if raw.size != count:
        raise ValueError(f"{task.src_path}: tensor {task.name!r} is cut short")
    if task.src_type == T.BF16:
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(-1, task.cols)
    return raw.astype(np.float32, copy=False).reshape(-1, task.cols)


def pack_rows(task: TensorTask, start: int, stop: int, expert: int) -> int:
    """Helper task: rows ``start:stop`` read, checked for NaN/Inf (one line naming the tensor), packed and
    written at their place in the output; returns the bytes written. ``expert``: the 3-D tensor's slice
    these rows lie in (selects the importance row)."""
    importance = task.importance
    if importance is not None and importance.ndim == 2:
        importance = importance[expert]
    packed = quantize_array(_read_rows(task, start, stop), task.qtype, importance, name=task.name, threads=1)
    return write_in_place(task.dst_path, task.dst_offset + start * task.row_bytes, [packed])


def row_ranges(shape: tuple[int, ...], task_elements: int | None = None) -> list[tuple[int, int, int]]:
    """``(start, stop, expert)`` row ranges of about ``task_elements`` (default :data:`TASK_ELEMENTS`) each,
    none crossing a 3-D tensor's expert slices."""
    task_elements = task_elements or TASK_ELEMENTS
    rows_per_expert = shape[-2] if len(shape) == 3 else int(np.prod(shape[:-1]))
    n_expert = shape[0] if len(shape) == 3 else 1
    step = max(1, task_elements // shape[-1])
    return [(e * rows_per_expert + s, e * rows_per_expert + min(s + step, rows_per_expert), e)
            for e in range(n_expert) for s in range(0, rows_per_expert, step)]


class FilePacker:
    """Submits :class:`TensorTask` row ranges to the K-quant pool (``workers`` helpers); use as a context
    manager around the writer, which resolves the futures in file order (``window`` of them in flight)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = worker_pool(workers)
        self.futures: list[Future] = []

    @property
    def window(self) -> int:
        return WINDOW_PER_WORKER * self.workers

    def submit(self, task: TensorTask) -> list[Future]:
        """The tensor's tasks, in row order; each resolves to the bytes it wrote in place."""
        futures = [self.pool.submit(pack_rows, task, start, stop, expert)
                   for start, stop, expert in row_ranges(task.shape, TASK_ELEMENTS * _TASK_SCALE.get(task.qtype, 1))]
        self.futures = [f for f in self.futures if not f.done()] + futures
        return futures

    def __enter__(self) -> FilePacker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            return
        if isinstance(exc, BrokenProcessPool):
            drop_worker_pool()       # a helper died (e.g. the OOM killer): the next call forks a fresh pool
            return
        for f in self.futures:       # a failed file: no task may go on writing into it
            f.cancel()
        for f in self.futures:
            if not f.cancelled():
                f.exception()
