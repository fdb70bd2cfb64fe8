"""``llmforge inspect``: what a GGUF file holds, as a dict (for ``--json``) or as readable lines."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType, LlamaFileType

from ..errors import LlmforgeError
from .gguf_header import LongArray, read_header, truncated_tensor

TOKENIZER_IDS = ("bos", "eos", "eot", "unknown", "padding")


def _type_name(qtype: int) -> str:
    try:
        return GGMLQuantizationType(qtype).name
    except ValueError:
        return f"type{qtype}"


def _file_type_name(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return LlamaFileType(int(value)).name.removeprefix("MOSTLY_")
    except ValueError:
        return str(value)


def _length(value: Any) -> int:
    return value.count if isinstance(value, LongArray) else len(value or [])


def inspect_gguf(path: str | Path) -> dict[str, Any]:
    """Architecture, parameter count, file type, tensor type histogram, tokenizer and chat template facts."""
    path = Path(path)
    if not path.is_file():
        raise LlmforgeError(f"{path} does not exist", hint="pass a .gguf file")
    try:
        header = read_header(path)
    except (ValueError, OSError) as exc:
        raise LlmforgeError(f"{path} is not a readable GGUF file ({exc})", hint="re-create it") from exc
    kv = header.kv
    arch = kv.get("general.architecture")
    n_params = sum(math.prod(t.shape) for t in header.tensors)
    histogram = Counter(_type_name(t.qtype) for t in header.tensors)
    tokens = kv.get("tokenizer.ggml.tokens")
    template = kv.get("tokenizer.chat_template")
    named_templates = sorted(k.removeprefix("tokenizer.chat_template.") for k in kv
                             if k.startswith("tokenizer.chat_template."))
    return {
        "path": str(path),
        "file_size": header.file_size,
        "gguf_version": header.version,
        "architecture": arch,
        "type": kv.get("general.type"),
        "name": kv.get("general.name"),
        "parameters": n_params,
        "file_type": _file_type_name(kv.get("general.file_type")),
        "quantization_version": kv.get("general.quantization_version"),
        "n_tensors": len(header.tensors),
        "tensor_types": dict(sorted(histogram.items())),
        "hparams": {k.removeprefix(f"{arch}."): v for k, v in kv.items()
                    if arch and k.startswith(f"{arch}.") and not isinstance(v, LongArray)},
        "tokenizer": None if tokens is None else {
            "model": kv.get("tokenizer.ggml.model"),
            "pre": kv.get("tokenizer.ggml.pre"),
            "n_tokens": _length(tokens),
            "n_merges": _length(kv.get("tokenizer.ggml.merges")),
            **{f"{name}_id": kv.get(f"tokenizer.ggml.{name}_token_id") for name in TOKENIZER_IDS},
            "add_bos": kv.get("tokenizer.ggml.add_bos_token"),
            "add_eos": kv.get("tokenizer.ggml.add_eos_token"),
        },
        "chat_template": template is not None,
        "chat_template_chars": len(template) if isinstance(template, str) else 0,
        "named_chat_templates": named_templates,
        "truncated": truncated_tensor(header),   # (tensor, bytes it needs) when the file is cut short
    }


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{int(n)}"
        n /= 1000
    return f"{n:.1f}P"


def format_inspection(info: dict[str, Any]) -> str:
    """Readable lines for ``inspect_gguf``'s dict."""
    lines = [
        f"file:          {info['path']} ({info['file_size'] / 2**20:.1f} MiB, GGUF v{info['gguf_version']})",
        f"architecture:  {info['architecture']}" + (f" ({info['type']})" if info.get("type") else ""),
        f"name:          {info['name']}",
        f"parameters:    {_human(info['parameters'])} ({info['parameters']:,})",
        f"file type:     {info['file_type']}",
        f"tensors:       {info['n_tensors']}: " + ", ".join(f"{n} {t}" for t, n in info["tensor_types"].items()),
    ]
    tok = info["tokenizer"]
    if tok:
        ids = ", ".join(f"{k[:-3]}={tok[k]}" for k in (f"{n}_id" for n in TOKENIZER_IDS) if tok[k] is not None)
        pre = f", pre={tok['pre']}" if tok["pre"] else ""
        lines.append(f"tokenizer:     {tok['model']}{pre}, {tok['n_tokens']} tokens, {tok['n_merges']} merges; {ids}")
    else:
        lines.append("tokenizer:     none")
    chat = f"yes ({info['chat_template_chars']} chars)" if info["chat_template"] else "no"
    if info["named_chat_templates"]:
        chat += "; named: " + ", ".join(info["named_chat_templates"])
    lines.append(f"chat template: {chat}")
    if info.get("truncated"):
        name, needed = info["truncated"]
        lines.append(f"TRUNCATED:     tensor {name} needs {needed:,} bytes, the file has {info['file_size']:,} "
                     "(copy or download it again, or re-convert it)")
    return "\n".join(lines)
