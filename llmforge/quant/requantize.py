"""Requantize an f32/f16/bf16 GGUF to a quant mixture, as ``llama-quantize`` does, one tensor at a time.

The output mirrors ``llama_model_quantize`` (llama.cpp 0c1e570): tensors in weights_map order, KVs in
input order with ``general.quantization_version`` and ``general.file_type`` moved to the end, each
tensor's type from :class:`llmforge.quant.mixtures.TypePlanner`, bytes from :func:`api.quantize_array`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType

from ..atomic import check_output_dir
from ..errors import LlmforgeError
from ..export.gguf_header import read_header, truncated_tensor
from . import mixtures
from .api import auto_backend, quantize_array, resolve_backend, resolve_ftype  # noqa: F401 (auto_backend: API)
from .file_tasks import POOLED_TYPES, FilePacker, TensorTask
from .kquants import default_workers

FLOAT_TYPES = (T.F32, T.F16, T.BF16)
TAIL_KEYS = ("general.quantization_version", "general.file_type")


@dataclass
class RequantizeReport:
    path: Path
    quant: str
    n_tensors: int
    bytes_in: int
    bytes_out: int
    seconds: float
    type_counts: dict[str, int] = field(default_factory=dict)
    imatrix_entries: int = 0
    warnings: list[str] = field(default_factory=list)

    def summary_lines(self) -> list[str]:
        mix = ", ".join(f"{n} {c}" for n, c in sorted(self.type_counts.items()))
        lines = [f"wrote {self.path} ({self.quant}, {self.n_tensors} tensors, "
                 f"{self.bytes_in / 2**20:.1f} MiB -> {self.bytes_out / 2**20:.1f} MiB, {self.seconds:.1f}s)",
                 f"tensor types: {mix}"]
        if self.imatrix_entries:
            lines.append(f"importance weights used for {self.imatrix_entries} tensors")
        return lines + [f"warning: {w}" for w in self.warnings]


def _field(reader: GGUFReader, key: str):
    f = reader.get_field(key)
    return None if f is None else f.contents()


def check_input(path: Path) -> None:
    """A malformed or truncated file, or a vision projector, is one error line before the file is mapped."""
    try:
        header = read_header(path)
    except (ValueError, OSError) as exc:
        raise LlmforgeError(f"{path} is not a readable GGUF file ({exc})", hint="pass a .gguf model") from None
    if header.kv.get("general.architecture") == "clip":
        raise LlmforgeError(f"{path} is a vision projector (mmproj), not a language model",
                            hint="requantize the text GGUF; `llmforge convert` writes the mmproj for the quant")
    short = truncated_tensor(header)
    if short is not None:
        raise LlmforgeError(f"{path} is truncated: tensor {short[0]} needs {short[1]} bytes, the file has "
                            f"{header.file_size}", hint="copy or download it again, or re-convert it")


def model_facts(reader: GGUFReader, path: Path, has_imatrix: bool) -> mixtures.ModelFacts:
    arch = _field(reader, "general.architecture")
    if not arch:
        raise LlmforgeError(f"{path} has no general.architecture", hint="pass a model GGUF")
    n_layer = _field(reader, f"{arch}.block_count")
    if n_layer is None:
        raise LlmforgeError(f"{path} has no {arch}.block_count", hint="pass a model GGUF written by a converter")

    def first(value, default):
        if value is None:
            return default
        return int(value[0]) if isinstance(value, list) else int(value)

    n_head = first(_field(reader, f"{arch}.attention.head_count"), 1)
    n_head_kv = first(_field(reader, f"{arch}.attention.head_count_kv"), n_head)
    n_expert = first(_field(reader, f"{arch}.expert_count"), 0)
    names = {t.name for t in reader.tensors}
    return mixtures.ModelFacts(str(arch), int(n_layer), n_head, n_head_kv, n_expert,
                               has_output="output.weight" in names, has_imatrix=has_imatrix)


def _as_f32(t) -> np.ndarray:
    """A reader tensor as float32 in numpy order (exact from f16/bf16)."""
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    if t.tensor_type == T.BF16:
        bits = np.asarray(t.data).view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.asarray(t.data, dtype=np.float32).reshape(shape)


def _copy_kvs(reader: GGUFReader, writer, file_type: int) -> None:
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in TAIL_KEYS:
            continue
        vtype = GGUFValueType(f.types[0])
        sub = GGUFValueType(f.types[1]) if vtype == GGUFValueType.ARRAY and len(f.types) > 1 else None
        writer.add_key_value(key, f.contents(), vtype, sub_type=sub)
    writer.add_quantization_version(2)
    writer.add_file_type(file_type)


def quantize_gguf(in_path: str | Path, out_path: str | Path, quant: str, imatrix: str | Path | None = None,
                  *, overrides: mixtures.TypeOverrides | None = None, progress: bool = True,
                  backend: str = "auto") -> RequantizeReport:
    """Requantize ``in_path`` (f32/f16/bf16 weights) to ``quant``; writes ``out_path`` atomically.

    ``overrides``: llama-quantize's ``--pure``/``--leave-output-tensor``/``--output-tensor-type``/
    ``--token-embedding-type``/``--tensor-type``/``--tensor-type-file``, from
    :func:`llmforge.quant.mixtures.type_overrides`.
    ``backend``: "numpy" (worker processes on all cores), or a torch device ("cpu", "cuda") for the
    K-types (CUDA runs the fused Triton kernels); all give the same bytes. "auto" (default): "cuda" when
    :func:`llmforge.quant.api.auto_backend` finds a usable GPU, else "numpy" (:func:`api.resolve_backend`).
    """
    backend = resolve_backend(backend)
    from ..export.writer import StreamingGGUFWriter

    start = time.monotonic()
    in_path, out_path = Path(in_path), Path(out_path)
    ftype = resolve_ftype(quant)
    mixture = mixtures.BY_NAME[ftype.name]
    if overrides is not None:
        mixtures.check_overrides(overrides, mixture)
    if not in_path.is_file():
        folder = in_path.is_dir()
        raise LlmforgeError(f"input GGUF {in_path} {'is a folder' if folder else 'does not exist'}",
                            hint="to convert a model folder: llmforge convert" if folder else "check the path")
    if in_path.resolve() == out_path.resolve():
        raise LlmforgeError(f"output {out_path} is the input file", hint="write to another path")
    check_output_dir(out_path)
    check_input(in_path)
    try:
        reader = GGUFReader(in_path)
    except Exception as exc:
        raise LlmforgeError(f"{in_path} is not a readable GGUF file ({exc})", hint="pass a .gguf model") from None
    for t in reader.tensors:
        if t.tensor_type not in FLOAT_TYPES:
            raise LlmforgeError(f"{in_path} is already quantized ({t.name} is {t.tensor_type.name})",
                                hint="requantize from the f32/f16/bf16 GGUF instead")
    tensors = {t.name: t for t in reader.tensors}
    shapes = {n: tuple(int(d) for d in reversed(t.shape.tolist())) for n, t in tensors.items()}

    importance: dict[str, np.ndarray] = {}
    if imatrix is not None:
        from .imatrix import load_imatrix

        quantizable = {n: s for n, s in shapes.items() if mixtures.allows_quantization(n, len(s))}
        importance = load_imatrix(imatrix, quantizable)
    facts = model_facts(reader, in_path, has_imatrix=bool(importance))
    order = mixtures.weights_map_order(tensors)
    planner = mixtures.TypePlanner(mixture, facts, order, overrides)
    warnings = mixtures.override_warnings(overrides, shapes) if overrides is not None else []

    writer = StreamingGGUFWriter(facts.arch)
    _copy_kvs(reader, writer.gguf, int(ftype.file_type))
    counts: dict[str, int] = {}
    for name in order:
        source_type = T(tensors[name].tensor_type)
        qtype = planner.tensor_type(name, shapes[name], source_type)
        writer.plan(name, shapes[name], qtype, source=source_type)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1

    if backend == "cuda":   # reads, copies, kernels and writes overlapped (gpu_pipeline); "eager" A/B: below
        from .gpu_pipeline import pipelined, write_pipelined

        if pipelined():
            result = write_pipelined(writer, out_path, in_path, {n: t.data_offset for n, t in tensors.items()},
                                     importance, progress=progress)
            used = sum(1 for p in writer.tensors if p.name in importance and p.qtype != p.source)
            return RequantizeReport(out_path, ftype.name, result.n_tensors, in_path.stat().st_size,
                                    result.bytes_written, time.monotonic() - start, counts, used, warnings)

    used = 0

    def produce(planned) -> np.ndarray:
        nonlocal used
        t = tensors[planned.name]
        if planned.qtype == planned.source:       # same type: llama.cpp copies the bytes
            return np.asarray(t.data).view(np.uint8).reshape(-1)
        imp = importance.get(planned.name)
        used += imp is not None
        if packer is not None and planned.qtype in POOLED_TYPES:    # packed and written in place by the pool
            return packer.submit(TensorTask(planned.name, str(in_path), t.data_offset, planned.source, planned.shape,
                                            planned.qtype, imp, str(writer.path), writer.data_offsets[planned.name]))
        out = quantize_array(_as_f32(t), planned.qtype, imp, name=planned.name, backend=backend)
        return np.asarray(out).view(np.uint8).reshape(-1) if out.dtype != np.float32 else out

    # numpy: the pool's helpers read, pack and write each tensor's row ranges, the writer keeps a window of
    # them in flight over tensor boundaries (file_tasks); other backends pack in this process
    packer = FilePacker(default_workers()) if backend == "numpy" else None
    with packer or contextlib.nullcontext():
        result = writer.write(out_path, produce, progress=progress, window=packer.window if packer else 0)
    bytes_in = in_path.stat().st_size
    return RequantizeReport(out_path, ftype.name, result.n_tensors, bytes_in, result.bytes_written,
                            time.monotonic() - start, counts, used, warnings)
