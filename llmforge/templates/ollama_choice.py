"""Which template Ollama >= 0.30 uses: our Go TEMPLATE or the GGUF's own Jinja (shared/docs/ollama.md, section 6).

Ollama decides by substring heuristics (`server/images.go`); these functions restate them so that the
translator's output can be tested against them and the push report can say which template the server uses.
"""

from __future__ import annotations

ROUND_TRIP_MARKERS = ('eq .Role "tool"', "tool_response", "TOOL_RESULTS")


def has_tool_round_trip(go_template: str) -> bool:
    """Ollama's test for a Go template with a tool round trip: `.Tools`, `.ToolCalls` and a tool-result marker."""
    return (".Tools" in go_template and ".ToolCalls" in go_template
            and any(marker in go_template for marker in ROUND_TRIP_MARKERS))


def jinja_looks_more_capable(jinja: str) -> bool:
    """Ollama's test for a chat template with tools or thinking."""
    return "tools" in jinja or "tool_call" in jinja or ("<think>" in jinja and "</think>" in jinja)


def prefers_gguf_jinja(gguf_jinja: str | None, go_template: str | None) -> bool:
    """True when Ollama >= 0.30 renders with the GGUF's Jinja rather than the Go template (PreferChatTemplate)."""
    if not gguf_jinja or not go_template:
        return bool(gguf_jinja) and not go_template
    return jinja_looks_more_capable(gguf_jinja) and not has_tool_round_trip(go_template)
