"""GGUF LoRA adapters (``llmforge convert adapter/ --lora-only``): what llama.cpp loads with ``--lora`` and
Ollama accepts through ``ADAPTER``.

Layout (llama.cpp ``src/llama-adapter.cpp``): ``general.type = adapter``, ``adapter.type = lora``,
``adapter.lora.alpha`` (F32) and the base's architecture; tensors ``<gguf name>.lora_a`` (r x in) and
``.lora_b`` (out x r). llama.cpp scales every pair by ``alpha / rank`` with one global alpha, so per-module
alphas and rsLoRA are folded into ``lora_b``. llama's Q/K row permutation applies to ``lora_b``. Token
embeddings are stored flipped: ``lora_a`` is (vocab x r), ``lora_b`` (dim x r).

A vision-language base (Gemma 3, Qwen2.5-VL, Qwen2-VL) gets an adapter for its text GGUF (the architecture the
text converter writes); the mmproj is the base's, unchanged, so LoRA on the vision tower and a trained projector
(``modules_to_save``) are refused: merge those instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import MODEL_TENSOR

from ..atomic import atomic_path
from ..errors import LlmforgeError
from .adapter import BaseModel, PeftAdapter
from .registry import ArchSpec, HParams, find_arch
from .source import SafetensorsSource, TensorSource

LORA_TYPES = {"f32": (gguf.GGMLQuantizationType.F32, np.float32),
              "f16": (gguf.GGMLQuantizationType.F16, np.float16)}
ROW_PERMUTED = (MODEL_TENSOR.ATTN_Q, MODEL_TENSOR.ATTN_K)


@dataclass
class LoraGGUFReport:
    path: Path
    n_pairs: int
    bytes_written: int
    alpha: float
    quant: str
    checks: list[str]

    def summary_lines(self) -> list[str]:
        return [f"wrote {self.path} (GGUF LoRA adapter, {self.n_pairs} tensor pairs, {self.quant}, "
                f"alpha {self.alpha:g}, {self.bytes_written / 2**20:.1f} MiB)"] + [f"checked: {c}" for c in self.checks]


@dataclass
class LoraTarget:
    """The model an adapter GGUF is written for: its architecture, config, the base tensors under the adapter's
    names, and how an adapter tensor name reads in that architecture's own checkpoints (None: not part of it)."""
    spec: ArchSpec
    hp: HParams
    source: TensorSource
    own_name: Callable[[str], str | None]
    what: str                           # for messages: "llama", "the text model of gemma3", ...


def lora_target(base: BaseModel) -> LoraTarget:
    """The target for ``base``: a text model as it is, or the text model of a vision-language one."""
    from .convert import read_config
    from .vision import canonical_source, find_vision_arch, swap_prefix, text_config

    config = read_config(base.path)
    vision = find_vision_arch(config)
    if vision is None:
        spec = find_arch(config, str(base.path / "config.json"))
        return LoraTarget(spec, HParams(config), SafetensorsSource(base.path), lambda name: name, spec.gguf_name)
    text = text_config(vision, config)
    spec = find_arch(text, str(base.path / "config.json"))
    return LoraTarget(spec, HParams(text), canonical_source(vision, base.path),
                      lambda name: swap_prefix(name, vision.text_prefixes), f"the text model of {vision.name}")


def _replaced_tensors(adapter: PeftAdapter, base_src) -> list[str]:
    """Whole tensors that really differ from the base (PEFT saves targeted embeddings' base weights as-is)."""
    changed = []
    for name, key in adapter.whole_tensors.items():
        same = (name in adapter.saved_base_layers and name in base_src
                and adapter.shape(key) == tuple(base_src.shape(name))
                and torch.equal(adapter.load(key), base_src.load(name)))
        if not same:
            changed.append(name)
    return changed


def _refuse_unrepresentable(adapter: PeftAdapter, hp: HParams, base_src) -> None:
    hint = "convert without --lora-only to merge the adapter into the model instead"
    base_names = set(base_src.names())
    if adapter.use_dora:
        raise LlmforgeError("DoRA adapters cannot be stored as a GGUF LoRA adapter (llama.cpp has no magnitude "
                            "vector)", hint=hint)
    changed = _replaced_tensors(adapter, base_src)
    if changed:
        replaced = ", ".join(sorted(changed)[:3])
        raise LlmforgeError(f"the adapter replaces whole tensors ({replaced}: modules_to_save or resized "
                            "embeddings), which a GGUF LoRA adapter cannot carry", hint=hint)
    if any(m.bias_key for m in adapter.modules.values()):
        raise LlmforgeError("the adapter trains biases (lora_bias), which a GGUF LoRA adapter cannot carry", hint=hint)
    tied = hp.get("tie_word_embeddings", default=False) or "lm_head.weight" not in base_names
    if tied and any(n.endswith(("embed_tokens.weight", "lm_head.weight")) for n in adapter.modules):
        raise LlmforgeError("LoRA on embed_tokens/lm_head of a model with tied embeddings cannot be applied by "
                            "llama.cpp at run time", hint=hint)


def lora_pairs(adapter: PeftAdapter, target: LoraTarget, global_alpha: float):
    """Yield (gguf base name, lora_a, lora_b) as float32 numpy arrays in GGUF layout, one module at a time."""
    spec, hp = target.spec, target.hp
    tmap = spec.tensor_map(hp.n_layer)
    for name, m in adapter.modules.items():
        own = target.own_name(name)
        if own is None:
            raise LlmforgeError(f"adapter module {m.module} is not part of {target.what}: a GGUF LoRA adapter for "
                                "the text GGUF cannot carry it", hint="convert without --lora-only to merge it")
        mapped = tmap.get_type_and_name(own, try_suffixes=(".weight",))
        if mapped is None:
            raise LlmforgeError(f"adapter module {m.module} has no GGUF counterpart for {spec.name}",
                                hint="the adapter does not belong to this base model")
        kind, gguf_name = mapped
        a, b = adapter.factors(m)
        # llama.cpp applies alpha / rank; the remainder of this module's scale goes into B
        b = b * (m.scale * m.rank / global_alpha)
        if m.embedding:
            a, b = a.T, b                       # (vocab x r) rows gathered by token, (dim x r)
        elif m.fan_in_fan_out:
            raise LlmforgeError(f"{m.module}: fan_in_fan_out adapters are not supported with --lora-only",
                                hint="convert without --lora-only")
        if kind in ROW_PERMUTED and kind in spec.transforms:
            b = spec.transforms[kind](b, hp)
        yield gguf_name, a.contiguous().numpy(), b.contiguous().numpy()


def write_lora_gguf(adapter: PeftAdapter, base: BaseModel, output: str | Path, quant: str = "f16") -> LoraGGUFReport:
    """Write ``adapter`` as a GGUF LoRA adapter for ``base`` (f16 or f32 tensors); for a vision-language base, an
    adapter of its text GGUF."""

    output = Path(output)
    key = quant.strip().lower()
    if key not in LORA_TYPES:
        raise LlmforgeError(f"--lora-only writes f16 or f32 tensors, not {quant!r}",
                            hint="pass --quant f16 (or f32); quantize the base model instead")
    qtype, np_dtype = LORA_TYPES[key]
    target = lora_target(base)
    spec, hp, base_src = target.spec, target.hp, target.source
    from .adapter import check_against_base

    if base.nf4:
        from .merge import DequantizedNF4Source

        shapes = DequantizedNF4Source(base_src)
        check_against_base(adapter, set(shapes.names()), shapes.shape)
    else:
        check_against_base(adapter, set(base_src.names()), base_src.shape)
    _refuse_unrepresentable(adapter, hp, base_src)
    adapter.check_values()
    alpha = float(adapter.config.get("lora_alpha") or adapter.config["r"])
    writer = gguf.GGUFWriter(path=None, arch=spec.gguf_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(adapter.path.resolve().name)
    n = 0
    for gguf_name, a, b in lora_pairs(adapter, target, alpha):
        writer.add_tensor(f"{gguf_name}.lora_a", a.astype(np_dtype), raw_dtype=qtype)
        writer.add_tensor(f"{gguf_name}.lora_b", b.astype(np_dtype), raw_dtype=qtype)
        n += 1
    with atomic_path(output) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    checks = [f"adapter: {adapter.describe()}; base {target.what} ({base.path})"]
    if target.what != spec.gguf_name:
        checks.append(f"for the text GGUF of {base.path} (architecture {spec.gguf_name}); its mmproj is unchanged")
    if base.nf4:
        checks.append("the base is stored in NF4: apply this adapter to a GGUF of the same (dequantized) base")
    if any(m.scale != alpha / m.rank for m in adapter.modules.values()):
        checks.append("per-module alpha / rsLoRA scales folded into lora_b (llama.cpp uses one alpha)")
    return LoraGGUFReport(output, n, output.stat().st_size, alpha, key, checks)
