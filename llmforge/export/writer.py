"""A streaming GGUF writer on top of ``gguf.GGUFWriter``: plan every tensor, then write data one at a time.

``GGUFWriter.add_tensor`` keeps every array until the end (gguf-py issue #29078). Here the caller declares
each tensor's name, shape and ggml type up front; the header, KVs and tensor infos are written; then a
``produce`` callback makes each tensor's bytes just in time, so peak memory is about one tensor. The file is
built under a temporary name, its header read back (names, shapes, types, offsets; see ``gguf_header``)
and renamed into place only if it checks out.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import struct

from gguf import GGMLQuantizationType, GGUFEndian, GGUFValueType, GGUFWriter
from gguf.quants import quant_shape_to_byte_shape

from ..atomic import atomic_path
from ..errors import LlmforgeError
from .gguf_header import read_header
from .parallel import Item as Chunk
from .parallel import in_order

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


class FastArrayGGUFWriter(GGUFWriter):
    """``GGUFWriter`` whose homogeneous string/float/int arrays pack in one go (the vocabulary has 10^5-10^6
    strings; gguf-py packs them one ``struct.pack`` at a time). Same bytes as gguf-py writes."""

    _ARRAY_FORMATS = {GGUFValueType.FLOAT32: "f", GGUFValueType.INT32: "i", GGUFValueType.UINT32: "I"}

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype != GGUFValueType.ARRAY or not isinstance(val, (list, tuple)) or len(val) < 64 \
                or self.endianess != GGUFEndian.LITTLE:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        first = val[0]
        ltype = sub_type if sub_type is not None else GGUFValueType.get_type(first)
        head = (struct.pack("<I", vtype) if add_vtype else b"") + struct.pack("<IQ", ltype, len(val))
        if ltype == GGUFValueType.STRING and all(isinstance(v, str) for v in val):
            parts = [head]
            for item in val:
                b = item.encode("utf-8")
                parts.append(struct.pack("<Q", len(b)))
                parts.append(b)
            return b"".join(parts)
        fmt = self._ARRAY_FORMATS.get(ltype)
        if fmt is not None and (sub_type is not None or all(type(v) is type(first) for v in val)):
            return head + struct.pack(f"<{len(val)}{fmt}", *val)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


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
        self.gguf = FastArrayGGUFWriter(path=None, arch=arch)
        self.tensors: list[PlannedTensor] = []
        self._names: set[str] = set()
        self.data_offsets: dict[str, int] | None = None   # set once the header is written
        self.path: Path | None = None

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

    def write(self, target: str | Path, produce: Callable[[PlannedTensor], np.ndarray | Iterable[Chunk]], *,
              progress: bool = True, window: int = 0) -> WriteResult:
        """Write the file atomically; ``produce(t)`` returns t's data (float array or packed uint8 bytes),
        or an iterable of consecutive row blocks of it (so a big tensor never has to be in memory whole).
        Blocks may be futures (of an array, a list of arrays, or an int: that many bytes already written in
        place at their position, see :attr:`data_offsets`): up to ``window`` of them stay in flight, over
        tensor boundaries, while earlier blocks are written in file order."""
        target = Path(target)
        with atomic_path(target) as tmp:
            for t in self.tensors:
                self.gguf.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
            try:
                self._write_all(tmp, target, produce, progress, window)
            finally:
                self.gguf.close()  # also on failure, so the temp file's handle is released before removal
            checks = [verify_gguf(tmp, self.tensors)]
            size = tmp.stat().st_size
        return WriteResult(target, len(self.tensors), size, checks)

    def write_in_place(self, target: str | Path, fill: Callable[[int], None]) -> WriteResult:
        """Write the file atomically with the data written by ``fill(fd)``: header, KVs and tensor infos
        first, the file sized to its end, then ``fill`` writes every tensor's bytes with ``os.pwrite`` at
        :attr:`data_offsets` (from any number of threads, in any order); padding is left as zeros. Same
        bytes as :meth:`write`."""
        target = Path(target)
        with atomic_path(target) as tmp:
            for t in self.tensors:
                self.gguf.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
            try:
                self.write_header(tmp)
                self.gguf.fout[0].flush()
                fd = os.open(tmp, os.O_RDWR)   # read-write: fill may map it
                try:
                    os.ftruncate(fd, self.data_end())
                    fill(fd)
                finally:
                    os.close(fd)
                self.gguf.tensors = [{}]  # all data written (GGUFWriter.close() checks nothing else)
            finally:
                self.gguf.close()
            checks = [verify_gguf(tmp, self.tensors)]
            size = tmp.stat().st_size
        return WriteResult(target, len(self.tensors), size, checks)

    def data_end(self) -> int:
        """Size of the file once written: the last tensor's data start plus its padded size (after
        :meth:`write_header`)."""
        if self.data_offsets is None:
            raise RuntimeError("write_header first")
        if not self.tensors:
            return self.gguf.fout[0].tell()
        last = self.tensors[-1]
        return self.data_offsets[last.name] + GGUFWriter.ggml_pad(last.nbytes, self.gguf.data_alignment)

    def write_header(self, path: Path) -> None:
        """Header, KVs and tensor infos (called by :meth:`write`); then :attr:`data_offsets` holds where each
        tensor's data starts in ``path`` (:attr:`path`), so other processes can write blocks in place."""
        self.gguf.write_header_to_file(path=path)
        self.gguf.write_kv_data_to_file()
        self.gguf.write_ti_data_to_file()
        align = self.gguf.data_alignment
        offset = GGUFWriter.ggml_pad(self.gguf.fout[0].tell(), align)
        self.data_offsets = {}
        for t in self.tensors:
            self.data_offsets[t.name] = offset
            offset += GGUFWriter.ggml_pad(t.nbytes, align)
        self.path = path

    def _write_all(self, tmp: Path, target: Path, produce: Callable[[PlannedTensor], np.ndarray | Iterable[Chunk]],
                   progress: bool, window: int) -> None:
        self.write_header(tmp)
        bar = Progress(len(self.tensors), f"writing {target.name}", progress)
        fout = self.gguf.fout[0]

        def streams() -> Iterator[Iterable[Chunk]]:
            for t in self.tensors:
                produced = produce(t)
                yield [produced] if isinstance(produced, np.ndarray) else produced

        current, written = -1, 0
        for index, chunk in in_order(streams(), window):
            if chunk is None:  # tensor ``index`` starts
                if current >= 0:
                    self._finish_tensor(fout, self.tensors[current], written)
                    bar.update(current + 1, self.tensors[current].name)
                current, written = index, 0
                self.gguf.write_padding(fout, fout.tell())
            elif isinstance(chunk, int):  # written in place by another process: skip over it
                fout.seek(chunk, os.SEEK_CUR)
                written += chunk
            else:
                written += self._write_chunk(fout, chunk)
        if current >= 0:
            self._finish_tensor(fout, self.tensors[current], written)
            bar.update(current + 1, self.tensors[current].name)
        self.gguf.tensors = [{}]  # all data written (GGUFWriter.close() checks nothing else)

    def _finish_tensor(self, fout, t: PlannedTensor, written: int) -> None:
        if written != t.nbytes:
            raise RuntimeError(f"{t.name}: produced {written} bytes, planned {t.nbytes} "
                               f"({t.qtype.name} {t.shape})")
        self.gguf.write_padding(fout, written)

    @staticmethod
    def _write_chunk(fout, chunk: np.ndarray) -> int:
        chunk = np.ascontiguousarray(chunk)
        if sys.byteorder != "little":
            chunk = chunk.byteswap()
        # through the file object, not ndarray.tofile: a full disk then raises OSError(ENOSPC), which
        # atomic_path reports as one line (tofile's short-write error carries no errno)
        fout.write(chunk.reshape(-1).view(np.uint8).data)
        return chunk.nbytes


def verify_gguf(path: Path, planned: list[PlannedTensor]) -> str:
    """Read ``path``'s header back: every planned tensor present, shape and type as planned, data in the file."""
    try:
        header = read_header(path)
    except Exception as exc:  # a broken header is our bug, not the user's
        raise RuntimeError(f"read-back of {path} failed: {exc}") from exc
    infos = {t.name: (t.shape, t.qtype, t.offset) for t in header.tensors}
    data_start, alignment = header.data_start, header.alignment
    problems = []
    expected_offset = 0
    for p in planned:
        info = infos.pop(p.name, None)
        if info is None:
            problems.append(f"{p.name} missing")
            continue
        shape, qtype, offset = info
        if shape != p.shape or qtype != p.qtype:
            problems.append(f"{p.name}: {GGMLQuantizationType(qtype).name}{shape} != planned {p.qtype.name}{p.shape}")
        if offset != expected_offset:
            problems.append(f"{p.name}: data offset {offset}, expected {expected_offset}")
        expected_offset = offset + (p.nbytes + alignment - 1) // alignment * alignment
    problems += [f"unexpected tensor {n}" for n in infos]
    size = path.stat().st_size
    if planned and size < data_start + expected_offset - alignment + 1:
        problems.append(f"file has {size} bytes, tensor data needs {data_start + expected_offset}")
    if problems:
        raise RuntimeError(f"read-back check of {path} failed: " + "; ".join(problems[:5]))
    return f"read back {len(planned)} tensors: names, shapes, types, offsets as planned"


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
