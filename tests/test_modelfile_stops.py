"""Stops and default SYSTEM derived from the chat template, checked against the Jinja render itself.

The oracle is transformers-equivalent Jinja rendering of a real conversation: the text a template writes
after an assistant's content must start with a declared stop (so generation ends where the turn ends), and no
stop may appear in what the model itself writes inside a turn (Ollama #17939).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import TEMPLATES, TOKENIZERS  # noqa: E402

from llmforge.errors import LlmforgeError  # noqa: E402
from llmforge.templates.jinja_render import render_jinja  # noqa: E402
from llmforge.templates.modelfile_stops import (ASSISTANT_1, MARKER_PATTERN, USER_1, USER_2, default_system_prompt,  # noqa: E402
                                                stop_tokens, turn_boundary)

HISTORY = [{"role": "user", "content": USER_1}, {"role": "assistant", "content": "The answer is 42."},
           {"role": "user", "content": USER_2}]
FIXTURES = sorted(p.name for p in TOKENIZERS.iterdir() if (p / "tokenizer_config.json").is_file())
ALL_TEMPLATES = sorted(TEMPLATES.glob("jinja/*.jinja"))


def fixture_tokens(name: str) -> tuple[str, dict[str, str], list[str]]:
    """(chat template, special token strings, the tokenizer's added tokens) of a fixture tokenizer."""
    config = json.loads((TOKENIZERS / name / "tokenizer_config.json").read_text())
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next(t["template"] for t in template if t["name"] == "default")
    tokens = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if value:
            tokens[key] = value
    specials = [t["content"] for t in config.get("added_tokens_decoder", {}).values()]
    return template, tokens, specials


def assert_turn_ends_with_a_stop(template: str, tokens: dict[str, str], stops: list[str]) -> None:
    rendered = render_jinja(template, HISTORY, special_tokens=tokens, add_generation_prompt=False)
    after = rendered.split("The answer is 42.", 1)[1].split(USER_2, 1)[0]
    _, mid_turn = turn_boundary(template, tokens)
    first = min((after.find(s), s) for s in stops if s in after)
    assert first[0] >= 0, (after, stops)
    # only what the model itself writes mid-turn may come before the first stop
    before_stop = set(MARKER_PATTERN.findall(after[:first[0]]))
    assert before_stop <= set(MARKER_PATTERN.findall(mid_turn)), (after, stops)
    assert not any(s in mid_turn for s in stops), (mid_turn, stops)


@pytest.mark.parametrize("fixture", FIXTURES)
def test_fixture_templates_end_the_assistant_turn_with_a_declared_stop(fixture):
    template, tokens, specials = fixture_tokens(fixture)
    stops = stop_tokens(template, special_tokens=tokens, vocab_specials=specials)
    rendered = render_jinja(template, HISTORY, special_tokens=tokens, add_generation_prompt=False)
    after = rendered.split("The answer is 42.", 1)[1]
    assert any(after.lstrip().startswith(s) for s in stops), (after[:80], stops)
    assert tokens["eos_token"] in stops
    if tokens.get("bos_token") != tokens["eos_token"]:
        assert tokens.get("bos_token") not in stops
    assert_turn_ends_with_a_stop(template, tokens, stops)


def test_known_families_get_their_documented_stops():
    """shared/docs/ollama.md section 8: terminators plus next-turn headers."""
    expected = {"qwen2": {"<|im_end|>", "<|im_start|>", "<|endoftext|>"},
                "llama-bpe": {"<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"},
                "phi-3": {"<|end|>", "<|user|>", "<|endoftext|>"},
                "command-r": {"<|END_OF_TURN_TOKEN|>", "<|START_OF_TURN_TOKEN|>"}}
    for fixture, must in expected.items():
        template, tokens, specials = fixture_tokens(fixture)
        stops = set(stop_tokens(template, special_tokens=tokens, vocab_specials=specials))
        assert must <= stops, (fixture, stops)
        assert not {s for s in stops if s.strip().isalpha()}, (fixture, stops)  # never a bare role word


def test_mid_turn_tokens_are_never_stops():
    template = (TEMPLATES / "jinja" / "gpt-oss.jinja").read_text()
    stops = stop_tokens(template, special_tokens={"eos_token": "<|return|>"})
    assert "<|end|>" in stops and "<|message|>" not in stops and "<|channel|>" not in stops


@pytest.mark.parametrize("path", ALL_TEMPLATES, ids=lambda p: p.stem)
def test_every_real_template_ends_turns_with_a_declared_stop(path):
    template = path.read_text()
    tokens = {"bos_token": "<s>", "eos_token": "</s>"}
    try:
        turn_boundary(template, tokens)
    except LlmforgeError as exc:
        pytest.skip(f"template does not render a plain user/assistant/user history: {exc.message[:80]}")
    assert_turn_ends_with_a_stop(template, tokens, stop_tokens(template, special_tokens=tokens))


@pytest.mark.parametrize("fixture", FIXTURES)
def test_default_system_is_what_the_template_injects(fixture):
    template, tokens, _ = fixture_tokens(fixture)
    default = default_system_prompt(template, special_tokens=tokens)
    user = [{"role": "user", "content": "Hi"}]
    if default is None:
        return
    # rendering without a system message equals rendering with the default as the system message
    assert render_jinja(template, user, special_tokens=tokens) == render_jinja(
        template, [{"role": "system", "content": default}, *user], special_tokens=tokens)


def test_qwen_default_system_is_found():
    template, tokens, _ = fixture_tokens("qwen2")
    assert default_system_prompt(template, special_tokens=tokens) == \
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    template, tokens, _ = fixture_tokens("llama-bpe")
    assert default_system_prompt(template, special_tokens=tokens) is None  # a date preamble, not a system


def test_sentinels_are_distinct_plain_words():
    assert len({USER_1, USER_2, ASSISTANT_1}) == 3 and all(s.isalnum() for s in (USER_1, USER_2, ASSISTANT_1))
