"""Hypothesis: generated conversations render identically through Jinja and the Go translation.

Content avoids leading/trailing whitespace: the translator treats `trim` on content as the identity (Ollama's
content is taken as already trimmed; documented in translate.py), which is the only assumption exercised here.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmforge.templates.check import collate, compare
from llmforge.templates.go_render import ollama_request, render_go_batch
from llmforge.templates.jinja_render import TemplateRaised, render_jinja
from llmforge.templates.translate import translate_template
from templates_support import JINJA_DIR, tokens_for

CORE = ["chatml-openhermes.jinja", "llama3-instruct.jinja", "qwen2.5-instruct-tools.jinja", "gemma2-it.jinja",
        "mistral-v1-instruct-v0.1.jinja", "phi3-mini.jinja", "llama3.1-instruct-tools.jinja", "tulu3.jinja"]

text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=40) \
    .map(str.strip).filter(bool)
turns = st.lists(text, min_size=1, max_size=7)


@st.composite
def conversations(draw):
    contents = draw(turns)
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(contents)]
    if len(messages) % 2 == 0:
        messages.append({"role": "user", "content": draw(text)})
    if draw(st.booleans()):
        messages.insert(0, {"role": "system", "content": draw(text)})
    return messages


@pytest.fixture(scope="module")
def translations():
    return {name: translate_template((JINJA_DIR / name).read_text(), tokens_for(name)) for name in CORE}


@pytest.mark.parametrize("name", CORE)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=conversations())
def test_generated_conversations_render_identically(translations, name, messages):
    translation = translations[name]
    assert translation.fallback is None
    tokens = tokens_for(name)
    messages = collate(messages)
    try:
        jinja_text = render_jinja((JINJA_DIR / name).read_text(), messages, special_tokens=tokens)
    except TemplateRaised:
        return  # the template rejects this shape (e.g. no system role)
    (go,) = render_go_batch([(translation.go_template, ollama_request(messages))])
    assert go.error is None
    assert compare(jinja_text, go.output, tokens["bos_token"]) != "different", (jinja_text, go.output)
