"""Construct by construct: each Jinja feature the translator expresses in Go renders identically.

Each case is a small template plus conversations; the oracle is the Jinja rendering (transformers' way)
compared with the Go rendering (Ollama's way) with no normalisation at all.
"""

from __future__ import annotations

import pytest

from llmforge.templates.check import check_template
from llmforge.templates.translate import translate_template

USER = {"role": "user", "content": "Hello there"}
SYSTEM = {"role": "system", "content": "Be brief."}
ASSISTANT = {"role": "assistant", "content": "Hi!"}
CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": {"b": "x"}, "d": 3, "e": "s"}}}]}
TOOL = {"role": "tool", "content": "ok", "name": "f"}
USER2 = {"role": "user", "content": "And now?"}
# Distinct messages: Jinja compares messages as dicts (equal content is "the same message"), Go by position.
CONVERSATIONS = [[USER], [SYSTEM, USER], [USER, ASSISTANT, USER2], [SYSTEM, USER, ASSISTANT, USER2],
                 [USER, CALL, TOOL]]
# Constructs whose output holds JSON from Go's encoder: equal as parsed JSON, not byte for byte.
JSON_OUTPUT = {"tool_calls_json_and_recursion", "indent_of_json"}

CASES = {
    "namespace_and_loop_flags": """{% set ns = namespace(n=0, sys='') %}{% for m in messages %}
{% if m.role == 'system' %}{% set ns.sys = m.content %}{% endif %}{% set ns.n = ns.n + 1 %}{% endfor %}
{{ ns.sys }}|{{ ns.n }}{% for m in messages %}{% if loop.first %}<first>{% endif %}{{ loop.index }}:{{ m.role }}
{% if not loop.last %},{% endif %}{% endfor %}""",
    "slices_and_negative_index": """{% if messages[0].role == 'system' %}{% set rest = messages[1:] %}{% else %}
{% set rest = messages %}{% endif %}{{ messages[-1].content }}{% for m in rest %}[{{ m.role }}]{% endfor %}""",
    "parity_and_previtem": """{% for m in messages %}{{ loop.index0 % 2 }}{% if loop.previtem is defined and
loop.previtem %}<{{ loop.previtem.role }}>{% endif %}{% endfor %}""",
    "reversed_loop": """{% for m in messages[::-1] %}{{ m.role }};{% endfor %}""",
    "string_methods": """{% for m in messages %}{{ m.content.startswith('Hel') }}{{ m.content.endswith('!') }}
{{ 'llo' in m.content }}{{ m.content.replace('l', 'L') }}{{ m.content.split(' ')[0] }}/{{ m.content.split(' ')[-1] }}
{{ m.role.title() }}{{ m.role | upper }}{{ m.content[:3] }}{% endfor %}""",
    "selectattr_and_last_user": """{% set users = messages | selectattr('role', 'equalto', 'user') | list %}
{{ users | length }}{% for m in messages %}{% if m == users[-1] %}<last>{% endif %}{{ m.content }}{% endfor %}""",
    "set_block_capture": """{% for m in messages %}{% set block %}{% if m.role == 'user' %}U:{{ m.content }}
{% else %}O{% endif %}{% endset %}[{{ block }}]{% endfor %}""",
    "macro_value_and_default": """{% macro wrap(x) %}<{{ x }}>{% endmacro %}{% for m in messages %}
{{ wrap(m.content) ~ '|' ~ (m.name | default('none')) }}{% endfor %}""",
    "tool_calls_json_and_recursion": """{% macro fmt(v) %}{% if v is mapping %}{{ '{' }}{% for k, x in v | dictsort %}
{{ k }}={{ fmt(x) }};{% endfor %}{{ '}' }}{% elif v is string %}"{{ v }}"{% else %}{{ v }}{% endif %}{% endmacro %}
{% for m in messages %}{% for c in m.tool_calls %}{{ c.function.name }}{{ fmt(c.function.arguments) }}
{{ c.function.arguments | tojson }}{% endfor %}{{ m.content }}{% endfor %}""",
    "reversed_range_and_dict_keys": """{% set d = {'b': 1, 'a': 2} %}{% for k in d %}{{ k }}{% endfor %}
{% for m in messages %}{% if loop.index0 > 0 %}{% for j in range(loop.index0 - 1, -1, -1) %}{{ messages[j].role }},
{% endfor %}{% endif %};{% endfor %}""",
    # a recursive macro (a Go template call, which cannot be captured) inside a macro whose output is trimmed
    "recursion_printed_through_trim": """{% macro fmt(v) %}{% if v is mapping %}{% for k, x in v | dictsort %}
{{ k }}={{ fmt(x) }};{% endfor %}{% else %}{{ v }}{% endif %}{% endmacro %}{% macro call(c) %}call:{{ c.function.name }}
({{ fmt(c.function.arguments) }}){% endmacro %}{% for m in messages %}{% for c in m.tool_calls %}{{ call(c) | trim }}
{% endfor %}{{ m.content }}{% endfor %}""",
    # split on a literal, indexed and measured at run time; assignments in a loop stay in the loop
    "split_parts_and_loop_scope": """{% for m in messages %}{% set parts = m.content.split('e') %}
{% set out = parts[0] %}{% for i in range(1, parts | length) %}{% set out = out + '|' + parts[i] %}{{ out }};
{% endfor %}[{{ out }}]{{ [parts | length, 2] | min }}{% endfor %}""",
    "indent_of_json": """{% for m in messages %}{% for c in m.tool_calls %}
{{ c.function.arguments | tojson(indent=4) | indent(8) }}{% endfor %}{{ m.content }}{% endfor %}""",
    "conditional_expressions": """{% for m in messages %}{{ 'A' if m.role == 'assistant' else 'B' }}
{% set tag = 'sys' if m.role == 'system' else m.role %}{{ tag }}{% endfor %}""",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_construct_translates_and_renders_identically(name):
    template = CASES[name]
    translation = translate_template(template, {}, allow_fallback=False)
    cases = [{"name": f"c{i}", "needs": [], "messages": m} for i, m in enumerate(CONVERSATIONS)]
    report = check_template(template, {}, translation.go_template, conversations=cases, name=name)
    rows = [r for r in report.rows if r.category != "n/a"]
    assert len(rows) == len(CONVERSATIONS), report.table()
    allowed = {"exact", "json"} if name in JSON_OUTPUT else {"exact"}
    assert all(r.category in allowed for r in rows), report.table() + "\n" + "\n".join(
        f"{r.jinja!r}\n{r.go!r}" for r in rows if r.category != "exact")


def test_strftime_formats_come_from_current_date():
    template = "{{ strftime_now('%d %b %Y') }}|{{ strftime_now('%B %d, %Y') }}|{{ strftime_now('%Y-%m-%d') }}"
    translation = translate_template(template, {}, allow_fallback=False)
    report = check_template(template, {}, translation.go_template,
                            conversations=[{"name": "c", "needs": [], "messages": [USER]}])
    assert report.rows[0].category == "exact", report.table()


def test_leading_bos_is_left_to_llama_cpp_but_later_ones_stay():
    template = "{% for m in messages %}{{ bos_token }}[{{ m.content }}]{% endfor %}"
    translation = translate_template(template, {"bos_token": "<s>"}, allow_fallback=False)
    report = check_template(template, {"bos_token": "<s>"}, translation.go_template,
                            conversations=[{"name": "c", "needs": [], "messages": [USER, ASSISTANT, USER]}])
    row = report.rows[0]
    assert row.category == "bos" and row.go == "[Hello there]<s>[Hi!]<s>[Hello there]", report.table()
