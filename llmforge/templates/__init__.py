"""Chat templates: Jinja -> Ollama Go translation verified by rendering, named family templates, sources.

Stable public API (the Modelfile generator and the trainer build on these names):

- ``translate_template(chat_template, special_tokens=None) -> Translation``: ``.go_template``, ``.fallback``
  (named template used, or None), ``.problems`` (each unsupported construct with its line), ``.default_system``.
- ``load_template_source(path) -> TemplateSource``: chat template, special tokens, context length, license
  from a model folder, a PEFT adapter folder or a GGUF.
- ``render_jinja(chat_template, messages, tools=None, special_tokens=None)``: transformers-faithful render.
- ``render_go(go_template, messages, tools=None)``: Ollama-faithful render with the Go renderer.
- ``check_template(chat_template, tokens, go_template=None, conversations=None) -> CheckReport``.
- ``get_named_template(name) -> str`` (Jinja), ``list_named_templates() -> list[str]``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CheckReport", "TemplateSource", "Translation", "check_template", "get_named_template",
    "list_named_templates", "load_template_source", "render_go", "render_jinja", "translate_template",
]

_HOMES = {
    "translate_template": "translate", "Translation": "translate",
    "load_template_source": "source", "TemplateSource": "source",
    "render_jinja": "jinja_render", "render_go": "go_render",
    "check_template": "check", "CheckReport": "check",
    "get_named_template": "named", "list_named_templates": "named",
}


def __getattr__(name: str) -> Any:  # lazy: importing the package stays cheap
    if name not in _HOMES:
        raise AttributeError(name)
    import importlib

    module = importlib.import_module(f".{_HOMES[name]}", __name__)
    return getattr(module, name)
