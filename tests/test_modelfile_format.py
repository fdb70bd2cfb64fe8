"""Modelfile text: Ollama's parser rules (parser/parser.go, shared/docs/ollama.md) and writer round trips.

Templates are checked with the Go renderer (Ollama's engine): the TEMPLATE that comes back out of the
Modelfile must render exactly as the template that went in.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmforge.errors import LlmforgeError
from llmforge.templates.modelfile import (build_modelfile, escape_go_template, parse_modelfile,
                                          parse_param_options)

EXAMPLE = '''# a comment line
from ./model.gguf
TEMPLATE """{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}"""
SYSTEM You are "quoted" and a \\ backslash
PARAMETER stop "<|im_end|>"
PARAMETER stop <|im_start|>
parameter num_ctx 4096
PARAMETER temperature 0.7
PARAMETER use_mmap true
PARAMETER mirostat 1
MESSAGE user """Hi
there"""
MESSAGE assistant Hello!
ADAPTER "./my lora.gguf"
LICENSE """MIT"""
License Apache-2.0
'''


def test_parses_ollamas_syntax():
    mf = parse_modelfile(EXAMPLE)
    assert mf.from_ == "./model.gguf"
    assert mf.template == "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    assert mf.system == 'You are "quoted" and a \\ backslash'  # no escapes are processed
    assert mf.parameters == {"stop": ["<|im_end|>", "<|im_start|>"], "num_ctx": 4096, "temperature": 0.7,
                             "use_mmap": True}
    assert any("mirostat is deprecated" in n for n in mf.notes)
    assert mf.messages == [{"role": "user", "content": "Hi\nthere"}, {"role": "assistant", "content": "Hello!"}]
    assert mf.adapter == "./my lora.gguf"
    assert mf.license == "MIT\n\nApache-2.0"


def test_non_printable_runes_are_dropped_and_tabs_kept():
    mf = parse_modelfile('FROM x\nSYSTEM "a\x00b\u200bc\td"\n')
    assert mf.system == "abc\td"


def test_a_triple_quote_at_a_line_end_closes_the_value():
    # the first line's buffer ends in """, so the value ends there and `rest"""` is an invalid command
    with pytest.raises(LlmforgeError, match="line 3: invalid command"):
        parse_modelfile('FROM x\nTEMPLATE """a"""\nrest"""\n')


@pytest.mark.parametrize("text,match", [
    ("FROM x\nFOO bar\n", "line 2: unknown command 'FOO'"),
    ("FROM x\nPARAMETER bogus 1\n", "unknown Modelfile parameter 'bogus'"),
    ("FROM x\nPARAMETER num_ctx many\n", "num_ctx needs a int value"),
    ('FROM x\nSYSTEM """never closed\n', "unterminated quoted value"),
    ("FROM x\nMESSAGE robot hi\n", "invalid MESSAGE role 'robot'"),
    ("SYSTEM hi\n", "no FROM line"),
    ("FROM x\nPARAMETER\n", "invalid command"),
    ("FROM x\nPARAMETER num-ctx 1\n", "unexpected end of a PARAMETER"),
])
def test_mistakes_are_one_line_errors(text, match):
    with pytest.raises(LlmforgeError, match=match):
        parse_modelfile(text)


def test_cli_params_are_typed():
    assert parse_param_options(["temperature=0.2", "stop=###", "stop=END", "num_ctx=2048"]) == {
        "temperature": 0.2, "stop": ["###", "END"], "num_ctx": 2048}
    with pytest.raises(LlmforgeError, match="not KEY=VALUE"):
        parse_param_options(["temperature"])


PLAIN_TEXT = st.lists(st.sampled_from(list('ab "\\\n\t#{}') + ["\x00", "\u200b", '"""', "é"]),
                      max_size=30).map("".join)


@settings(max_examples=300, deadline=None)
@given(system=PLAIN_TEXT, stop=st.text(alphabet=st.sampled_from(list('ab "\\<|>#')), min_size=1, max_size=12))
def test_plain_values_round_trip_or_are_left_out_with_a_note(system, stop):
    mf = build_modelfile("./m.gguf", system=system, stops=[stop], num_ctx=2048)
    back = parse_modelfile(mf.text)
    if back.system is None:
        assert "a SYSTEM was left out" in mf.text
        assert '"""' in system or any(not (c.isprintable() or c in "\t\n") for c in system)
    else:
        assert back.system == system
    if back.stops != [stop]:
        assert back.stops == [] and stop in ('"', '""') or stop.startswith('""')
        assert "PARAMETER stop" in mf.text and "left out" in mf.text
    assert back.parameters["num_ctx"] == 2048 and back.from_ == "./m.gguf"


# Go template snippets with the characters Ollama's Modelfile parser mishandles (quotes at line ends,
# triple quotes, non-printables) inside text, actions, strings and comments.
SNIPPETS = ['{{ .System }}', '"', '"""', '\n', '  \n', 'text', '\x01', '\u200b', '{{- if .System }}x"{{ end -}}',
            '{{ "}}\\"" }}', '{{/* a "" comment */}}', '{{ range .Messages }}{{ .Role }}: {{ .Content }}"\n{{ end }}',
            '{{ `raw "" }}` }}', '\t"', 'é', ' ']


def test_go_templates_survive_the_modelfile_and_render_identically():
    from llmforge.templates.go_render import ollama_request, render_go_batch

    rng = random.Random(0)
    templates = ["".join(rng.choice(SNIPPETS) for _ in range(rng.randint(1, 12))) for _ in range(150)]
    templates += ['a"""\n', '"""', '{{ .System }}"\n"""\n""', "\x7f\n"]
    request = ollama_request([{"role": "system", "content": "S"}, {"role": "user", "content": 'q"'}])
    jobs = []
    for template in templates:
        mf = build_modelfile("./m.gguf", template=template)
        back = parse_modelfile(mf.text)
        assert back.template == escape_go_template(template), repr(template)
        jobs += [(template, request), (back.template, request)]
    results = render_go_batch(jobs)
    for template, original, carried in zip(templates, results[::2], results[1::2]):
        assert original.error is None, (template, original.error)
        assert carried == original, repr(template)
