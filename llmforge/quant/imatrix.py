"""llama.cpp importance matrices: read and write both file formats, turn them into per-tensor weights.

Formats (llama.cpp 0c1e570, ``common/imatrix-loader.cpp`` and ``tools/imatrix/imatrix.cpp``):

- GGUF (current): ``general.type = "imatrix"``, ``imatrix.datasets`` (string array), ``imatrix.chunk_count``
  and ``imatrix.chunk_size`` (u32); per tensor ``<name>.in_sum2`` (f32, ne = [ne0, n_mat]) and
  ``<name>.counts`` (f32, ne = [1, n_mat]). Weights = in_sum2 / round(count), or 1 where count is 0.
- legacy ``.dat``: int32 n_entries; per entry int32 name length, name, int32 ncall, int32 nval,
  float32[nval]; optionally int32 chunk count, int32 length, dataset name. Weights = values / ncall.

``llama-quantize`` hands the normalised weights to the quantizers; :func:`load_imatrix` does the same.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..errors import LlmforgeError

GGUF_MAGIC = b"GGUF"


@dataclass
class ImatrixEntry:
    """Raw statistics of one tensor: squared-activation sums (n_mat, ne0) and call counts (n_mat,)."""

    sums: np.ndarray
    counts: np.ndarray

    def weights(self, legacy: bool) -> np.ndarray:
        """The per-column importance llama.cpp's quantizers receive (float32, flattened over matrices)."""
        sums = self.sums.astype(np.float32)
        if legacy:
            ncall = int(self.counts[0]) if self.counts.size else 0
            return (sums / np.float32(ncall) if ncall > 0 else sums).reshape(-1)
        counts = self.counts.astype(np.float32).reshape(-1, 1)
        out = np.where(counts > 0, sums / np.where(counts > 0, counts, np.float32(1)), np.float32(1))
        return out.astype(np.float32).reshape(-1)


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False

    def importance(self) -> dict[str, np.ndarray]:
        return {name: e.weights(self.legacy) for name, e in self.entries.items()}


def _bad(path: Path, what: str) -> LlmforgeError:
    return LlmforgeError(f"{path}: not a llama.cpp imatrix file ({what})",
                         hint="pass a file written by llama-imatrix (.gguf or legacy .dat)")


def read_imatrix(path: str | Path) -> Imatrix:
    """Read either format (GGUF detected by its magic)."""
    path = Path(path)
    if not path.is_file():
        raise LlmforgeError(f"imatrix file {path} {'is a folder' if path.is_dir() else 'does not exist'}",
                            hint="check the --imatrix path")
    with open(path, "rb") as f:
        magic = f.read(4)
    return _read_gguf(path) if magic == GGUF_MAGIC else _read_legacy(path)


def _read_gguf(path: Path) -> Imatrix:
    from gguf import GGUFReader

    from ..export.gguf_header import read_header, truncated_tensor

    try:
        short = truncated_tensor(read_header(path))
    except ValueError as exc:
        raise _bad(path, f"unreadable GGUF: {exc}") from None
    if short is not None:   # gguf-py's reader would fail on it with a numpy reshape message
        raise LlmforgeError(f"imatrix file {path} is truncated: tensor {short[0]} needs {short[1]} bytes, the file "
                            f"has {path.stat().st_size}", hint="copy it again, or re-run llama-imatrix")
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # gguf-py raises bare ValueErrors on damaged files
        raise _bad(path, f"unreadable GGUF: {exc}") from None

    def field_value(key: str):
        f = reader.get_field(key)
        return None if f is None else f.contents()

    datasets, chunk_count, chunk_size = (field_value("imatrix.datasets"), field_value("imatrix.chunk_count"),
                                         field_value("imatrix.chunk_size"))
    if datasets is None or chunk_count is None or chunk_size is None:
        raise _bad(path, "GGUF without imatrix.datasets/chunk_count/chunk_size metadata")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        data = np.asarray(t.data, dtype=np.float32)
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = data.reshape(-1, int(t.shape[0]))
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = data.reshape(-1)
    if not sums or set(sums) != set(counts):
        raise _bad(path, "missing or mismatched .in_sum2/.counts tensors")
    entries = {n: ImatrixEntry(sums[n], np.rint(counts[n]).astype(np.int64)) for n in sorted(sums)}
    return Imatrix(entries, list(datasets), int(chunk_count), int(chunk_size), legacy=False)


def _read_legacy(path: Path) -> Imatrix:
    raw = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(raw):
            raise _bad(path, "truncated")
        out = struct.unpack_from(fmt, raw, pos)
        pos += size
        return out

    (n_entries,) = take("<i")
    if n_entries < 1 or n_entries > 1_000_000:
        raise _bad(path, "no entries")
    entries: dict[str, ImatrixEntry] = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if length < 0 or pos + length > len(raw):
            raise _bad(path, "bad entry name")
        name = raw[pos:pos + length].decode("utf-8", errors="replace")
        pos += length
        ncall, nval = take("<ii")
        if nval < 1 or pos + 4 * nval > len(raw):
            raise _bad(path, f"bad value count for {name!r}")
        values = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        entries[name] = ImatrixEntry(values.reshape(1, -1), np.array([ncall], dtype=np.int64))
    chunk_count, datasets = 0, []
    if pos + 4 <= len(raw):
        (chunk_count,) = take("<i")
        if pos + 4 <= len(raw):
            (length,) = take("<i")
            if length > 0 and pos + length <= len(raw):
                datasets.append(raw[pos:pos + length].decode("utf-8", errors="replace"))
    return Imatrix(entries, datasets, chunk_count, 0, legacy=True)


def write_imatrix(path: str | Path, imatrix: Imatrix | Mapping[str, np.ndarray], *, legacy: bool = False,
                  datasets: tuple[str, ...] = ("llmforge",), chunk_count: int = 1, chunk_size: int = 512) -> Path:
    """Write an imatrix (an :class:`Imatrix`, or ``{tensor name: per-column importance}``) atomically."""
    if not isinstance(imatrix, Imatrix):
        imatrix = Imatrix({n: ImatrixEntry(np.asarray(v, np.float32).reshape(1, -1), np.array([1]))
                           for n, v in imatrix.items()}, list(datasets), chunk_count, chunk_size, legacy)
    path = Path(path)
    with atomic_path(path) as tmp:
        if legacy:
            _write_legacy(tmp, imatrix)
        else:
            _write_gguf(tmp, imatrix)
    return path


def _write_legacy(tmp: Path, im: Imatrix) -> None:
    parts = [struct.pack("<i", len(im.entries))]
    for name, e in im.entries.items():
        encoded = name.encode()
        values = e.sums.astype("<f4").reshape(-1)
        parts += [struct.pack("<i", len(encoded)), encoded,
                  struct.pack("<ii", int(e.counts[0]) if e.counts.size else 0, values.size), values.tobytes()]
    dataset = (im.datasets[0] if im.datasets else "").encode()
    parts += [struct.pack("<i", im.chunk_count), struct.pack("<i", len(dataset)), dataset]
    tmp.write_bytes(b"".join(parts))


def _write_gguf(tmp: Path, im: Imatrix) -> None:
    from gguf import GGUFWriter

    w = GGUFWriter(tmp, arch="")   # an empty architecture string is not written: imatrix files have none
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", list(im.datasets) or ["llmforge"])
    w.add_uint32("imatrix.chunk_count", im.chunk_count)
    w.add_uint32("imatrix.chunk_size", im.chunk_size)
    for name in sorted(im.entries):
        e = im.entries[name]
        sums = np.ascontiguousarray(e.sums, dtype=np.float32).reshape(e.counts.size, -1)
        w.add_tensor(f"{name}.in_sum2", sums)
        w.add_tensor(f"{name}.counts", e.counts.astype(np.float32).reshape(-1, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def load_imatrix(path: str | Path, tensor_shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """Per-tensor importance as ``llama-quantize`` computes it; checked against the model when given.

    ``tensor_shapes``: ``{gguf name: numpy shape}`` of the tensors that will be quantized. An entry of a
    model tensor must have ne[0] * n_expert values (token_embd is dropped, as llama.cpp ignores it), and
    at least one entry must name a model tensor.
    """
    path = Path(path)
    importance = read_imatrix(path).importance()
    if tensor_shapes is None:
        return importance
    matched: dict[str, np.ndarray] = {}
    for name, shape in tensor_shapes.items():
        values = importance.get(name)
        if values is None or len(shape) < 2:
            continue
        expected = shape[-1] * (shape[0] if len(shape) == 3 else 1)
        if values.size != expected:
            if name == "token_embd.weight":
                continue
            raise LlmforgeError(f"imatrix {path} has {values.size} values for {name}, the model needs {expected}",
                                hint="the importance matrix was computed for a different model")
        if not np.isfinite(values).all():
            raise LlmforgeError(f"imatrix {path} holds NaN/Inf for {name}", hint="recompute the importance matrix")
        matched[name] = values.reshape(shape[0], -1) if len(shape) == 3 else values
    if not matched:
        raise LlmforgeError(f"imatrix {path} names none of the model's tensors",
                            hint="the importance matrix was computed for a different model")
    return matched
