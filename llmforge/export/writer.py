"""A streaming GGUF writer on top of ``gguf.GGUFWriter``: plan every tensor, then write data one at a time.

``GGUFWriter.add_tensor`` keeps every array until the end (gguf-py issue #29078). Here the caller declares
each tensor's name, shape and ggml type up front; the header, KVs and tensor infos are written; then a
``produce`` callback makes each tensor's bytes just in time, so peak memory is about one tensor. The file is
built under a temporary name, read back with ``GGUFReader`` and renamed into place only if it checks out.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import quant_shape_to_byte_shape

from ..atomic import atomic_path
from ..errors import LlmforgeError

QUANTIZATION_VERSION = 2


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the output file: GGUF name, numpy-order element shape, ggml type."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    source: object = None  # free slot for the caller (e.g. the HF name this tensor comes from)

    @property
    def nbytes(self) -> int:
        return math.prod(quant_shape_to_byte_shape(self.shape, self.qtype)) if self.shape else 0

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass
class WriteResult:
    path: Path
    n_tensors: int
    bytes_written: int
    checks: list[str] = field(default_factory=list)


class Progress:
    """Progress on stderr: an updating line on a terminal, a line every ~10% otherwise."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.enabled = total, label, enabled
        self.tty = sys.stderr.isatty()
        self.start = time.monotonic()
        self.last_decile = -1

    def update(self, done: int, what: str = "") -> None:
        if not self.enabled or self.total == 0:
            return
        decile = done * 10 // self.total
        if self.tty:
            sys.stderr.write(f"\r{self.label} {done}/{self.total} {what[:48]:<48}")
            if done == self.total:
                sys.stderr.write(f"  {time.monotonic() - self.start:.1f}s\n")
            sys.stderr.flush()
        elif decile != self.last_decile or done == self.total:
            sys.stderr.write(f"{self.label} {done}/{self.total} ({time.monotonic() - self.start:.1f}s)\n")
            sys.stderr.flush()
        self.last_decile = decile


class StreamingGGUFWriter:
    """Plan tensors, set KVs through ``.gguf`` (a ``GGUFWriter``), then :meth:`write` streams the data.

    Example::

        w = StreamingGGUFWriter("llama")
        w.gguf.add_name("tiny")
        w.plan("token_embd.weight", (vocab, n_embd), GGMLQuantizationType.F16)
        w.write(path, lambda t: make_bytes(t))
    """

    def __init__(self, arch: str):
        self.arch = arch
        self.gguf = GGUFWriter(path=None, arch=arch)
        self.tensors: list[PlannedTensor] = []
        self._names: set[str] = set()

    def plan(self, name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType, source: object = None) -> PlannedTensor:
        """Declare the next tensor of the file (file order = call order)."""
        if name in self._names:
            raise ValueError(f"duplicate GGUF tensor name {name!r}")
        if len(name.encode()) > 63:
            raise ValueError(f"GGUF tensor name too long: {name!r}")
        planned = PlannedTensor(name, tuple(int(d) for d in shape), GGMLQuantizationType(qtype), source)
        self.tensors.append(planned)
        self._names.add(name)
        return planned

    def write(self, target: str | Path, produce: Callable[[PlannedTensor], np.ndarray], *,
              progress: bool = True) -> WriteResult:
        """Write the file atomically; ``produce(t)`` returns t's data (float array or packed uint8 bytes)."""
        target = Path(target)
        with atomic_path(target) as tmp:
            for t in self.tensors:
                self.gguf.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
            self.gguf.write_header_to_file(path=tmp)
            self.gguf.write_kv_data_to_file()
            self.gguf.write_ti_data_to_file()
            bar = Progress(len(self.tensors), f"writing {target.name}", progress)
            for i, t in enumerate(self.tensors, 1):
                data = np.ascontiguousarray(produce(t))
                if data.nbytes != t.nbytes:
                    raise RuntimeError(f"{t.name}: produced {data.nbytes} bytes, planned {t.nbytes} "
                                       f"({t.qtype.name} {t.shape})")
                self.gguf.write_tensor_data(data)
                del data
                bar.update(i, t.name)
            self.gguf.close()
            checks = [verify_gguf(tmp, self.tensors)]
            size = tmp.stat().st_size
        return WriteResult(target, len(self.tensors), size, checks)


def verify_gguf(path: Path, planned: list[PlannedTensor]) -> str:
    """Read ``path`` back with ``GGUFReader``: every planned tensor present with its shape and type."""
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # a reader failure means we wrote a broken file: that is a bug, say so clearly
        raise RuntimeError(f"read-back of {path} failed: {exc}") from exc
    found = {t.name: t for t in reader.tensors}
    problems = []
    for p in planned:
        t = found.pop(p.name, None)
        if t is None:
            problems.append(f"{p.name} missing")
            continue
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if shape != p.shape or t.tensor_type != p.qtype:
            problems.append(f"{p.name}: {t.tensor_type.name}{shape} != planned {p.qtype.name}{p.shape}")
    problems += [f"unexpected tensor {n}" for n in found]
    del reader
    if problems:
        raise RuntimeError(f"read-back check of {path} failed: " + "; ".join(problems[:5]))
    return f"read back {len(planned)} tensors: names, shapes, types as planned"


def check_disk_space(target: Path, needed: int) -> None:
    """Fail early, with a clear line, when the output folder's disk cannot hold ``needed`` bytes."""
    import shutil

    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        return  # atomic_path reports the missing folder
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise LlmforgeError(f"not enough disk space for {target}: need {needed / 2**20:.1f} MiB, "
                            f"{free / 2**20:.1f} MiB free", hint="free some space or write elsewhere with -o")
