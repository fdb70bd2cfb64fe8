"""Vision-language models -> two GGUFs: the text model (through the text converter) and an mmproj (vision tower +
projector, llama.cpp's ``clip`` architecture, read by libmtmd and by Ollama as the model's projector).

As for text models, the architecture is data: a :class:`VisionArch` names the HF architectures, how checkpoint
names of the published and the transformers-5 layouts map to one canonical set, which canonical prefix is the
text model, the projector type, the ``clip.*`` keys and the per-tensor rules of llama.cpp's converter. mmproj
tensor names come from ``gguf.TensorNameMap`` (MODEL_ARCH.MMPROJ), like the text names.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import gguf
from gguf import MODEL_ARCH, MODEL_TENSOR, GGUFValueType, Keys
from gguf import GGMLQuantizationType as T

from ..errors import LlmforgeError
from .source import SafetensorsSource, TensorSource

if TYPE_CHECKING:
    import torch

U32, F32, BOOL, STR = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.BOOL, GGUFValueType.STRING
ARRAY = GGUFValueType.ARRAY
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")


@dataclass(frozen=True)
class VisionView:
    """What the mmproj writer reads from the configs: ``vision_config`` (``v``), the whole config (``c``),
    the text config (``t``) and the image processor's config (``p``)."""

    v: dict
    c: dict
    t: dict
    p: dict


@dataclass(frozen=True)
class ClipKV:
    key: str
    vtype: GGUFValueType
    value: Callable[[VisionView], Any]
    sub_type: GGUFValueType | None = None


def _req(d: dict, key: str, where: str) -> Any:
    if d.get(key) is None:
        raise LlmforgeError(f"{where} lacks {key!r}", hint="the model folder's config is incomplete")
    return d[key]


# clip.* keys every SigLIP/CLIP-style tower writes (llama.cpp's MmprojModel.set_gguf_parameters, same order)
VISION_KVS: tuple[ClipKV, ...] = (
    ClipKV(Keys.Clip.HAS_VISION_ENCODER, BOOL, lambda x: True),
    ClipKV(Keys.ClipVision.PROJECTION_DIM, U32, lambda x: _req(x.t, "hidden_size", "text_config")),
    ClipKV(Keys.ClipVision.IMAGE_SIZE, U32, lambda x: _req(x.v, "image_size", "vision_config")),
    ClipKV(Keys.ClipVision.PATCH_SIZE, U32, lambda x: _req(x.v, "patch_size", "vision_config")),
    ClipKV(Keys.ClipVision.EMBEDDING_LENGTH, U32, lambda x: _req(x.v, "hidden_size", "vision_config")),
    ClipKV(Keys.ClipVision.FEED_FORWARD_LENGTH, U32, lambda x: _req(x.v, "intermediate_size", "vision_config")),
    ClipKV(Keys.ClipVision.BLOCK_COUNT, U32, lambda x: _req(x.v, "num_hidden_layers", "vision_config")),
    ClipKV(Keys.ClipVision.Attention.HEAD_COUNT, U32, lambda x: _req(x.v, "num_attention_heads", "vision_config")),
    ClipKV(Keys.ClipVision.IMAGE_MEAN, ARRAY, lambda x: [float(m) for m in _req(x.p, "image_mean", "processor")],
           F32),
    ClipKV(Keys.ClipVision.IMAGE_STD, ARRAY, lambda x: [float(s) for s in _req(x.p, "image_std", "processor")], F32),
)


def _gemma3_scale(x: VisionView) -> int | None:
    """Patches per side / image tokens per side: 4 for every Gemma 3 (llama.cpp's default, then not written)."""
    per_side = int(int(x.p.get("image_seq_length", x.c.get("mm_tokens_per_image", 256))) ** 0.5)
    scale = (int(x.v["image_size"]) // int(x.v["patch_size"])) // per_side
    return scale if scale > 0 and scale != 4 else None


GEMMA3_KVS: tuple[ClipKV, ...] = (
    ClipKV(Keys.Clip.PROJECTOR_TYPE, STR, lambda x: gguf.VisionProjectorType.GEMMA3),
    ClipKV(Keys.ClipVision.Attention.LAYERNORM_EPS, F32, lambda x: x.v.get("layer_norm_eps", 1e-6)),
    ClipKV(Keys.ClipVision.USE_GELU, BOOL, lambda x: True),
    ClipKV(Keys.ClipVision.Projector.SCALE_FACTOR, U32, _gemma3_scale),
)


def _qwen_wa_pattern(x: VisionView) -> int:
    """Qwen2.5-VL's window-attention period from ``fullatt_block_indexes`` (full attention every n-th block)."""
    full = _req(x.v, "fullatt_block_indexes", "vision_config")
    period = int(full[0]) + 1
    if any(b - a != period for a, b in zip(full, full[1:])):
        raise LlmforgeError(f"vision_config fullatt_block_indexes {full} is not evenly spaced",
                            hint="llama.cpp supports only a regular window-attention pattern")
    return period


QWEN2VL_KVS: tuple[ClipKV, ...] = (
    ClipKV(Keys.Clip.PROJECTOR_TYPE, STR, lambda x: gguf.VisionProjectorType.QWEN2VL),
    ClipKV(Keys.ClipVision.Attention.LAYERNORM_EPS, F32, lambda x: x.c.get("rms_norm_eps", 1e-6)),
)

QWEN25VL_KVS: tuple[ClipKV, ...] = (
    ClipKV(Keys.Clip.PROJECTOR_TYPE, STR, lambda x: gguf.VisionProjectorType.QWEN25VL),
    ClipKV(Keys.ClipVision.USE_SILU, BOOL, lambda x: True),
    ClipKV(Keys.ClipVision.N_WA_PATTERN, U32, _qwen_wa_pattern),
    ClipKV(Keys.ClipVision.Attention.LAYERNORM_EPS, F32, lambda x: x.c.get("rms_norm_eps", 1e-6)),
)


def _qwen_vision_config(v: dict) -> dict:
    """Qwen2-VL's vision_config under the names of the common clip keys (as llama.cpp's converter renames them;
    Qwen2-VL's ``embed_dim`` is the width and its ``hidden_size`` the MLP's)."""
    out = {**v, "image_size": v.get("image_size", 560), "num_attention_heads": v.get("num_heads"),
           "num_hidden_layers": v.get("depth")}
    if "embed_dim" in v:
        out.update(intermediate_size=v.get("hidden_size"), hidden_size=v["embed_dim"])
    return out


@dataclass(frozen=True)
class Split:
    """One checkpoint tensor written as several mmproj tensors (as llama.cpp's converter splits it): each part
    is (replacement of ``pattern`` in the name before mapping, suffix after the GGUF name, slice of the array)."""

    pattern: str
    parts: tuple[tuple[str, str, Callable[[np.ndarray], np.ndarray]], ...]


def _third(i: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda a: a[i * (a.shape[0] // 3):(i + 1) * (a.shape[0] // 3)]


def _frame(i: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda a: a[:, :, i]


QWEN_SPLITS = (
    # fused attention input -> q, k, v (weight rows and bias alike)
    Split(r"\.qkv\.", tuple((f".{p}.", "", _third(i)) for i, p in enumerate("qkv"))),
    # Conv3D over 2 frames -> two Conv2Ds (the second as ``v.patch_embd.weight.1``)
    Split(r"patch_embed\.proj\.weight$", (("patch_embed.proj.weight", "", _frame(0)),
                                          ("patch_embed.proj.weight", ".1", _frame(1)))),
)


def _f16_if_f16(base: T) -> T:
    """llama.cpp's MmprojModel default for patch embeddings: F16 in f16 files, F32 otherwise."""
    return T.F16 if base == T.F16 else T.F32


@dataclass(frozen=True)
class VisionArch:
    """Everything architecture-specific about one vision-language family."""

    name: str
    hf_architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    text_architecture: str                     # the text model's HF architecture (llmforge.export.registry)
    # checkpoint prefix -> canonical prefix (transformers 5 module names), longest first
    canonical: tuple[tuple[str, str], ...]
    text_prefixes: tuple[tuple[str, str], ...]  # canonical prefix -> the text model's own name
    # canonical prefix -> the name gguf's TensorNameMap(MMPROJ) knows
    vision_prefixes: tuple[tuple[str, str], ...]
    published: tuple[tuple[str, str], ...]     # canonical prefix -> the published checkpoints' (merged folders)
    kvs: tuple[ClipKV, ...]
    skip: tuple[str, ...] = ()                 # canonical prefixes with no GGUF counterpart
    rename: tuple[tuple[str, str], ...] = ()   # regex fixes after the prefix (e.g. "_weight" -> ".weight")
    add_one: tuple[MODEL_TENSOR, ...] = ()     # Gemma RMS norms stored as w (applied as 1 + w)
    # llama.cpp converter's per-tensor types: forced type for these kinds (a type, or one chosen from the base
    # type), applied after its 1-D/norm -> F32 rule
    force: dict[MODEL_TENSOR, T | Callable[[T], T]] = field(default_factory=dict)
    splits: tuple[Split, ...] = ()
    vision_config: Callable[[dict], dict] = dict   # vision_config under the common clip keys' names
    # training (llmforge.trainer.vision): the processor's per-token image mask the model takes, the processor's
    # per-image inputs (concatenated over a batch), the modules kept 16-bit under 4-bit loading
    token_types: str = "token_type_ids"
    image_inputs: tuple[str, ...] = ("pixel_values",)
    keep_16bit: tuple[str, ...] = ("vision_tower", "multi_modal_projector")


GEMMA3 = VisionArch(
    "gemma3", ("Gemma3ForConditionalGeneration",), ("gemma3",), "Gemma3ForCausalLM",
    canonical=(("vision_tower.vision_model.", "model.vision_tower."), ("language_model.model.", "model.language_model."),
               ("language_model.lm_head.", "lm_head."), ("vision_tower.", "model.vision_tower."),
               ("multi_modal_projector.", "model.multi_modal_projector.")),
    text_prefixes=(("model.language_model.", "model."), ("lm_head.", "lm_head.")),
    vision_prefixes=(("model.vision_tower.", "vision_tower.vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")),
    published=(("model.vision_tower.", "vision_tower.vision_model."), ("model.language_model.", "language_model.model."),
               ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head.")),
    kvs=VISION_KVS + GEMMA3_KVS,
    skip=("model.vision_tower.head.",),
    rename=((r"_weight$", ".weight"),),
    add_one=(MODEL_TENSOR.V_MM_SOFT_EMB_NORM,),
    force={MODEL_TENSOR.V_MM_INP_PROJ: T.F16, MODEL_TENSOR.V_ENC_EMBD_PATCH: T.F32,
           MODEL_TENSOR.V_ENC_EMBD_POS: T.F32},
)

QWEN25VL = VisionArch(
    "qwen2.5vl", ("Qwen2_5_VLForConditionalGeneration",), ("qwen2_5_vl",), "Qwen2_5_VLTextModel",
    canonical=(("model.language_model.", "model.language_model."), ("model.visual.", "model.visual."),
               ("visual.", "model.visual."), ("model.", "model.language_model."), ("lm_head.", "lm_head.")),
    text_prefixes=(("model.language_model.", "model."), ("lm_head.", "lm_head.")),
    vision_prefixes=(("model.visual.", "visual."),),
    published=(("model.visual.", "visual."), ("model.language_model.", "model."), ("lm_head.", "lm_head.")),
    kvs=VISION_KVS + QWEN25VL_KVS,
    force={MODEL_TENSOR.V_ENC_EMBD_PATCH: _f16_if_f16},
    splits=QWEN_SPLITS,
    vision_config=_qwen_vision_config,
    token_types="mm_token_type_ids",
    image_inputs=("pixel_values", "image_grid_thw"),
    keep_16bit=("visual",),
)

# Qwen2-VL: the same layout and splits; LayerNorm + GELU blocks, no window attention
QWEN2VL = replace(QWEN25VL, name="qwen2vl", hf_architectures=("Qwen2VLForConditionalGeneration",),
                  model_types=("qwen2_vl",), text_architecture="Qwen2VLTextModel", kvs=VISION_KVS + QWEN2VL_KVS)

VISION_REGISTRY: tuple[VisionArch, ...] = (GEMMA3, QWEN25VL, QWEN2VL)

# the mmproj's base type per quant: llama.cpp's converter writes f32/f16/bf16/q8_0 projectors; K-quant mixtures
# (which llama-quantize never applies to an mmproj) keep the projector in f16
MMPROJ_BASE = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}


def find_vision_arch(config: dict) -> VisionArch | None:
    """The vision-language family of a config.json, or None for text-only configs."""
    archs = config.get("architectures") or []
    for spec in VISION_REGISTRY:
        if any(a in spec.hf_architectures for a in archs):
            return spec
    if not archs and "vision_config" in config:
        return next((s for s in VISION_REGISTRY if config.get("model_type") in s.model_types), None)
    return None


def swap_prefix(name: str, table: tuple[tuple[str, str], ...]) -> str | None:
    """``name`` with the first matching old prefix of ``table`` replaced by its new one; None if none matches."""
    for old, new in table:
        if name.startswith(old):
            return new + name[len(old):]
    return None


def canonical_name(spec: VisionArch, name: str) -> str:
    """A checkpoint (or PEFT module) name in transformers 5's module layout."""
    swapped = swap_prefix(name, spec.canonical)
    return swapped if swapped is not None else name


# ----------------------------------------------------------------------------- sources


class RenamedSource(TensorSource):
    """The tensors of ``inner`` under other names (``names``: new name -> inner name); streaming and the
    numpy path pass through."""

    def __init__(self, inner: TensorSource, names: dict[str, str]):
        self.inner, self._to_inner = inner, dict(names)

    def names(self) -> list[str]:
        return list(self._to_inner)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(self._to_inner[name])

    def dtype(self, name: str) -> torch.dtype:
        return self.inner.dtype(self._to_inner[name])

    def dtype_name(self, name: str) -> str:
        return self.inner.dtype_name(self._to_inner[name])

    def load(self, name: str) -> torch.Tensor:
        return self.inner.load(self._to_inner[name])

    def __contains__(self, name: str) -> bool:
        return name in self._to_inner

    @property
    def supports_row_slices(self) -> bool:
        return self.inner.supports_row_slices

    def load_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.inner.load_rows(self._to_inner[name], start, stop)

    @property
    def numpy_native(self) -> bool:
        return self.inner.numpy_native

    def streams_rows(self, name: str) -> bool:
        return self.inner.streams_rows(self._to_inner[name])

    def load_array(self, name: str) -> np.ndarray:
        return self.inner.load_array(self._to_inner[name])

    def load_rows_array(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.inner.load_rows_array(self._to_inner[name], start, stop)


def canonical_source(spec: VisionArch, model_dir: Path) -> RenamedSource:
    """A VLM folder's tensors under canonical names (published and transformers-5 layouts alike)."""
    inner = SafetensorsSource(model_dir)
    return RenamedSource(inner, {canonical_name(spec, n): n for n in inner.names()})


def text_source(spec: VisionArch, source: TensorSource) -> RenamedSource:
    """The text model's tensors of a canonical source, named as the text architecture's own checkpoints."""
    names = {}
    for n in source.names():
        new = swap_prefix(n, spec.text_prefixes)
        if new is not None:
            names[new] = n
    return RenamedSource(source, names)


# ----------------------------------------------------------------------------- configs


def text_config(spec: VisionArch, config: dict) -> dict:
    """The text model's config.json: ``text_config`` with the top-level keys it inherits."""
    text = dict(config.get("text_config") or {})
    if not text:
        raise LlmforgeError("config.json of a vision-language model lacks 'text_config'",
                            hint="the model folder's config is incomplete")
    text["architectures"] = [spec.text_architecture]
    if "tie_word_embeddings" in config:
        text["tie_word_embeddings"] = config["tie_word_embeddings"]
    return text


def processor_config(model_dir: Path) -> dict:
    """The image processor's settings (``preprocessor_config.json``, or ``processor_config.json``'s nested
    ``image_processor``, as llama.cpp's converter merges them)."""
    merged: dict = {}
    for name in PROCESSOR_FILES:
        path = model_dir / name
        if path.is_file():
            try:
                cfg = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise LlmforgeError(f"{path} is not valid JSON ({exc})", hint="fix or re-save it") from exc
            merged.update({**cfg, **(cfg.get("image_processor") or {})})
    if not merged:
        raise LlmforgeError(f"no preprocessor_config.json or processor_config.json in {model_dir}",
                            hint="save the model's processor into the folder (processor.save_pretrained)")
    return merged


@contextmanager
def staged_text_folder(spec: VisionArch, model_dir: Path, config: dict,
                       extra_dirs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """A temporary folder with the text model's config.json and the tokenizer files (``extra_dirs``' files
    laid over the model's: an adapter's trained template wins). Weights are not copied."""
    import shutil

    with tempfile.TemporaryDirectory(prefix="llmforge-vlm-") as tmp:
        staged = Path(tmp) / model_dir.resolve().name
        staged.mkdir()
        (staged / "config.json").write_text(json.dumps(text_config(spec, config), indent=2), encoding="utf-8")
        for folder in (model_dir, *extra_dirs):
            for f in TOKENIZER_FILES:
                if (folder / f).is_file():
                    shutil.copy(folder / f, staged / f)
        yield staged


# ----------------------------------------------------------------------------- the mmproj


@dataclass(frozen=True)
class MmprojTensor:
    gguf_name: str
    kind: MODEL_TENSOR
    source_name: str       # canonical name in the source
    shape: tuple[int, ...]
    qtype: T
    part: Callable[[np.ndarray], np.ndarray] | None = None   # the slice of a split source tensor


def mmproj_type(spec: VisionArch, kind: MODEL_TENSOR, gguf_name: str, shape: tuple[int, ...], base: T) -> T:
    """llama.cpp's converter's choice: the family's forced types, then 1-D tensors and norms in F32, then the
    base type (Q8_0 falls back to F16 for rows that are not whole blocks)."""
    qtype = spec.force.get(kind)
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return T.F32
    if qtype is not None:
        return qtype if isinstance(qtype, T) else qtype(base)
    if base == T.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0]:
        return T.F16
    return base


def plan_mmproj(spec: VisionArch, source: TensorSource, n_blocks: int, base: T) -> list[MmprojTensor]:
    """Every mmproj tensor, in the source's order (non-layer tensors first, then blocks in order)."""
    tmap = gguf.get_tensor_name_map(MODEL_ARCH.MMPROJ, n_blocks)
    out = []
    for name in source.names():
        mapped_name = swap_prefix(name, spec.vision_prefixes)
        if mapped_name is None or any(name.startswith(s) for s in spec.skip):
            continue
        for pattern, repl in spec.rename:
            mapped_name = re.sub(pattern, repl, mapped_name)
        shape = tuple(source.shape(name))
        for part_name, suffix, part in _parts(spec, mapped_name):
            found = tmap.get_type_and_name(part_name, try_suffixes=(".weight", ".bias"))
            if found is None:
                raise LlmforgeError(f"tensor {name!r} has no mmproj counterpart for {spec.name}",
                                    hint="the checkpoint does not match its config.json architecture")
            kind, gguf_name = found
            gguf_name += suffix
            part_shape = shape if part is None else part(np.broadcast_to(np.zeros((), np.int8), shape)).shape
            out.append(MmprojTensor(gguf_name, kind, name, part_shape,
                                    mmproj_type(spec, kind, gguf_name, part_shape, base), part))
    if not out:
        raise LlmforgeError(f"no vision tower tensors found for {spec.name}",
                            hint="the checkpoint holds only the text model; convert it as a text model")
    return sorted(out, key=lambda t: _block_order(t.gguf_name))


def _parts(spec: VisionArch, mapped_name: str) -> list[tuple[str, str, Callable | None]]:
    """(name to map, GGUF name suffix, slice) for each mmproj tensor one source tensor becomes."""
    for split in spec.splits:
        if re.search(split.pattern, mapped_name):
            return [(re.sub(split.pattern, repl, mapped_name), suffix, part) for repl, suffix, part in split.parts]
    return [(mapped_name, "", None)]


def _block_order(gguf_name: str) -> tuple[int, str]:
    match = re.search(r"\.blk\.(\d+)\.", gguf_name)
    return (int(match.group(1)) if match else -1, gguf_name)


def mmproj_metadata(spec: VisionArch, view: VisionView) -> list[tuple[str, Any, GGUFValueType, Any]]:
    """(key, value, type, array element type) of the family's clip.* keys, in writing order."""
    out = []
    for kv in spec.kvs:
        value = kv.value(view)
        if value is not None:
            out.append((kv.key, value, kv.vtype, kv.sub_type))
    return out


def write_mmproj(spec: VisionArch, model_dir: Path, config: dict, source: TensorSource, output: Path,
                 quant: str, name: str) -> tuple[Path, dict[str, int], list[str]]:
    """Write the mmproj GGUF of the canonical ``source``; returns (path, type counts, checks)."""
    from ..quant.api import check_finite, quantize_array, resolve_ftype
    from .writer import QUANTIZATION_VERSION, StreamingGGUFWriter

    ftype = resolve_ftype(quant)
    base = MMPROJ_BASE.get(ftype.name, T.F16)
    vision = dict(config.get("vision_config") or {})
    if not vision:
        raise LlmforgeError("config.json of a vision-language model lacks 'vision_config'",
                            hint="the model folder's config is incomplete")
    vision = spec.vision_config(vision)
    view = VisionView(vision, config, text_config(spec, config), processor_config(model_dir))
    n_blocks = int(_req(vision, "num_hidden_layers", "vision_config"))
    plans = plan_mmproj(spec, source, n_blocks, base)
    writer = StreamingGGUFWriter(gguf.MODEL_ARCH_NAMES[MODEL_ARCH.MMPROJ])
    for t in plans:
        writer.plan(t.gguf_name, t.shape, t.qtype, source=t)
    w = writer.gguf
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name(name)
    w.add_file_type(int(file_type_of(base)))
    for key, value, vtype, sub in mmproj_metadata(spec, view):
        w.add_key_value(key, value, vtype, sub_type=sub)
    w.add_quantization_version(QUANTIZATION_VERSION)

    def produce(t) -> np.ndarray:
        plan: MmprojTensor = t.source
        data = source.load_array(plan.source_name)
        if plan.part is not None:
            data = plan.part(data)
        if plan.kind in spec.add_one:
            data = data.astype(np.float32, copy=False) + np.float32(1.0)
        if t.qtype in (T.F32, T.F16):
            check_finite(data, t.name)
            return np.ascontiguousarray(data, dtype=np.float32 if t.qtype == T.F32 else np.float16)
        return quantize_array(np.ascontiguousarray(data, dtype=np.float32), t.qtype, name=t.name)

    result = writer.write(output, produce, progress=False)
    counts: dict[str, int] = {}
    for t in writer.tensors:
        counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
    return result.path, counts, result.checks


def file_type_of(base: T) -> gguf.LlamaFileType:
    return {T.F32: gguf.LlamaFileType.ALL_F32, T.F16: gguf.LlamaFileType.MOSTLY_F16,
            T.BF16: gguf.LlamaFileType.MOSTLY_BF16, T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}[base]


def mmproj_path(text_output: Path) -> Path:
    """The projector's file beside the text model's: ``mmproj-<text file name>`` (llama.cpp's naming)."""
    return text_output.with_name(f"mmproj-{text_output.name}")


# ----------------------------------------------------------------------------- the entry points


def convert_vlm(model_dir: Path, output: Path, quant: str, *, tensor_source: TensorSource | None = None,
                config: dict | None = None, name: str | None = None, extra_dirs: tuple[Path, ...] = (),
                source_dir: Path | None = None, notes: list[str] | None = None, **convert_kwargs: Any):
    """Convert a vision-language folder (or, with ``tensor_source``, its merged tensors under canonical names)
    to the text GGUF at ``output`` and the mmproj beside it; the report's checks name both files."""
    from .convert import convert_model, read_config

    model_dir, output = Path(model_dir), Path(output)
    config = config if config is not None else read_config(model_dir)
    spec = find_vision_arch(config)
    if spec is None:
        raise LlmforgeError(f"{model_dir} is not a supported vision-language model",
                            hint="supported: " + ", ".join(a for s in VISION_REGISTRY for a in s.hf_architectures))
    if not any((d / f).is_file() for d in (model_dir, *extra_dirs) for f in ("tokenizer.json", "tokenizer.model")):
        raise LlmforgeError(f"no tokenizer in {model_dir} (tokenizer.json or tokenizer.model)",   # not the staged copy
                            hint="copy the model's tokenizer files into the folder")
    source = tensor_source if tensor_source is not None else canonical_source(spec, model_dir)
    name = name or model_dir.resolve().name
    proj_path = mmproj_path(output)
    # under a hidden name until the text GGUF is written: a failed run leaves an earlier pair whole, no new half
    pending = proj_path.with_name(f".{proj_path.name}.pending")
    _, proj_counts, proj_checks = write_mmproj(spec, model_dir, config, source, pending, quant, name)
    try:
        with staged_text_folder(spec, model_dir, config, extra_dirs) as staged:
            report = convert_model(staged, output, quant, tensor_source=text_source(spec, source), name=name,
                                   source_dir=source_dir if source_dir is not None else model_dir,
                                   **convert_kwargs)
        os.replace(pending, proj_path)
    except BaseException:
        pending.unlink(missing_ok=True)
        raise
    types = ", ".join(f"{n} {t}" for t, n in sorted(proj_counts.items()))
    report.checks[0:0] = list(notes or [])
    report.checks.append(f"mmproj: wrote {proj_path} ({proj_path.stat().st_size / 2**20:.1f} MiB, clip/{spec.name}, "
                         f"{sum(proj_counts.values())} tensors: {types})")
    report.checks.extend(f"mmproj {c}" for c in proj_checks)
    report.mmproj = proj_path
    return report


def convert_vlm_adapter(adapter: Any, base_model: Any, adapter_dir: Path, output: Path | None, quant: str, *,
                        name: str | None = None, **convert_kwargs: Any):
    """A PEFT adapter of a vision-language model, merged layer by layer into its base: the text GGUF at
    ``output`` (default ``<adapter folder>-<quant>.gguf``) and the mmproj beside it (a projector trained through
    ``modules_to_save`` is taken from the adapter)."""
    from ..quant.api import resolve_ftype
    from .convert import read_config
    from .merge import MergedSource

    adapter_dir = Path(adapter_dir)
    config = read_config(base_model.path)
    spec = find_vision_arch(config)
    out = Path(output) if output is not None else \
        adapter_dir.resolve().parent / f"{adapter_dir.resolve().name}-{resolve_ftype(quant).name}.gguf"
    merged = MergedSource(adapter, base_model, inner=canonical_source(spec, base_model.path))
    if merged.untie or merged.vocab_size is not None:
        raise LlmforgeError("vision-language adapters that change embed_tokens/lm_head cannot be converted yet",
                            hint="train without embed_tokens/lm_head in target_modules/modules_to_save")
    where = base_model.note or f"merged onto {base_model.path}"
    return convert_vlm(base_model.path, out, quant, tensor_source=merged, config=config,
                       name=name or adapter_dir.resolve().name, extra_dirs=(adapter_dir,), source_dir=adapter_dir,
                       notes=[f"adapter: {adapter.describe()}; {where}", *merged.notes], **convert_kwargs)


def vision_merge_view(adapter: Any, base_model: Any) -> tuple[Any, RenamedSource] | None:
    """For ``llmforge merge`` of a vision-language adapter: (the MergedSource over the base's canonical names,
    the same tensors under the published checkpoint names); None for text bases."""
    from .convert import read_config
    from .merge import MergedSource

    spec = find_vision_arch(read_config(base_model.path))
    if spec is None:
        return None
    merged = MergedSource(adapter, base_model, inner=canonical_source(spec, base_model.path))
    published = {}
    for name in merged.names():
        swapped = swap_prefix(name, spec.published)
        published[swapped if swapped is not None else name] = name
    return merged, RenamedSource(merged, published)
