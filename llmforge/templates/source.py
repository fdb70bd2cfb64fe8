"""Where a chat template comes from: a Hugging Face model folder, a PEFT adapter folder, or a GGUF file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LlmforgeError

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
LICENSE_NAMES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "license", "license.txt")
TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


@dataclass
class TemplateSource:
    """A chat template with what is needed to render it like transformers and to write a Modelfile."""

    chat_template: str | None
    special_tokens: dict[str, str] = field(default_factory=dict)
    context_length: int | None = None
    license_text: str | None = None
    origin: str = ""
    eos_tokens: list[str] = field(default_factory=list)  # every end-of-generation token known (eos, eot...)


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("content")
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LlmforgeError(f"cannot read {path}: {exc}", hint="check the model folder") from None


def _template_from_folder(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    chat_json = folder / "chat_template.json"
    if chat_json.exists():
        value = _read_json(chat_json).get("chat_template")
        if value:
            return _pick_template(value)
    config = folder / "tokenizer_config.json"
    if config.exists():
        value = _read_json(config).get("chat_template")
        if value:
            return _pick_template(value)
    return None


def _pick_template(value: Any) -> str:
    """A template may be a list of named ones; the ``default`` one is what apply_chat_template uses."""
    if isinstance(value, str):
        return value
    named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
    return named.get("default") or next(iter(named.values()))


def _tokens_from_folder(folder: Path) -> dict[str, str]:
    tokens: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if path.exists():
            data = _read_json(path)
            for key in TOKEN_NAMES:
                text = _token_text(data.get(key))
                if text is not None:
                    tokens[key] = text
    return tokens


def _context_from_config(config: dict[str, Any]) -> int | None:
    for scope in (config, config.get("text_config") or {}):
        for key in CONTEXT_KEYS:
            if isinstance(scope.get(key), int):
                return scope[key]
    return None


def _license(folder: Path) -> str | None:
    for name in LICENSE_NAMES:
        if (folder / name).is_file():
            return (folder / name).read_text(encoding="utf-8", errors="replace")
    return None


def _eos_tokens(folder: Path, tokens: dict[str, str]) -> list[str]:
    """eos plus the generation_config's extra eos ids, resolved through tokenizer.json's added tokens."""
    found = [tokens["eos_token"]] if tokens.get("eos_token") else []
    gen = folder / "generation_config.json"
    tok = folder / "tokenizer.json"
    if gen.exists() and tok.exists():
        ids = _read_json(gen).get("eos_token_id")
        ids = ids if isinstance(ids, list) else [ids] if isinstance(ids, int) else []
        try:
            added = {t["id"]: t["content"] for t in json.loads(tok.read_text(encoding="utf-8")).get("added_tokens", [])}
        except (OSError, ValueError):
            added = {}
        found += [added[i] for i in ids if i in added and added[i] not in found]
    return found


def _from_folder(folder: Path) -> TemplateSource:
    adapter = (folder / "adapter_config.json").exists()
    template = _template_from_folder(folder)
    tokens = _tokens_from_folder(folder)
    context = _context_from_config(_read_json(folder / "config.json")) if (folder / "config.json").exists() else None
    base_note = ""
    if adapter and (template is None or not tokens or context is None):
        base = _read_json(folder / "adapter_config.json").get("base_model_name_or_path")
        base_dir = Path(base) if base else None
        if base_dir and base_dir.is_dir():
            base_source = _from_folder(base_dir)
            template = template or base_source.chat_template  # the adapter's own template wins
            tokens = {**base_source.special_tokens, **tokens}
            context = context or base_source.context_length
            base_note = f" (base {base_dir})"
    return TemplateSource(template, tokens, context, _license(folder), f"{folder}{base_note}",
                          _eos_tokens(folder, tokens))


def _from_gguf(path: Path) -> TemplateSource:
    import gguf

    from ..export.gguf_header import read_header, truncated_tensor

    try:
        header = read_header(path)
    except ValueError as exc:
        raise LlmforgeError(f"cannot read GGUF {path}: {exc}", hint="is it a complete .gguf file?") from None
    if header.kv.get("general.architecture") == "clip":   # "no chat template" would send the user elsewhere
        raise LlmforgeError(f"{path} is a vision projector (mmproj), not a model",
                            hint="pass the text GGUF written beside it")
    short = truncated_tensor(header)
    if short is not None:
        raise LlmforgeError(f"{path} is truncated: tensor {short[0]} needs {short[1]} bytes, the file has "
                            f"{header.file_size}", hint="copy or download it again, or re-convert it")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # a broken or non-GGUF file
        raise LlmforgeError(f"cannot read GGUF {path}: {exc}", hint="is it a complete .gguf file?") from None

    def value(key: str) -> Any:
        f = reader.get_field(key)
        return None if f is None else f.contents()

    tokens_list = value("tokenizer.ggml.tokens") or []
    tokens: dict[str, str] = {}
    eos: list[str] = []
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"),
                      ("padding", "pad_token"), ("eot", None)):
        token_id = value(f"tokenizer.ggml.{key}_token_id")
        if isinstance(token_id, int) and 0 <= token_id < len(tokens_list):
            if name:
                tokens[name] = tokens_list[token_id]
            if key in ("eos", "eot") and tokens_list[token_id] not in eos:
                eos.append(tokens_list[token_id])
    arch = value("general.architecture")
    context = value(f"{arch}.context_length") if arch else None
    license_name = value("general.license")
    return TemplateSource(value("tokenizer.chat_template"), tokens, context,
                          license_name if isinstance(license_name, str) else None, str(path), eos)


def load_template_source(path: str | Path) -> TemplateSource:
    """Read the chat template, special tokens, context length and license from a folder or a GGUF."""
    path = Path(path)
    if not path.exists():
        raise LlmforgeError(f"{path} does not exist", hint="pass a model folder, an adapter folder or a .gguf file")
    if path.is_file():
        with path.open("rb") as fh:
            if fh.read(4) != b"GGUF":
                raise LlmforgeError(f"{path} is not a GGUF file", hint="pass a model folder or a .gguf file")
        return _from_gguf(path)
    return _from_folder(path)


def require_template(source: TemplateSource) -> str:
    """The chat template, or a one-line error suggesting ``--chat-template NAME``."""
    if not source.chat_template:
        from .named import list_named_templates

        raise LlmforgeError(f"no chat template in {source.origin}",
                            hint="pass --chat-template NAME, one of: " + ", ".join(list_named_templates()))
    return source.chat_template
