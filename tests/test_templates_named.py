"""llmforge's named family templates: each translates without fallback and renders identically in Go."""

from __future__ import annotations

import pytest

from llmforge.errors import LlmforgeError
from llmforge.templates.check import check_template
from llmforge.templates.named import closest_named_template, get_named_template, list_named_templates
from llmforge.templates.translate import translate_template

TOKENS = {
    "chatml": {"bos_token": "", "eos_token": "<|im_end|>"},
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "llama2": {"bos_token": "<s>", "eos_token": "</s>"},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>"},
    "gemma": {"bos_token": "<bos>", "eos_token": "<eos>"},
    "phi3": {"bos_token": "<s>", "eos_token": "<|endoftext|>"},
    "deepseek": {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"},
    "command-r": {"bos_token": "<BOS_TOKEN>", "eos_token": "<|END_OF_TURN_TOKEN|>"},
}


def test_the_named_set_covers_the_main_families():
    assert set(TOKENS) <= set(list_named_templates())


@pytest.mark.parametrize("name", sorted(TOKENS))
def test_named_template_is_verified_like_any_translation(name):
    source = get_named_template(name)
    translation = translate_template(source, TOKENS[name], allow_fallback=False)
    assert translation.fallback is None
    report = check_template(source, TOKENS[name], translation.go_template, name=name)
    applicable = [r for r in report.rows if r.category != "n/a"]
    assert len(applicable) >= 6, report.table()
    assert report.passed, report.table()


def test_unknown_name_lists_the_choices():
    with pytest.raises(LlmforgeError, match="chatml"):
        get_named_template("no-such-family")


@pytest.mark.parametrize("marker,family", [("<|start_header_id|>", "llama3"), ("<start_of_turn>", "gemma"),
                                          ("<|im_start|>", "chatml"), ("[INST] <<SYS>>", "llama2"),
                                          ("[INST]", "mistral"), ("<|user|>", "phi3")])
def test_closest_family_by_turn_markers(marker, family):
    assert closest_named_template("{{ '" + marker + "' }}") == family


def test_untranslatable_template_falls_back_and_says_why():
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ (m.content | length) * 2 }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    translation = translate_template(template, {})
    assert translation.fallback == "chatml"
    assert "arithmetic (Mul)" in translation.problems[0] and "line 2" in translation.problems[0]
    with pytest.raises(LlmforgeError, match="cannot translate"):
        translate_template(template, {}, allow_fallback=False)
