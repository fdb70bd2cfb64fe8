"""Where tensors come from: one Hugging Face tensor at a time, never the whole model.

The converter reads weights only through a :class:`TensorSource`, so wrappers (for example a LoRA merge that
overrides :meth:`TensorSource.load`) can change tensors layer by layer without the converter knowing.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import LlmforgeError

if TYPE_CHECKING:
    import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype strings -> numpy dtypes as stored (BF16: raw 16-bit words). The header is read directly,
# so shapes/dtypes cost no tensor I/O, and reading arrays needs no torch (importing it costs ~180 MiB).
STORED_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype string (imports torch)."""
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
            "BOOL": torch.bool}[name]


def dtype_name_of(dtype: torch.dtype) -> str:
    """The safetensors dtype string of a torch dtype."""
    return next(n for n in STORED_DTYPES if torch_dtype(n) == dtype)


def widen(raw: np.ndarray, dtype: str) -> np.ndarray:
    """A stored array as float32 (exact for BF16/F16/F32; F64 rounds like torch's ``.float()``); other dtypes
    as stored."""
    if dtype == "BF16":
        out = np.empty(raw.shape, dtype=np.float32)
        bits = out.view(np.uint32)
        bits[...] = raw
        bits <<= 16
        return out
    if dtype in FLOAT_DTYPES:
        return raw.astype(np.float32, copy=False)
    return raw


def read_array(path: Path, data_start: int, info: dict, start: int | None = None, stop: int | None = None,
               where: str = "") -> np.ndarray:
    """Rows ``start:stop`` (first axis; all when None) of one safetensors tensor as a numpy array of its stored
    type, read with plain file I/O (nothing stays mapped)."""
    shape = tuple(int(d) for d in info["shape"])
    dtype = STORED_DTYPES[info["dtype"]]
    row = math.prod(shape[1:]) if shape else 1
    rows = shape[0] if shape else 1
    start = 0 if start is None else max(0, min(start, rows))
    stop = rows if stop is None else max(start, min(stop, rows))
    count = (stop - start) * row
    offset = data_start + int(info["data_offsets"][0]) + start * row * dtype.itemsize
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = np.fromfile(f, dtype=dtype, count=count)
    except OSError as exc:
        raise LlmforgeError(f"cannot read tensor {where!r} from {path} ({exc})",
                            hint="re-download or re-save the checkpoint") from exc
    if data.size != count:
        raise LlmforgeError(f"{path} is truncated: tensor {where!r} is incomplete",
                            hint="re-download or re-save the checkpoint")
    return data.reshape(((stop - start), *shape[1:]) if shape else ())


def data_start_of(path: Path) -> int:
    """Where a safetensors file's tensor data begins (after the 8-byte length and the JSON header)."""
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


class TensorSource:
    """A read-only set of named Hugging Face tensors, loaded one at a time.

    Subclasses implement :meth:`names`, :meth:`shape`, :meth:`dtype` and :meth:`load`; wrappers may
    delegate to an inner source and override only :meth:`load`.
    """

    def names(self) -> list[str]:
        """Hugging Face tensor names in file order."""
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape (torch order), without loading it."""
        raise NotImplementedError

    def dtype(self, name: str) -> torch.dtype:
        """The tensor's stored dtype, without loading it."""
        raise NotImplementedError

    def dtype_name(self, name: str) -> str:
        """The stored dtype as a safetensors string ("BF16", "F32", ...), without loading it."""
        return dtype_name_of(self.dtype(name))

    def load(self, name: str) -> torch.Tensor:
        """Load one tensor into memory."""
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        return name in set(self.names())

    @property
    def supports_row_slices(self) -> bool:
        """True when :meth:`load_rows` reads only the rows asked for (the converter then streams big tensors
        in row blocks instead of loading them whole)."""
        return False

    def load_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (first axis) of one tensor; by default sliced from :meth:`load`."""
        return self.load(name)[start:stop]

    # -- the numpy side: sources that can be read without torch say so with ``numpy_native``; the converter
    #    then stays in numpy (float tensors come as float32) and may read row blocks in worker processes

    @property
    def numpy_native(self) -> bool:
        """True when :meth:`load_array`/:meth:`load_rows_array` work without torch."""
        return False

    def streams_rows(self, name: str) -> bool:
        """True when :meth:`load_rows_array` on ``name`` reads only the rows asked for (no whole-tensor work)."""
        return self.numpy_native and self.supports_row_slices

    def load_array(self, name: str) -> np.ndarray:
        """One tensor as numpy: float dtypes as float32, others as stored; a fresh array the caller may change."""
        t = self.load(name)
        return t.float().numpy() if t.is_floating_point() else t.numpy()

    def load_rows_array(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.load_array(name)[start:stop]


def _read_header(path: Path) -> dict:
    """Parse a safetensors header, checking that every tensor's bytes lie inside the file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or 8 + n > size:
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise LlmforgeError(f"{path} is not a valid safetensors file ({exc})",
                            hint="re-download or re-save the checkpoint") from exc
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
            dtype, shape = info["dtype"], info["shape"]
        except (KeyError, TypeError, ValueError) as exc:
            raise LlmforgeError(f"{path}: malformed header entry for {name!r}",
                                hint="re-download or re-save the checkpoint") from exc
        if dtype not in STORED_DTYPES:
            raise LlmforgeError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        if end > data_size or start > end:
            raise LlmforgeError(f"{path} is truncated: tensor {name!r} ends at byte {8 + n + end} "
                                f"but the file has {size} bytes", hint="re-download or re-save the checkpoint")
    return header


class SafetensorsSource(TensorSource):
    """Tensors of a Hugging Face model folder: ``model.safetensors`` or shards listed in the index json."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self._file_of: dict[str, Path] = {}
        self._info: dict[str, dict] = {}
        self._data_start: dict[Path, int] = {}
        for shard in self._shard_files():
            for name, info in _read_header(shard).items():
                self._file_of[name] = shard
                self._info[name] = info
        self._order = sorted(self._file_of, key=lambda n: (str(self._file_of[n]), self._info[n]["data_offsets"][0]))

    def _shard_files(self) -> list[Path]:
        index = self.model_dir / INDEX_FILE
        single = self.model_dir / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise LlmforgeError(f"{index} is malformed ({exc})", hint="re-save the checkpoint") from exc
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if not (self.model_dir / shard).is_file():
                    raise LlmforgeError(f"shard {shard} listed in {index.name} is missing from {self.model_dir}",
                                        hint="download every shard of the checkpoint")
            return [self.model_dir / s for s in shards]
        if single.is_file():
            return [single]
        found = sorted(self.model_dir.glob("*.safetensors"))
        if found:
            return found
        raise LlmforgeError(f"no safetensors weights in {self.model_dir}",
                            hint="expected model.safetensors or model.safetensors.index.json with its shards")

    def names(self) -> list[str]:
        return list(self._order)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return torch_dtype(self._info[name]["dtype"])

    def dtype_name(self, name: str) -> str:
        return self._info[name]["dtype"]

    @property
    def numpy_native(self) -> bool:
        return self.supports_row_slices  # a subclass that changes load() keeps the torch path

    def _read(self, name: str, start: int | None, stop: int | None) -> np.ndarray:
        path = self._file_of[name]
        if path not in self._data_start:
            self._data_start[path] = data_start_of(path)
        info = self._info[name]
        return widen(read_array(path, self._data_start[path], info, start, stop, name), info["dtype"])

    def load_array(self, name: str) -> np.ndarray:
        return self._read(name, None, None)

    def load_rows_array(self, name: str, start: int, stop: int) -> np.ndarray:
        return self._read(name, start, stop)

    def load(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        path = self._file_of[name]
        try:
            with safe_open(path, framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise LlmforgeError(f"cannot read tensor {name!r} from {path} ({exc})",
                                hint="re-download or re-save the checkpoint") from exc

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    @property
    def supports_row_slices(self) -> bool:
        # a subclass that changes load() (e.g. merges something in) must not be bypassed by load_rows()
        return type(self).load is SafetensorsSource.load

    def load_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if not self.supports_row_slices:
            return super().load_rows(name, start, stop)
        from safetensors import SafetensorError, safe_open

        path = self._file_of[name]
        try:
            with safe_open(path, framework="pt") as f:
                return f.get_slice(name)[start:stop]
        except (SafetensorError, OSError) as exc:
            raise LlmforgeError(f"cannot read tensor {name!r} from {path} ({exc})",
                                hint="re-download or re-save the checkpoint") from exc
