"""Hugging Face causal-LM folder -> GGUF, streaming one tensor at a time.

``convert`` is what the CLI calls (and routes PEFT adapter folders to ``llmforge.export.adapter``);
``convert_model`` is the lower-level entry that takes any :class:`TensorSource` (e.g. a LoRA merge).
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType, Keys

from ..atomic import check_output_dir
from ..errors import LlmforgeError
from ..quant import mixtures
from ..quant.api import (TensorContext, check_finite, choose_tensor_type, quantize_array, resolve_backend,
                         resolve_ftype)
from ..quant.kquants import K_TYPES, default_workers
from .registry import ArchSpec, HParams, find_arch, metadata
from .parallel import ForkWorkers, ThreadWorkers, can_fork, write_in_place
from .source import SafetensorsSource, TensorSource
from .tokenizer import add_vocab_to_gguf, load_vocab
from .writer import QUANTIZATION_VERSION, PlannedTensor, StreamingGGUFWriter, check_disk_space

if TYPE_CHECKING:
    import torch

STORED_TO_GGML = {"F32": T.F32, "F16": T.F16, "BF16": T.BF16}

# gguf-py logs merges/special-token chatter at INFO/WARNING; our own progress lines say what matters
logging.getLogger("gguf").setLevel(logging.ERROR)


@dataclass
class ConvertReport:
    """What a conversion wrote and what was verified."""

    path: Path
    quant: str
    n_tensors: int
    bytes_written: int
    checks: list[str] = field(default_factory=list)
    arch: str = ""
    type_counts: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    backend: str = "numpy"        # where K-types were packed (llmforge.quant.api.resolve_backend)
    seconds: float = 0.0

    def summary_lines(self) -> list[str]:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.type_counts.items()))
        where = "" if self.backend == "numpy" else f", K-quants on {self.backend}"
        lines = [f"wrote {self.path} ({self.bytes_written / 2**20:.1f} MiB, {self.arch}, {self.quant}, "
                 f"{self.n_tensors} tensors: {types}; {self.seconds:.1f}s{where})"]
        return lines + [f"checked: {c}" for c in self.checks] + [f"warning: {w}" for w in self.warnings]


def read_config(model_dir: Path) -> dict:
    """config.json as a dict, with one-line errors for a missing folder/file or bad JSON."""
    if model_dir.is_file():   # most often a GGUF given to convert
        hint = ("requantize a GGUF with `llmforge quantize IN.gguf OUT.gguf -q QUANT`" if model_dir.suffix == ".gguf"
                else "pass a Hugging Face model folder")
        raise LlmforgeError(f"{model_dir} is a file, not a model folder", hint=hint)
    if not model_dir.is_dir():
        raise LlmforgeError(f"model folder {model_dir} does not exist", hint="pass a Hugging Face model folder")
    path = model_dir / "config.json"
    if not path.is_file():
        raise LlmforgeError(f"no config.json in {model_dir}", hint="pass a Hugging Face model folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise LlmforgeError(f"{path} is not valid JSON ({exc})", hint="fix or re-save the config") from exc
    if not isinstance(config, dict):
        raise LlmforgeError(f"{path} is not a JSON object", hint="fix or re-save the config")
    return config


def default_output(model_dir: Path, quant: str) -> Path:
    """``<folder>-<quant>.gguf`` beside the model folder."""
    model_dir = Path(model_dir).resolve()
    return model_dir.parent / f"{model_dir.name}-{quant.lower()}.gguf"


@dataclass(frozen=True)
class TensorPlan:
    """How one GGUF tensor is made: from an HF tensor (+ transform) or from generated data."""

    hf_name: str | None
    kind: Any                      # gguf.MODEL_TENSOR
    generated: Any = None          # a torch tensor or numpy array made by the arch (e.g. rope factors)


def plan_tensors(spec: ArchSpec, hp: HParams, source: TensorSource) -> list[tuple[str, tuple[int, ...], TensorPlan]]:
    """(GGUF name, numpy shape, plan) for every tensor of the output, in file order."""
    tmap = spec.tensor_map(hp.n_layer)
    tied = bool(hp.get("tie_word_embeddings", default=spec.tied_default))
    out: list[tuple[str, tuple[int, ...], TensorPlan]] = []
    from gguf import TENSOR_NAMES

    for kind, data in spec.extra_tensors(hp).items():
        out.append((TENSOR_NAMES[kind] + ".weight", tuple(data.shape), TensorPlan(None, kind, data)))
    for name in sorted(source.names(), key=_layer_order):
        if any(name.endswith(s) for s in spec.skip) or (tied and name == "lm_head.weight"):
            continue
        mapped = tmap.get_type_and_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise LlmforgeError(f"tensor {name!r} has no GGUF counterpart for {spec.name}",
                                hint="the checkpoint does not match its config.json architecture")
        kind, gguf_name = mapped
        out.append((gguf_name, tuple(source.shape(name)), TensorPlan(name, kind)))
    return out


# (GGUF tensor name pattern, config.json key): the key's value must be the tensor's row length, as llama.cpp's
# loader requires (embedding_length, feed_forward_length); a config from another model otherwise gives a GGUF that
# converts but never loads
SIZE_CHECKS = ((re.compile(r"token_embd\.weight"), "hidden_size"),
               (re.compile(r"blk\.\d+\.ffn_down\.weight"), "intermediate_size"))


def check_sizes(hp: HParams, plans: list[tuple[str, tuple[int, ...], Any]]) -> None:
    """config.json's sizes against the checkpoint's tensors: one error line when they disagree."""
    for name, shape, _ in plans:
        for pattern, key in SIZE_CHECKS:
            want = hp.get(key)
            if pattern.fullmatch(name) and isinstance(want, int) and shape[-1] != want:
                raise LlmforgeError(f"config.json says {key} = {want}, but {name} has rows of {shape[-1]}",
                                    hint="the config does not belong to these weights; fix or re-save the model")


def _layer_order(hf_name: str) -> tuple[int, str]:
    """Non-layer tensors first, then layers numerically: the same file whatever the sharding."""
    match = re.search(r"\.layers\.(\d+)\.", hf_name)
    return (int(match.group(1)) if match else -1, hf_name)


def _to_numpy_f32(t: Any) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t, dtype=np.float32)
    import torch

    return t.to(torch.float32).contiguous().numpy()


def convert_model(model_dir: Path, output: Path, quant: str, *, tensor_source: TensorSource | None = None,
                  tokenizer_dir: Path | None = None, imatrix: Any = None, name: str | None = None,
                  extra_kv: dict[str, Any] | None = None, progress: bool = True,
                  threads: int | None = None, overrides: mixtures.TypeOverrides | None = None,
                  backend: str = "auto", source_dir: Path | None = None) -> ConvertReport:
    """Convert the model in ``model_dir`` (config + tokenizer; weights from ``tensor_source``) to ``output``.

    ``imatrix``: a path to a llama.cpp importance matrix, or an already loaded ``{gguf_name: weights}``
    dict; each tensor's entry is passed to ``quantize_array(..., importance=...)``.
    ``extra_kv``: more GGUF keys, ``{key: value}`` (type inferred) or ``{key: (value, GGUFValueType)}``.
    ``threads``: worker processes for numpy-native sources (default: all usable cores; 1: none).
    ``overrides``: llama-quantize's per-tensor type options (:func:`llmforge.quant.mixtures.type_overrides`).
    ``backend``: where K-types are packed (:func:`llmforge.quant.api.resolve_backend`): "numpy" (forked
    worker processes, no torch import), "cuda" (the fused kernels, worker threads feeding the GPU), "cpu"
    (torch on the CPU, in-process: for checks) or "auto"; every backend writes the same bytes.
    ``source_dir``: the folder written as general.source.url (default ``model_dir``; an adapter passes its own
    folder, not the temporary staging folder, so that a conversion's bytes do not depend on a temporary name).
    """
    start = time.monotonic()
    model_dir, output = Path(model_dir), Path(output)
    ftype = resolve_ftype(quant)
    if overrides is not None:
        mixtures.check_overrides(overrides, mixtures.BY_NAME[ftype.name])
    backend = resolve_backend(backend)
    config = read_config(model_dir)
    spec = find_arch(config, str(model_dir / "config.json"))
    hp = HParams(config)
    check_output_dir(output)
    source = tensor_source if tensor_source is not None else SafetensorsSource(model_dir)
    vocab_size = int(hp.require("vocab_size"))
    plans = plan_tensors(spec, hp, source)
    check_sizes(hp, plans)
    importance = _load_importance(imatrix, {n: shape for n, shape, _ in plans})
    names = {n for n, _, _ in plans}
    has_output = "output.weight" in names
    overridden = _override_types(ftype.name, spec, hp, plans, has_output, importance is not None, overrides)
    leave_output = overrides is not None and overrides.leave_output
    warnings = mixtures.override_warnings(overrides, {n: s for n, s, _ in plans}) if overrides is not None else []
    writer = StreamingGGUFWriter(spec.gguf_name)
    for gguf_name, shape, plan in plans:
        src_type = STORED_TO_GGML.get(source.dtype_name(plan.hf_name) if plan.hf_name else "F32", T.F32)
        ctx = TensorContext(name=gguf_name, shape=shape, arch=spec.gguf_name, n_layer=hp.n_layer,
                            n_head=hp.n_head, n_head_kv=hp.n_head_kv, has_output=has_output,
                            has_imatrix=importance is not None, leave_output=leave_output)
        if plan.generated is not None:
            qtype = T.F32
        elif gguf_name in overridden:
            qtype = overridden[gguf_name]
        else:
            qtype = choose_tensor_type(ftype, ctx, src_type)
        writer.plan(gguf_name, shape, qtype, source=plan)

    pool: ForkWorkers | ThreadWorkers | None = None
    try:
        if source.numpy_native:
            jobs = ArrayJobs(source, spec, hp, writer.tensors, importance, backend)
            pool = _start_workers(jobs, sum(t.n_elements for t in writer.tensors), threads, backend)
            workers = pool.workers if pool else 1
            jobs.threads = 1 if threads == 1 else None
            produce = jobs.producer(pool, prime=PRIME_PER_WORKER * workers, writer=writer)
        else:
            produce = _torch_producer(source, spec, hp, importance, backend)
        vocab = load_vocab(Path(tokenizer_dir) if tokenizer_dir else model_dir, vocab_size)
        release_freed_memory()  # the tokenizer's parse leaves ~80 MB in malloc's free lists
        _add_metadata(writer, spec, hp, vocab, ftype, name or spec.default_name(model_dir.resolve().name),
                      Path(source_dir) if source_dir is not None else model_dir, extra_kv)
        check_disk_space(output, sum(t.nbytes for t in writer.tensors) + (64 << 20))
        result = writer.write(output, produce, progress=progress, window=WINDOW_PER_WORKER * pool.workers if pool else 0)
    finally:
        if pool is not None:
            pool.close()
    counts: dict[str, int] = {}
    for t in writer.tensors:
        counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
    packed_on = backend if any(t.qtype in K_TYPES for t in writer.tensors) else "numpy"
    return ConvertReport(result.path, ftype.name, result.n_tensors, result.bytes_written,
                         [vocab.summary(), *result.checks], spec.gguf_name, counts, warnings, packed_on,
                         time.monotonic() - start)


# row blocks of about this many elements: a 150k x 900 embedding never sits in memory whole (or as f32)
CHUNK_ELEMENTS = 4 << 20
# models below this many elements convert in-process (forking costs more than it saves)
PARALLEL_MIN_ELEMENTS = 32 << 20
# tensors this small are packed in the parent even when workers run (a job round trip costs more)
INLINE_ELEMENTS = 1 << 16
# jobs submitted before the vocabulary is read, per worker (their results come back through a pipe)
PRIME_PER_WORKER = 4
# jobs in flight per worker while writing: enough that one slow job at the head never idles the others
WINDOW_PER_WORKER = 8
# threads reading, merging and checking row blocks for the GPU, which packs one block at a time
GPU_FEED_THREADS = 8


def _start_workers(jobs: ArrayJobs, total: int, threads: int | None,
                   backend: str) -> ForkWorkers | ThreadWorkers | None:
    """The pool for ``jobs``: forked processes on the numpy path (forked before the vocabulary is read, so
    they share a small parent), threads on the GPU (the parent holds CUDA), none for small models, for
    ``threads=1`` and for the torch CPU path (which is for checks and threads itself)."""
    if total < PARALLEL_MIN_ELEMENTS or threads == 1 or backend == "cpu":
        return None
    if backend == "cuda":
        return ThreadWorkers(jobs.run_in_worker, threads or min(default_workers(), GPU_FEED_THREADS))
    workers = threads or default_workers()
    return ForkWorkers(jobs.run_in_worker, workers) if workers > 1 and can_fork() else None


def _row_step(t: PlannedTensor) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, math.prod(t.shape[1:]))) if len(t.shape) > 1 else 1


def release_freed_memory() -> None:
    """Hand malloc's free lists back to the OS (glibc only; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class ArrayJobs:
    """The numpy path: how each GGUF tensor splits into row-block jobs, and how one job is made (in the parent
    or in a forked worker, which reads its rows itself). No torch is imported here."""

    def __init__(self, source: TensorSource, spec: ArchSpec, hp: HParams, tensors: list[PlannedTensor],
                 importance: dict | None, backend: str = "numpy"):
        self.source, self.spec, self.hp, self.tensors, self.importance = source, spec, hp, tensors, importance
        self.backend = backend            # K-types: numpy here, or the torch device (quant.api.resolve_backend)
        self.threads: int | None = None   # K-quant processes per job: 1 inside workers

    def _whole(self, t: PlannedTensor) -> bool:
        plan: TensorPlan = t.source
        return (plan.generated is not None or plan.kind in self.spec.transforms or self._shift(plan) != 0.0
                or len(t.shape) < 2 or not self.source.streams_rows(plan.hf_name))

    def _shift(self, plan: TensorPlan) -> float:
        return self.spec.norm_shift if plan.hf_name and plan.hf_name.endswith("norm.weight") else 0.0

    def blocks(self, t: PlannedTensor) -> list[tuple[int, int] | None]:
        """Row ranges to make ``t`` from; ``None``: the whole tensor in one job."""
        if self._whole(t):
            return [None]
        shape = tuple(self.source.shape(t.source.hf_name))
        if shape != t.shape:
            raise LlmforgeError(f"tensor {t.source.hf_name!r} has shape {shape}, header says {t.shape}",
                                hint="the checkpoint is corrupt")
        step = _row_step(t)
        return [(start, min(t.shape[0], start + step)) for start in range(0, t.shape[0], step)]

    def encode(self, index: int, rows: tuple[int, int] | None) -> list[np.ndarray]:
        """Tensor ``index``'s bytes for ``rows`` (all rows when None), as consecutive packed arrays."""
        t = self.tensors[index]
        plan: TensorPlan = t.source
        imp = self.importance.get(t.name) if self.importance else None
        if rows is not None:
            return [self._pack(self.source.load_rows_array(plan.hf_name, *rows), t, imp)]
        if plan.generated is not None:
            return [self._pack(_to_numpy_f32(plan.generated), t, None)]
        data = self.source.load_array(plan.hf_name)
        transform = self.spec.transforms.get(plan.kind)
        if transform is not None:
            data = transform(data, self.hp)
        shift = self._shift(plan)
        if shift:
            data = data.astype(np.float32, copy=False) + np.float32(shift)
        if tuple(data.shape) != t.shape:
            raise LlmforgeError(f"tensor {plan.hf_name!r} has shape {tuple(data.shape)}, header says {t.shape}",
                                hint="the checkpoint is corrupt")
        if len(t.shape) < 2:
            return [self._pack(data, t, imp)]
        step = _row_step(t)
        return [self._pack(data[start:start + step], t, imp) for start in range(0, t.shape[0], step)]

    def _pack(self, block: np.ndarray, t: PlannedTensor, importance: np.ndarray | None) -> np.ndarray:
        """One block in ``t``'s GGUF type; NaN/Inf are refused once, on the float32 data that gets packed."""
        if t.qtype in (T.F32, T.F16):
            if block.dtype.kind == "f":
                check_finite(block, t.name)
            return np.ascontiguousarray(block, dtype=np.float32 if t.qtype == T.F32 else np.float16)
        return quantize_array(block, t.qtype, importance=importance, name=t.name, threads=self.threads,
                              backend=self.backend)

    def run_in_worker(self, index: int, rows: tuple[int, int] | None, path: str | None = None,
                      offset: int = 0) -> list[np.ndarray] | int:
        """A job in a worker: the packed blocks, or, given the output ``path``, the number of bytes written
        in place at ``offset``."""
        self.threads = 1
        arrays = self.encode(index, rows)
        return arrays if path is None else write_in_place(path, offset, arrays)

    def producer(self, pool: ForkWorkers | None, prime: int = 0, writer: StreamingGGUFWriter | None = None):
        """``produce`` for the writer: packed blocks, or futures of them when ``pool`` runs. The first ``prime``
        jobs are submitted now, so the workers start while the parent reads the vocabulary; they send their
        bytes back. Later jobs write in place into ``writer``'s file (its header is written by then)."""
        index_of = {t.name: i for i, t in enumerate(self.tensors)}
        primed: dict[tuple[int, Any], Any] = {}
        if pool is not None:
            for i, t in enumerate(self.tensors):
                if len(primed) >= prime:
                    break
                if t.n_elements > INLINE_ELEMENTS:
                    for rows in self.blocks(t)[:prime - len(primed)]:
                        primed[(i, rows)] = pool.submit(i, rows)

        def produce(t: PlannedTensor) -> Iterator[Any]:
            i = index_of[t.name]
            for rows in self.blocks(t):
                if pool is None or t.n_elements <= INLINE_ELEMENTS:
                    yield from self.encode(i, rows)
                elif (i, rows) in primed:
                    yield primed.pop((i, rows))
                elif writer is not None and writer.path is not None and sys.byteorder == "little":
                    start = 0 if rows is None else rows[0] * (t.nbytes // t.shape[0])
                    yield pool.submit(i, rows, str(writer.path), writer.data_offsets[t.name] + start)
                else:
                    yield pool.submit(i, rows)

        return produce


def _torch_producer(source: TensorSource, spec: ArchSpec, hp: HParams, importance: dict | None,
                    backend: str = "numpy"):
    """``produce`` for sources that only load torch tensors (NF4 bases, DoRA merges, custom sources)."""

    def produce(t: PlannedTensor) -> Iterator[np.ndarray]:
        plan: TensorPlan = t.source
        if plan.generated is not None:
            yield _to_numpy_f32(plan.generated)
            return
        transform = spec.transforms.get(plan.kind)
        shift = spec.norm_shift if plan.hf_name.endswith("norm.weight") else 0.0
        whole = transform is not None or shift or not source.supports_row_slices or len(t.shape) < 2
        tensor = source.load(plan.hf_name) if whole else None
        if transform is not None:
            tensor = transform(tensor, hp)
        if shift:
            tensor = tensor.float() + shift
        shape = tuple(tensor.shape) if tensor is not None else tuple(source.shape(plan.hf_name))
        if shape != t.shape:
            raise LlmforgeError(f"tensor {plan.hf_name!r} has shape {shape}, header says {t.shape}",
                                hint="the checkpoint is corrupt")
        imp = importance.get(t.name) if importance else None
        rows = t.shape[0] if len(t.shape) > 1 else 1
        step = _row_step(t)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            if tensor is None:
                block = source.load_rows(plan.hf_name, start, stop)
            else:
                block = tensor if len(t.shape) < 2 else tensor[start:stop]
            yield _encode(block, t, imp, backend)

    return produce


def _encode(block: torch.Tensor, t: PlannedTensor, importance: np.ndarray | None,
            backend: str = "numpy") -> np.ndarray:
    """One row block of ``t`` in its GGUF type (float types cast in torch; the rest via quantize_array)."""
    import torch

    if t.qtype in (T.F32, T.F16):
        if block.is_floating_point() and not bool(torch.isfinite(block).all()):
            check_finite(_to_numpy_f32(block), t.name)  # raises with the tensor's name and the count
        return block.to(torch.float32 if t.qtype == T.F32 else torch.float16).contiguous().numpy()
    if t.qtype == T.BF16 and block.dtype == torch.bfloat16:
        if not bool(torch.isfinite(block).all()):
            check_finite(_to_numpy_f32(block), t.name)
        return block.contiguous().view(torch.int16).numpy().view(np.uint8)
    return quantize_array(_to_numpy_f32(block), t.qtype, importance=importance, name=t.name,  # checks NaN/Inf
                          backend=backend)


def _load_importance(imatrix: Any, shapes: dict[str, tuple[int, ...]]) -> dict | None:
    """Hook for importance matrices (K-quants): a path is loaded (and checked against the model's tensor
    shapes) by ``llmforge.quant.imatrix.load_imatrix``; a dict is used as given."""
    if imatrix is None or isinstance(imatrix, dict):
        return imatrix
    from ..quant.imatrix import load_imatrix

    return load_imatrix(Path(imatrix), shapes)


def _add_metadata(writer: StreamingGGUFWriter, spec: ArchSpec, hp: HParams, vocab, ftype, name: str,
                  model_dir: Path, extra_kv: dict[str, Any] | None) -> None:
    w = writer.gguf
    w.add_type("model")
    w.add_name(name)
    w.add_string(Keys.General.SOURCE_URL, model_dir.resolve().as_uri())
    for key, value, vtype in metadata(spec, hp):
        w.add_key_value(key, value, vtype)
    w.add_file_type(int(ftype.file_type))
    add_vocab_to_gguf(w, vocab, add_bos=spec.add_bos)
    for key, value in (extra_kv or {}).items():
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], GGUFValueType):
            w.add_key_value(key, value[0], value[1])
        else:
            w.add_key_value(key, value, GGUFValueType.get_type(value))
    w.add_quantization_version(QUANTIZATION_VERSION)


def _override_types(quant: str, spec: ArchSpec, hp: HParams, plans, has_output: bool, has_imatrix: bool,
                    overrides: mixtures.TypeOverrides | None) -> dict[str, T]:
    """With type overrides, the quantizable tensors' types planned in weights_map order (a ``--tensor-type``
    match changes llama.cpp's counters, which the stateless choice assumes); else nothing."""
    if overrides is None or not overrides.active:
        return {}
    facts = mixtures.ModelFacts(spec.gguf_name, hp.n_layer, hp.n_head, hp.n_head_kv, has_output=has_output,
                                has_imatrix=has_imatrix)
    shapes = {name: shape for name, shape, plan in plans if plan.generated is None}
    return mixtures.plan_types(mixtures.BY_NAME[quant], facts, shapes, overrides)


def convert(source: Path, output: Path | None, quant: str = "f16", *, base: Path | None = None,
            lora_only: bool = False, imatrix: Any = None, name: str | None = None,
            overrides: mixtures.TypeOverrides | None = None, backend: str = "auto") -> ConvertReport:
    """Convert a Hugging Face model folder (or, via ``llmforge.export.adapter``, a PEFT adapter) to GGUF.

    ``overrides``: llama-quantize's ``--pure``/``--leave-output-tensor``/``--output-tensor-type``/
    ``--token-embedding-type``/``--tensor-type``/``--tensor-type-file``
    (:func:`llmforge.quant.mixtures.type_overrides`).
    ``backend``: where K-types are packed, see :func:`convert_model` (the CLI's ``--device``).
    """
    source = Path(source)
    backend = resolve_backend(backend)   # --device cuda without a GPU fails before anything is read
    if (source / "adapter_config.json").is_file():
        from .adapter import convert_adapter

        if lora_only and overrides is not None and overrides.active:
            raise LlmforgeError("tensor type overrides do not apply to --lora-only adapters",
                                hint="drop the --pure/--leave-output-tensor/--*-type options")
        return convert_adapter(source, output, quant, base=base, lora_only=lora_only, imatrix=imatrix, name=name,
                               overrides=overrides, backend=backend)
    if base is not None or lora_only:
        raise LlmforgeError(f"--base/--lora-only apply to adapter folders; {source} has no adapter_config.json",
                            hint="drop those options for a full model folder")
    resolve_ftype(quant)
    out = Path(output) if output is not None else default_output(source, quant)
    if (source / "config.json").is_file():
        from .vision import convert_vlm, find_vision_arch

        config = read_config(source)
        if find_vision_arch(config) is not None:   # text GGUF at out, mmproj-<name> beside it
            return convert_vlm(source, out, quant, config=config, imatrix=imatrix, name=name, overrides=overrides,
                               backend=backend)
    return convert_model(source, out, quant, imatrix=imatrix, name=name, overrides=overrides, backend=backend)
