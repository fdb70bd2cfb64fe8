"""PEFT LoRA adapter folders: read, validate against the base, resolve the base, and convert to GGUF.

An adapter folder holds ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's layout, also written by
Unsloth, TRL and llmforge). Keys look like ``base_model.model.<module>.lora_A.weight``; embeddings use
``lora_embedding_A``/``lora_embedding_B`` (A: r x vocab, B: dim x r, delta = (B @ A).T); DoRA adds
``<module>.lora_magnitude_vector``; ``modules_to_save`` and resized embeddings are stored as whole tensors.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import LlmforgeError

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
# Options of LoraConfig whose weights cannot be expressed as "W + scale * B @ A" (or DoRA): refused.
UNSUPPORTED_OPTIONS: dict[str, str] = {
    "layer_replication": "layer replication (duplicated layers share weights)",
    "target_parameters": "LoRA on raw parameters (MoE experts)",
    "trainable_token_indices": "trainable token indices",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "arrow_config": "Arrow routing",
    "use_bdlora": "BD-LoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
}
# A 4-bit base's usual names and the 16-bit folder names to look for beside it.
FOUR_BIT_SUFFIXES = ("-unsloth-bnb-4bit", "-bnb-4bit", "-bnb-nf4", "-4bit", "_4bit")

_LORA_LINEAR = re.compile(r"(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.(?P<param>weight|bias)")
_LORA_EMBEDDING = re.compile(r"(?P<module>.+)\.lora_embedding_(?P<ab>[AB])(?:\.[^.]+)?")
_MAGNITUDE = re.compile(r"(?P<module>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?")


def _whole_tensor_target(name: str) -> tuple[str, int]:
    """The base tensor a saved whole tensor replaces, and its priority: the trained ``modules_to_save`` copy
    wins over a plain key, which wins over a LoRA layer's saved ``base_layer`` (resized embeddings)."""
    if ".modules_to_save." in name:
        prefix, rest = name.split(".modules_to_save.", 1)
        return f"{prefix}.{rest.rsplit('.', 1)[-1]}", 2
    if ".base_layer." in name:
        return name.replace(".base_layer.", "."), 0
    return name, 1


@dataclass(frozen=True)
class LoraModule:
    """One adapted base module: where its factors are in the adapter file and how to scale them."""

    module: str                  # e.g. "model.layers.0.self_attn.q_proj"
    a_key: str
    b_key: str
    rank: int
    alpha: float
    scale: float                 # alpha / r, or alpha / sqrt(r) with rsLoRA
    embedding: bool = False      # lora_embedding_A/B: delta = (B @ A).T
    magnitude_key: str | None = None   # DoRA magnitude vector
    bias_key: str | None = None        # lora_bias: B's bias, merged into the base bias
    fan_in_fan_out: bool = False

    @property
    def weight_name(self) -> str:
        return f"{self.module}.weight"

    @property
    def bias_name(self) -> str:
        return f"{self.module}.bias"


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key that matches the end of ``module``
    at a dot boundary (keys are regular expressions)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """The factor LoRA multiplies ``B @ A`` by."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise LlmforgeError(f"{path} is not valid JSON ({exc})", hint="fix or re-save the adapter") from exc
    if not isinstance(data, dict):
        raise LlmforgeError(f"{path} is not a JSON object", hint="fix or re-save the adapter")
    return data


def _read_safetensors_header(path: Path) -> dict[str, dict]:
    from .source import _read_header  # the exporter's validating header reader

    return _read_header(path)


@dataclass
class PeftAdapter:
    """A validated PEFT LoRA adapter folder (factors are loaded lazily, one module at a time)."""

    path: Path
    config: dict
    weights_path: Path
    modules: dict[str, LoraModule]              # by base weight name ("<module>.weight")
    whole_tensors: dict[str, str]               # base tensor name -> adapter key (modules_to_save, resized vocab)
    saved_base_layers: set[str] = field(default_factory=set)  # whole tensors PEFT saved as "<module>.base_layer"
    header: dict[str, dict] = field(repr=False, default_factory=dict)
    _handle: Any = field(default=None, repr=False, compare=False)
    _data_start: int | None = field(default=None, repr=False, compare=False)

    @property
    def use_dora(self) -> bool:
        return any(m.magnitude_key for m in self.modules.values())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def load(self, key: str) -> torch.Tensor:
        """One tensor of the adapter file, as stored (the file stays open: adapters are read many times)."""
        from safetensors import SafetensorError, safe_open

        try:
            if self._handle is None:
                self._handle = safe_open(self.weights_path, framework="pt")
            return self._handle.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise LlmforgeError(f"cannot read {key!r} from {self.weights_path} ({exc})",
                                hint="the adapter weights are corrupt; re-save the adapter") from exc

    def load_array(self, key: str) -> np.ndarray:
        """One tensor of the adapter file as numpy (float dtypes as float32), read without torch."""
        from .source import data_start_of, read_array, widen

        if self._data_start is None:
            self._data_start = data_start_of(self.weights_path)
        info = self.header[key]
        return widen(read_array(self.weights_path, self._data_start, info, where=key), info["dtype"])

    def factors(self, module: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in float32 and in Linear layout: A is (r, in), B is (out, r)."""
        return self.load(module.a_key).float(), self.load(module.b_key).float()

    def factors_array(self, module: LoraModule) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`factors` as float32 numpy arrays."""
        return self.load_array(module.a_key), self.load_array(module.b_key)

    def check_values(self) -> None:
        """Read every factor once (adapters are small) so corrupt values fail before any output is written."""
        for m in self.modules.values():
            for name, t in zip(("A", "B"), self.factors_array(m)):
                if not np.isfinite(t).all():
                    raise LlmforgeError(f"adapter factor {name} of {m.module} holds NaN/Inf values",
                                        hint="the adapter weights are corrupt or training diverged")
            if m.magnitude_key and not np.isfinite(self.load_array(m.magnitude_key)).all():
                raise LlmforgeError(f"DoRA magnitude of {m.module} holds NaN/Inf values",
                                    hint="the adapter weights are corrupt or training diverged")

    def delta(self, module: LoraModule) -> torch.Tensor:
        """``scale * B @ A`` in float32, in the base weight's layout."""
        a, b = self.factors(module)
        d = (b @ a) * module.scale
        if module.embedding or module.fan_in_fan_out:
            d = d.T
        return d

    def delta_array(self, module: LoraModule) -> np.ndarray:
        """:meth:`delta` in numpy, the same float32 operations in the same order (checked bitwise against
        torch's matmul: for rank-r factors each element is one length-r dot product)."""
        a, b = self.factors_array(module)
        d = b @ a
        d *= np.float32(module.scale)
        if module.embedding or module.fan_in_fan_out:
            d = d.T
        return d

    def describe(self) -> str:
        ranks = sorted({m.rank for m in self.modules.values()})
        kinds = ["DoRA" if self.use_dora else "LoRA", f"rank {'/'.join(map(str, ranks)) or '-'}"]
        if self.config.get("use_rslora"):
            kinds.append("rsLoRA")
        return (f"{', '.join(kinds)} on {len(self.modules)} modules"
                + (f", {len(self.whole_tensors)} replaced tensors" if self.whole_tensors else ""))


def _check_config(config: dict, where: Path) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LlmforgeError(f"{where} is a {peft_type} adapter; only LoRA (and DoRA) adapters can be merged",
                            hint="export LoRA adapters, or merge this one with PEFT and convert the full model")
    for option, what in UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise LlmforgeError(f"{where} uses {what} ({option}), which llmforge cannot merge",
                                hint="merge with PEFT's merge_and_unload() and convert the merged folder")
    try:
        r = int(config["r"])
        float(config.get("lora_alpha", r))
    except (KeyError, TypeError, ValueError) as exc:
        raise LlmforgeError(f"{where} lacks a valid 'r'/'lora_alpha'", hint="fix or re-save the adapter") from exc
    if r <= 0:
        raise LlmforgeError(f"{where} has rank r={r}", hint="fix or re-save the adapter")


def read_adapter(path: str | Path) -> PeftAdapter:
    """Read and validate a PEFT adapter folder (config, key layout, factor shapes among themselves)."""
    path = Path(path)
    if not path.is_dir():
        raise LlmforgeError(f"adapter folder {path} does not exist", hint="pass the folder saved by save_pretrained")
    config_path = path / ADAPTER_CONFIG
    if not config_path.is_file():
        raise LlmforgeError(f"no {ADAPTER_CONFIG} in {path}", hint="pass a PEFT adapter folder")
    config = _read_json(config_path)
    _check_config(config, config_path)
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            raise LlmforgeError(f"{path} holds adapter_model.bin (pickle), which llmforge does not load",
                                hint="re-save with save_pretrained(..., safe_serialization=True)")
        raise LlmforgeError(f"no {ADAPTER_WEIGHTS} in {path}", hint="the adapter folder is incomplete")
    header = _read_safetensors_header(weights)
    modules, whole = _parse_keys(header, config, weights)
    if not modules and not whole:
        raise LlmforgeError(f"{weights} holds no LoRA factors", hint="the adapter is empty or not a LoRA adapter")
    saved = {n for n, k in whole.items() if ".base_layer." in k}
    return PeftAdapter(path, config, weights, modules, whole, saved, header)


def _parse_keys(header: dict[str, dict], config: dict, where: Path) -> tuple[dict[str, LoraModule], dict[str, str]]:
    parts: dict[str, dict[str, str]] = {}
    embedding: set[str] = set()
    whole: dict[str, str] = {}
    whole_priority: dict[str, int] = {}
    for key in header:
        name = key.removeprefix(KEY_PREFIX)
        if m := _LORA_LINEAR.fullmatch(name):
            parts.setdefault(m["module"], {})[m["ab"] + ("" if m["param"] == "weight" else "_bias")] = key
        elif m := _LORA_EMBEDDING.fullmatch(name):
            parts.setdefault(m["module"], {})[m["ab"]] = key
            embedding.add(m["module"])
        elif m := _MAGNITUDE.fullmatch(name):
            parts.setdefault(m["module"], {})["magnitude"] = key
        elif ".lora_" in name:
            raise LlmforgeError(f"{where}: unrecognised LoRA tensor {key!r}",
                                hint="the adapter uses a PEFT variant llmforge does not merge")
        elif ".original_module." not in name:   # PEFT's copy of the untrained module: not needed
            target, priority = _whole_tensor_target(name)
            if priority >= whole_priority.get(target, -1):
                whole[target], whole_priority[target] = key, priority
    rslora = bool(config.get("use_rslora"))
    r0, alpha0 = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    modules: dict[str, LoraModule] = {}
    for module, p in parts.items():
        if "A" not in p or "B" not in p:
            raise LlmforgeError(f"{where}: module {module} has lora_{'B' if 'A' in p else 'A'} missing",
                                hint="the adapter weights are incomplete; re-save the adapter")
        if "A_bias" in p:
            raise LlmforgeError(f"{where}: lora_A of {module} has a bias", hint="not a PEFT LoRA layout")
        is_emb = module in embedding
        a_shape, b_shape = header[p["A"]]["shape"], header[p["B"]]["shape"]
        rank = int(pattern_value(rank_pattern, module, r0))
        alpha = float(pattern_value(alpha_pattern, module, alpha0))
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != rank or b_shape[1] != rank:
            raise LlmforgeError(f"{where}: {module} has factors A{a_shape} B{b_shape}, but the config says rank {rank}",
                                hint="adapter_config.json does not belong to these weights")
        if is_emb and "magnitude" in p:
            raise LlmforgeError(f"{where}: DoRA on embedding {module} is not supported",
                                hint="merge with PEFT's merge_and_unload() and convert the merged folder")
        modules[f"{module}.weight"] = LoraModule(
            module=module, a_key=p["A"], b_key=p["B"], rank=rank, alpha=alpha,
            scale=lora_scale(alpha, rank, rslora), embedding=is_emb, magnitude_key=p.get("magnitude"),
            bias_key=p.get("B_bias"), fan_in_fan_out=bool(config.get("fan_in_fan_out")) and not is_emb)
    return modules, whole


# ---------------------------------------------------------------- base model resolution


def is_4bit_config(config: dict) -> bool:
    q = config.get("quantization_config") or {}
    return bool(q.get("load_in_4bit")) or (q.get("quant_method") == "bitsandbytes" and
                                           q.get("bnb_4bit_quant_type") is not None and not q.get("load_in_8bit"))


@dataclass(frozen=True)
class BaseModel:
    """The folder the adapter is merged onto, and how it was found."""

    path: Path
    nf4: bool = False            # weights stored as bitsandbytes NF4: merged onto the dequantized base
    note: str = ""


def resolve_base(adapter: PeftAdapter, base: str | Path | None = None) -> BaseModel:
    """``base`` if given, else ``base_model_name_or_path`` when it is a local folder; prefer a 16-bit base."""
    named = adapter.config.get("base_model_name_or_path")
    if base is not None:
        path = Path(base)
        if not (path / "config.json").is_file():
            raise LlmforgeError(f"--base {path} is not a model folder (no config.json)",
                                hint="pass the Hugging Face folder of the model the adapter was trained on")
    else:
        candidates = [Path(named), adapter.path / named] if named else []
        path = next((c for c in candidates if (c / "config.json").is_file()), None)
        if path is None:
            what = f"the adapter's base model {named!r} is not a local folder" if named else \
                f"{adapter.path / ADAPTER_CONFIG} names no base model"
            raise LlmforgeError(what, hint=f"pass --base /path/to/{Path(named).name if named else 'base-model'} "
                                           "(the base model folder with config.json and *.safetensors)")
    config = _read_json(path / "config.json")
    if not is_4bit_config(config):
        method = (config.get("quantization_config") or {}).get("quant_method")
        if method:
            kind = "bitsandbytes 8-bit" if method == "bitsandbytes" else method
            raise LlmforgeError(f"the base {path} is quantized ({kind}); only 16-bit and bitsandbytes NF4 bases "
                                "can be merged", hint="pass the 16-bit model with --base")
        return BaseModel(path)
    for sibling in _sixteen_bit_candidates(path):
        if (sibling / "config.json").is_file() and not is_4bit_config(_read_json(sibling / "config.json")):
            return BaseModel(sibling, note=f"merged onto the 16-bit base {sibling} (found beside the 4-bit {path.name})")
    return BaseModel(path, nf4=True, note=f"merged onto the NF4-dequantized base {path} (not exact: no 16-bit base "
                                          "found; pass --base with the 16-bit model for an exact merge)")


def _sixteen_bit_candidates(path: Path) -> Iterator[Path]:
    name = path.resolve().name
    for suffix in FOUR_BIT_SUFFIXES:
        if name.lower().endswith(suffix):
            yield path.resolve().with_name(name[: -len(suffix)])


def check_against_base(adapter: PeftAdapter, names: set[str], shape_of) -> None:
    """Every adapted module must exist in the base with matching shapes (vocab may be resized by the adapter)."""
    resized = {n: adapter.shape(k) for n, k in adapter.whole_tensors.items()}
    for name, key in adapter.whole_tensors.items():
        if name not in names and not name.endswith(".bias"):
            raise LlmforgeError(f"the adapter replaces {name}, which the base model does not have",
                                hint="the adapter was trained on another model; pass the right --base")
    missing = [m.module for name, m in adapter.modules.items() if name not in names]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LlmforgeError(f"the adapter targets {missing[0]}{more}, which the base model does not have",
                            hint="the adapter was trained on another model; pass the right --base")
    for name, m in adapter.modules.items():
        base_shape = resized.get(name, tuple(shape_of(name)))
        a, b = adapter.shape(m.a_key), adapter.shape(m.b_key)
        want = (a[1], b[0]) if m.embedding else (b[0], a[1])
        if m.fan_in_fan_out:
            want = want[::-1]
        if tuple(base_shape) != want:
            vocab_hint = " (different vocabulary and no resized embedding in the adapter)" if m.embedding or \
                "lm_head" in name else ""
            raise LlmforgeError(f"adapter module {m.module} is {want[0]}x{want[1]} but the base tensor is "
                                f"{'x'.join(map(str, base_shape))}{vocab_hint}",
                                hint="the adapter was trained on another model; pass the right --base")
        if m.magnitude_key and adapter.shape(m.magnitude_key)[-1] != want[0]:
            raise LlmforgeError(f"DoRA magnitude of {m.module} has {adapter.shape(m.magnitude_key)} entries, "
                                f"expected {want[0]}", hint="the adapter weights are corrupt")
        if m.bias_key and m.bias_name not in names:
            raise LlmforgeError(f"the adapter trains a bias of {m.module} (lora_bias), but the base has none",
                                hint="the adapter was trained on another model; pass the right --base")


# ---------------------------------------------------------------- tokenizer and config staging


def has_tokenizer_files(folder: Path) -> bool:
    return any((folder / f).is_file() for f in TOKENIZER_FILES)


@contextmanager
def staged_folder(base_dir: Path, adapter_dir: Path, config_overrides: dict[str, Any]) -> Iterator[Path]:
    """A temporary folder with the base's config (plus overrides) and tokenizer, the adapter's tokenizer files
    laid over it (a trained chat template wins over the base's). Weights are not copied."""
    with tempfile.TemporaryDirectory(prefix="llmforge-adapter-") as tmp:
        staged = Path(tmp) / base_dir.resolve().name
        staged.mkdir()
        config = _read_json(base_dir / "config.json")
        config.update(config_overrides)
        config.pop("quantization_config", None)
        (staged / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        for folder in (base_dir, adapter_dir):
            for f in (*TOKENIZER_FILES, "generation_config.json"):
                if (folder / f).is_file() and not (folder is adapter_dir and f == "generation_config.json"):
                    shutil.copy(folder / f, staged / f)
        yield staged


# ---------------------------------------------------------------- convert (the CLI's entry)


def convert_adapter(source: str | Path, output: str | Path | None, quant: str = "f16", *,
                    base: str | Path | None = None, lora_only: bool = False, imatrix: Any = None,
                    name: str | None = None, overrides: Any = None, backend: str = "auto"):
    """Convert a PEFT adapter folder to GGUF: merged into its base (streaming), or as a GGUF LoRA adapter.

    ``backend``: where K-types are packed (:func:`llmforge.quant.api.resolve_backend`)."""
    from ..quant.api import resolve_ftype
    from .convert import ConvertReport, convert_model

    source = Path(source)
    adapter = read_adapter(source)
    base_model = resolve_base(adapter, base)
    from .vision import convert_vlm_adapter, find_vision_arch

    if find_vision_arch(_read_json(base_model.path / "config.json")) is not None and not lora_only:
        return convert_vlm_adapter(adapter, base_model, source, output, quant, imatrix=imatrix, name=name,
                                   overrides=overrides, backend=backend)
    if lora_only:
        from .lora_gguf import write_lora_gguf

        out = Path(output) if output is not None else source.resolve().parent / f"{source.resolve().name}-lora.gguf"
        return write_lora_gguf(adapter, base_model, out, quant=quant)
    from .merge import MergedSource

    ftype = resolve_ftype(quant)
    out = Path(output) if output is not None else \
        source.resolve().parent / f"{source.resolve().name}-{ftype.name}.gguf"
    merged = MergedSource(adapter, base_model)
    with staged_folder(base_model.path, source, merged.config_overrides()) as staged:
        report: ConvertReport = convert_model(staged, out, quant, tensor_source=merged, imatrix=imatrix,
                                              name=name or source.resolve().name, overrides=overrides,
                                              backend=backend, source_dir=source)
    report.checks.insert(0, f"adapter: {adapter.describe()}" + (f"; {base_model.note}" if base_model.note else
                                                                f"; merged onto {base_model.path}"))
    report.checks[1:1] = merged.notes
    return report
