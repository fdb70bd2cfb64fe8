"""Ollama >= 0.30 uses our Go template only when it looks as capable as the GGUF's Jinja (ollama.md section 6):
every translation that handles tools must carry Ollama's tool round-trip markers, in live code."""

from __future__ import annotations

import pytest

from llmforge.templates.check import check_template, load_conversations
from llmforge.templates.ollama_choice import has_tool_round_trip, prefers_gguf_jinja
from llmforge.templates.translate import translate_template
from templates_support import fixture_templates, tokens_for

UNPARSEABLE = {"vicuna-vllm.jinja"}


@pytest.fixture(scope="module")
def translations():
    return {p.name: (p.read_text(), translate_template(p.read_text(), tokens_for(p.name)))
            for p in fixture_templates() if p.name not in UNPARSEABLE}


def test_every_translation_with_tools_keeps_its_go_template_in_use(translations):
    with_tools = {name: t for name, (_, t) in translations.items()
                  if ".Tools" in t.go_template and ".ToolCalls" in t.go_template}
    assert len(with_tools) >= 40  # the fixtures hold that many tool-capable templates
    missing = [name for name, t in with_tools.items() if not has_tool_round_trip(t.go_template)]
    assert not missing, f"Ollama >= 0.30 would render these with the GGUF's Jinja instead: {missing}"
    for name, t in with_tools.items():
        assert not prefers_gguf_jinja(translations[name][0], t.go_template), name


def test_tool_role_tests_are_written_with_the_message_as_dot(translations):
    # a Jinja `message.role == "tool"` must become Ollama's literal `eq .Role "tool"`, not `eq $m.Role "tool"`
    for name, (jinja, t) in translations.items():
        if t.fallback is None and ("role == 'tool'" in jinja or 'role == "tool"' in jinja):
            assert 'eq .Role "tool"' in t.go_template, name
            assert '.Role "tool"' not in t.go_template.replace('eq .Role "tool"', ""), name


@pytest.mark.parametrize("jinja", [
    # an explicit tool-role test, and a template that prints every role generically (no test to rewrite)
    "{% for m in messages %}{% if m.role == 'tool' %}<result>{{ m.content }}</result>{% else %}"
    "<{{ m.role }}>{{ m.content }}{% for c in m.tool_calls or [] %}{{ c.function.name }}"
    "{{ c.function.arguments | tojson }}{% endfor %}{% endif %}{% endfor %}"
    "{% if tools %}{{ tools | tojson }}{% endif %}",
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% if m.tool_calls %}{{ m.tool_calls | tojson }}"
    "{% endif %}{% endfor %}{% if tools %}{{ tools | tojson }}{% endif %}",
])
def test_round_trip_marker_is_live_code(jinja):
    # the marker is a real branch: the translation still renders exactly like the Jinja on tool conversations
    t = translate_template(jinja, {})
    assert t.fallback is None and has_tool_round_trip(t.go_template)
    report = check_template(jinja, {}, go_template=t.go_template, conversations=load_conversations())
    tool_rows = [r for r in report.rows if r.case in ("tool_round_trip", "two_tool_calls")]
    assert tool_rows and all(r.category in ("exact", "json") for r in tool_rows), report.table()


def test_heuristic_follows_ollamas_rules():
    go_full = '{{ .Tools }}{{ range .Messages }}{{ .ToolCalls }}{{ if eq .Role "tool" }}{{ end }}{{ end }}'
    assert has_tool_round_trip(go_full)
    assert not has_tool_round_trip(go_full.replace('eq .Role "tool"', 'eq $m.Role "tool"'))
    assert not has_tool_round_trip(go_full.replace(".Tools ", ".System "))
    assert has_tool_round_trip(go_full.replace('eq .Role "tool"', "<tool_response>"))
    assert prefers_gguf_jinja("{{ tools }}", "{{ .Prompt }}") and not prefers_gguf_jinja("{{ x }}", "{{ .Prompt }}")
    assert prefers_gguf_jinja("<think></think>", "{{ .Prompt }}") and not prefers_gguf_jinja("{{ tools }}", go_full)
