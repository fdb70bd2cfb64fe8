"""A fast GGUF header reader: KV values and tensor infos, without decoding big arrays.

``gguf.GGUFReader`` builds a numpy view for every vocabulary string (tens of seconds for a 256k vocabulary);
this reads scalars and strings, keeps arrays of up to ``max_array`` items, and for longer ones records only
their length and item type.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGUFValueType

_SCALARS: dict[int, str] = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = GGUFValueType.STRING, GGUFValueType.ARRAY
GGUF_MAGIC = 0x46554747


@dataclass(frozen=True)
class LongArray:
    """An array KV too long to keep: its length and item type."""

    count: int
    item_type: GGUFValueType


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]   # numpy order (ne reversed)
    qtype: int
    offset: int              # relative to the data section


@dataclass
class GGUFHeader:
    version: int
    kv: dict[str, Any]
    tensors: list[TensorInfo]
    data_start: int
    alignment: int
    file_size: int


def read_header(path: str | Path, max_array: int = 64) -> GGUFHeader:
    """Parse ``path``'s GGUF header (raises ``ValueError`` on a malformed file)."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise ValueError("the file is empty")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        try:
            return _parse(m, max_array, size)
        except struct.error as exc:
            raise ValueError(f"truncated GGUF header: the file ends at byte {size}") from exc


def _parse(m: mmap.mmap, max_array: int, size: int) -> GGUFHeader:
    magic, version, n_tensors, n_kv = struct.unpack_from("<IIQQ", m, 0)
    if magic != GGUF_MAGIC:
        raise ValueError(f"not a GGUF file (magic {magic:#x})")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    pos = 24

    def read_str(p: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", m, p)
        if p + 8 + n > size:
            raise ValueError("string runs past the end of the file")
        return m[p + 8:p + 8 + n].decode("utf-8", errors="replace"), p + 8 + n

    def read_value(vtype: int, p: int) -> tuple[Any, int]:
        if vtype == _STRING:
            return read_str(p)
        fmt = _SCALARS[vtype]
        return struct.unpack_from("<" + fmt, m, p)[0], p + struct.calcsize(fmt)

    kv: dict[str, Any] = {}
    for _ in range(n_kv):
        key, pos = read_str(pos)
        (vtype,) = struct.unpack_from("<I", m, pos)
        pos += 4
        if vtype == _ARRAY:
            item, count = struct.unpack_from("<IQ", m, pos)
            pos += 12
            if count <= max_array:
                items = []
                for _ in range(count):
                    value, pos = read_value(item, pos)
                    items.append(value)
                kv[key] = items
            else:
                if item == _STRING:
                    for _ in range(count):
                        (n,) = struct.unpack_from("<Q", m, pos)
                        pos += 8 + n
                else:
                    pos += struct.calcsize(_SCALARS[item]) * count
                kv[key] = LongArray(count, GGUFValueType(item))
        else:
            kv[key], pos = read_value(vtype, pos)
    alignment = int(kv.get("general.alignment", 32))
    tensors = []
    for _ in range(n_tensors):
        name, pos = read_str(pos)
        (n_dims,) = struct.unpack_from("<I", m, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", m, pos + 4)
        qtype, offset = struct.unpack_from("<IQ", m, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        tensors.append(TensorInfo(name, tuple(int(d) for d in reversed(dims)), qtype, offset))
    data_start = (pos + alignment - 1) // alignment * alignment
    return GGUFHeader(version, kv, tensors, data_start, alignment, size)


def truncated_tensor(header: GGUFHeader) -> tuple[str, int] | None:
    """The first tensor whose data runs past the end of the file, with the file size it needs; None when
    every tensor's data is there (a cut-off download or copy)."""
    from gguf.constants import GGML_QUANT_SIZES

    for t in header.tensors:
        sizes = GGML_QUANT_SIZES.get(t.qtype)
        if sizes is None:
            continue
        block, type_size = sizes
        count = 1
        for d in t.shape:
            count *= d
        end = header.data_start + t.offset + count // block * type_size
        if end > header.file_size:
            return t.name, end
    return None
