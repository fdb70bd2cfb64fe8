"""Layer-by-layer LoRA merge: base tensors are loaded one at a time and ``scale * B @ A`` is added in float32.

:class:`MergedSource` is a :class:`~llmforge.export.source.TensorSource`, so the GGUF exporter streams merged
tensors exactly as it streams a plain model; :func:`merge_to_hf` streams them into sharded 16-bit safetensors.
Peak memory stays near one base tensor plus its LoRA factors, whatever the model size.

Tied embeddings: PEFT's ``merge_and_unload()`` adds an ``lm_head`` (or ``embed_tokens``) delta into the one
shared tensor, so the merged model no longer computes what the adapter computed. Here the output matrix is
untied instead: ``token_embd = W + delta_embed`` and ``output = W + delta_lm_head``, which is exactly the
adapter's forward pass.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..atomic import atomic_dir, check_output_dir
from ..errors import LlmforgeError
from .adapter import (TOKENIZER_FILES, BaseModel, PeftAdapter, check_against_base, read_adapter, resolve_base)
from .source import SafetensorsSource, TensorSource, dtype_name_of, torch_dtype

if TYPE_CHECKING:
    import torch

LM_HEAD = "lm_head.weight"
# Architectures whose GGUF graph always reuses token_embd as the output matrix (no untied output tensor).
ALWAYS_TIED_GGUF = ("gemma2", "gemma3", "gemma3_text", "gemma")


class DequantizedNF4Source(TensorSource):
    """A bitsandbytes 4-bit checkpoint seen as a plain one: NF4 weights come out dequantized."""

    def __init__(self, inner: TensorSource):
        from ..vendor.bnb_nf4 import QUANT_STATE_SUFFIXES

        self.inner = inner
        all_names = inner.names()
        companions = {f"{n}.{s}" for n in all_names for s in QUANT_STATE_SUFFIXES}
        self._names = [n for n in all_names if n not in companions]
        self._nf4 = {n for n in self._names if f"{n}.quant_state.bitsandbytes__nf4" in inner
                     or f"{n}.absmax" in inner}
        self._states: dict[str, Any] = {}

    def _state(self, name: str):
        from ..quant.nf4 import state_from_tensors
        from ..vendor.bnb_nf4 import QUANT_STATE_SUFFIXES

        if name not in self._states:
            parts = {s: self.inner.load(f"{name}.{s}") for s in QUANT_STATE_SUFFIXES if f"{name}.{s}" in self.inner}
            self._states[name] = state_from_tensors(parts, where=name)
        return self._states[name]

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state(name).shape) if name in self._nf4 else self.inner.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._state(name).dtype if name in self._nf4 else self.inner.dtype(name)

    def load(self, name: str) -> torch.Tensor:
        from ..quant.nf4 import dequantize_nf4

        if name not in self._nf4:
            return self.inner.load(name)
        return dequantize_nf4(self.inner.load(name), self._state(name))

    def __contains__(self, name: str) -> bool:
        return name in set(self._names)


def _read_config(path: Path) -> dict:
    from .convert import read_config

    return read_config(path)


class MergedSource(TensorSource):
    """The base model's tensors with the adapter merged in, one tensor at a time (float32 where changed)."""

    def __init__(self, adapter: PeftAdapter, base: BaseModel, inner: TensorSource | None = None):
        self.adapter, self.base = adapter, base
        inner = inner if inner is not None else SafetensorsSource(base.path)
        self.inner: TensorSource = DequantizedNF4Source(inner) if base.nf4 else inner
        self.config = _read_config(base.path)
        self.notes: list[str] = []
        base_names = self.inner.names()
        self._embed = next((n for n in base_names if n.endswith("embed_tokens.weight")), None)
        tied_default = self.config.get("model_type", "") in ALWAYS_TIED_GGUF
        tied = bool(self.config.get("tie_word_embeddings", tied_default)) and LM_HEAD not in base_names
        touches_vocab = any(n in (LM_HEAD, self._embed) for n in (*adapter.modules, *adapter.whole_tensors))
        self.untie = tied and touches_vocab and self._embed is not None
        if self.untie and self.config.get("model_type", "") in ALWAYS_TIED_GGUF:
            raise LlmforgeError(f"the adapter changes embed_tokens/lm_head of a {self.config['model_type']} model "
                                "whose embeddings are tied, and its GGUF cannot hold a separate output matrix",
                                hint="train without embed_tokens/lm_head in target_modules/modules_to_save")
        self._names = base_names + ([LM_HEAD] if self.untie else [])
        self._lora_bias = {m.bias_name: m for m in adapter.modules.values() if m.bias_key}
        check_against_base(adapter, set(self._names), self._base_shape)
        adapter.check_values()
        self.vocab_size = self._resized_vocab()
        if self.untie:
            self.notes.append("tied embeddings untied: the adapter's lm_head/embed_tokens changes stay separate "
                              "(as in the adapter's forward pass)")

    def _base_shape(self, name: str) -> tuple[int, ...]:
        if self.untie and name == LM_HEAD:
            return self.inner.shape(self._embed)
        return self.inner.shape(name)

    def _resized_vocab(self) -> int | None:
        rows = {self.shape(n)[0] for n in (self._embed, LM_HEAD) if n and n in self._names}
        if len(rows) > 1:
            raise LlmforgeError(f"embeddings and lm_head have different vocabularies {sorted(rows)} after the adapter",
                                hint="the adapter resized only one of them; re-save it with both")
        vocab = rows.pop() if rows else None
        configured = self.config.get("vocab_size", (self.config.get("text_config") or {}).get("vocab_size"))
        if vocab is not None and vocab != configured:   # (vision-language configs: text_config's vocabulary)
            self.notes.append(f"vocabulary resized by the adapter: {configured} -> {vocab}")
            return vocab
        return None

    def config_overrides(self) -> dict[str, Any]:
        """config.json changes the merged model needs (untied output, resized vocabulary)."""
        out: dict[str, Any] = {}
        if self.untie:
            out["tie_word_embeddings"] = False
        if self.vocab_size is not None:
            out["vocab_size"] = self.vocab_size
        return out

    # ---------------------------------------------------------- TensorSource

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        key = self.adapter.whole_tensors.get(name)
        return self.adapter.shape(key) if key else self._base_shape(name)

    def dtype(self, name: str) -> torch.dtype:
        key = self.adapter.whole_tensors.get(name)
        if key:
            return torch_dtype(self.adapter.header[key]["dtype"])
        return self.inner.dtype(self._embed if self.untie and name == LM_HEAD else name)

    def dtype_name(self, name: str) -> str:
        key = self.adapter.whole_tensors.get(name)
        if key:
            return self.adapter.header[key]["dtype"]
        return self.inner.dtype_name(self._embed if self.untie and name == LM_HEAD else name)

    def _base_tensor(self, name: str) -> torch.Tensor:
        key = self.adapter.whole_tensors.get(name)
        if key:
            return self.adapter.load(key)
        if self.untie and name == LM_HEAD:
            embed_key = self.adapter.whole_tensors.get(self._embed)
            return self.adapter.load(embed_key) if embed_key else self.inner.load(self._embed)
        return self.inner.load(name)

    @property
    def supports_row_slices(self) -> bool:
        return self.inner.supports_row_slices

    def _passes_through(self, name: str) -> bool:
        """True when the adapter leaves ``name`` untouched, so its rows can stream straight from the base."""
        return (name not in self.adapter.modules and name not in self._lora_bias
                and name not in self.adapter.whole_tensors and not (self.untie and name == LM_HEAD))

    def load_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Row blocks: untouched tensors (often the large embedding) stream from the base; a merged tensor is
        merged once and kept while the exporter walks its rows (one tensor, as with :meth:`load`)."""
        if self._passes_through(name):
            return self.inner.load_rows(name, start, stop)
        cached = getattr(self, "_row_cache", None)
        if cached is None or cached[0] != name:
            self._row_cache = None  # drop the previous tensor before merging the next
            self._row_cache = (name, self.load(name))
        return self._row_cache[1][start:stop]

    # ---------------------------------------------------------- numpy side (no torch: plain 16/32-bit bases, LoRA)

    @property
    def numpy_native(self) -> bool:
        # DoRA's row norms and NF4 dequantization stay in torch (their rounding is torch's)
        return self.inner.numpy_native and not self.adapter.use_dora

    def streams_rows(self, name: str) -> bool:
        return self.numpy_native and self.supports_row_slices and self._passes_through(name)

    def _base_array(self, name: str) -> np.ndarray:
        key = self.adapter.whole_tensors.get(name)
        if key:
            return self.adapter.load_array(key)
        if self.untie and name == LM_HEAD:
            embed_key = self.adapter.whole_tensors.get(self._embed)
            return self.adapter.load_array(embed_key) if embed_key else self.inner.load_array(self._embed)
        return self.inner.load_array(name)

    def load_array(self, name: str) -> np.ndarray:
        """:meth:`load` in numpy: the same float32 operations (merged tensors come whole)."""
        array = self._base_array(name)
        module = self.adapter.modules.get(name)
        if module is not None:
            return merge_weight_array(array, self.adapter, module)
        bias_of = self._lora_bias.get(name)
        if bias_of is not None:
            return array.astype(np.float32, copy=False) + self.adapter.load_array(bias_of.bias_key) * \
                np.float32(bias_of.scale)
        return array

    def load_rows_array(self, name: str, start: int, stop: int) -> np.ndarray:
        if self._passes_through(name):
            return self.inner.load_rows_array(name, start, stop)
        return self.load_array(name)[start:stop]

    def load(self, name: str) -> torch.Tensor:
        tensor = self._base_tensor(name)
        module = self.adapter.modules.get(name)
        if module is not None:
            return merge_weight(tensor, self.adapter, module)
        bias_of = self._lora_bias.get(name)
        if bias_of is not None:   # lora_bias=True: B's bias is scaled like the weight delta
            return tensor.float() + self.adapter.load(bias_of.bias_key).float() * bias_of.scale
        return tensor


def merge_weight_array(weight: np.ndarray, adapter: PeftAdapter, module) -> np.ndarray:
    """:func:`merge_weight` in numpy for LoRA (no DoRA): ``W + scale * B @ A`` in float32."""
    if module.magnitude_key:
        raise ValueError("DoRA merges go through merge_weight (torch)")
    delta = adapter.delta_array(module)
    if tuple(delta.shape) != tuple(weight.shape):
        raise LlmforgeError(f"adapter module {module.module} gives a {tuple(delta.shape)} update for a "
                            f"{tuple(weight.shape)} tensor", hint="the adapter was trained on another model")
    w = weight.astype(np.float32, copy=False)  # sources hand out fresh arrays: merging in place is safe
    w += delta
    return w


def merge_weight(weight: torch.Tensor, adapter: PeftAdapter, module) -> torch.Tensor:
    """``W + scale * B @ A`` in float32 (DoRA: rescaled row-wise to the magnitude vector)."""
    import torch

    w = weight.float()
    delta = adapter.delta(module)
    if tuple(delta.shape) != tuple(w.shape):
        raise LlmforgeError(f"adapter module {module.module} gives a {tuple(delta.shape)} update for a "
                            f"{tuple(w.shape)} tensor", hint="the adapter was trained on another model")
    w += delta
    del delta
    if module.magnitude_key:
        magnitude = adapter.load(module.magnitude_key).float().reshape(-1)
        norm = torch.linalg.norm(w.T if module.fan_in_fan_out else w, dim=1)
        factor = (magnitude / norm).view(-1, 1)
        w = w * (factor.T if module.fan_in_fan_out else factor)
    return w


# ---------------------------------------------------------------- merged 16-bit safetensors


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def _write_safetensors_streaming(path: Path, names: list[str], shapes: dict, dtypes: dict, produce) -> None:
    """Write a safetensors file tensor by tensor: the header is planned from shapes/dtypes, data streamed."""
    import torch

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for n in names:
        nbytes = math.prod(shapes[n]) * torch.empty((), dtype=dtypes[n]).element_size()
        header[n] = {"dtype": dtype_name_of(dtypes[n]), "shape": list(shapes[n]),
                     "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for n in names:
            t = produce(n).to(dtypes[n]).contiguous()
            if tuple(t.shape) != tuple(shapes[n]):
                raise LlmforgeError(f"tensor {n} has shape {tuple(t.shape)}, expected {shapes[n]}",
                                    hint="the checkpoint is corrupt")
            f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            del t


def merge_to_hf(adapter_dir: str | Path, out_dir: str | Path, base: str | Path | None = None,
                max_shard_size: int | str = "5GB", dtype: torch.dtype | str | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Merge a PEFT adapter into its base and save the merged model as sharded 16-bit safetensors + config +
    tokenizer (the usual "merged_16bit" folder). Streams one tensor at a time.

    ``dtype``: float dtype of the saved weights (default: the base's 16-bit dtype, bfloat16 for f32 bases).
    Returns a small report dict (path, shards, bytes, notes).
    """
    import torch

    from .writer import Progress

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    check_output_dir(out_dir, file=False)   # before the merge's work
    adapter = read_adapter(adapter_dir)
    base_model = resolve_base(adapter, base)
    from .vision import PROCESSOR_FILES, vision_merge_view

    vision = vision_merge_view(adapter, base_model)   # a VLM: merged under the published checkpoint names
    merged, source = vision if vision is not None else (MergedSource(adapter, base_model),) * 2
    names = source.names()
    base_dtypes = {n: source.dtype(n) for n in names}
    if isinstance(dtype, str):
        dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "f16": torch.float16,
                 "float16": torch.float16, "f32": torch.float32, "float32": torch.float32}.get(dtype.lower())
        if dtype is None:
            raise LlmforgeError("unknown dtype for the merged model", hint="use bf16, f16 or f32")
    if dtype is None:
        floats = [d for d in base_dtypes.values() if d.is_floating_point]
        dtype = max(set(floats), key=floats.count) if floats else torch.bfloat16
        if dtype == torch.float32:
            dtype = torch.bfloat16
    out_dtypes = {n: (dtype if d.is_floating_point else d) for n, d in base_dtypes.items()}
    shapes = {n: source.shape(n) for n in names}
    limit = _parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        nbytes = math.prod(shapes[n]) * torch.empty((), dtype=out_dtypes[n]).element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    bar = Progress(len(names), "merging", enabled=progress)
    done = 0

    def produce(n: str) -> torch.Tensor:
        nonlocal done
        t = source.load(n)
        done += 1
        bar.update(done, n)
        return t

    config = json.loads((base_model.path / "config.json").read_text(encoding="utf-8"))
    config.update(merged.config_overrides())
    config.pop("quantization_config", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    with atomic_dir(out_dir) as tmp:
        for file, shard in zip(files, shards):
            _write_safetensors_streaming(tmp / file, shard, shapes, out_dtypes, produce)
        if len(files) > 1:
            total = sum(math.prod(shapes[n]) * torch.empty((), dtype=out_dtypes[n]).element_size() for n in names)
            index = {"metadata": {"total_size": total},
                     "weight_map": {n: f for f, shard in zip(files, shards) for n in shard}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        for folder in (base_model.path, adapter_dir):  # the adapter's tokenizer / chat template win
            for f in (*TOKENIZER_FILES, *PROCESSOR_FILES):
                if (folder / f).is_file():
                    shutil.copy(folder / f, tmp / f)
        if (base_model.path / "generation_config.json").is_file():
            shutil.copy(base_model.path / "generation_config.json", tmp / "generation_config.json")
    bytes_written = sum((out_dir / f).stat().st_size for f in files)
    notes = [f"adapter: {adapter.describe()}", base_model.note or f"merged onto {base_model.path}", *merged.notes]
    return {"path": out_dir, "shards": files, "bytes": bytes_written, "dtype": str(dtype), "notes": notes}
