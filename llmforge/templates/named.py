"""llmforge's own family chat templates (Jinja, written for llmforge), used by ``--chat-template NAME`` and as
the translator's fallback. Each one is translated and verified by rendering like any other template."""

from __future__ import annotations

from importlib import resources

from ..errors import LlmforgeError

# Marker text in a template -> the named family it belongs to (first match wins).
FAMILY_MARKERS: list[tuple[str, str]] = [
    ("<|start_header_id|>", "llama3"),
    ("<start_of_turn>", "gemma"),
    ("<<SYS>>", "llama2"),
    ("[INST]", "mistral"),
    ("<|im_start|>", "chatml"),
    ("<|user|>", "phi3"),
    ("<｜User｜>", "deepseek"),
    ("<|START_OF_TURN_TOKEN|>", "command-r"),
]
DEFAULT_FAMILY = "chatml"


def list_named_templates() -> list[str]:
    """Names of llmforge's family templates."""
    folder = resources.files(__package__) / "named"
    return sorted(p.name.removesuffix(".jinja") for p in folder.iterdir() if p.name.endswith(".jinja"))


def get_named_template(name: str) -> str:
    """The Jinja source of a named family template."""
    if name not in list_named_templates():
        raise LlmforgeError(f"unknown chat template name {name!r}",
                            hint="choose one of: " + ", ".join(list_named_templates()))
    return (resources.files(__package__) / "named" / f"{name}.jinja").read_text()


def closest_named_template(chat_template: str) -> str:
    """The family template whose turn markers the given template uses."""
    for marker, name in FAMILY_MARKERS:
        if marker in chat_template:
            return name
    return DEFAULT_FAMILY
