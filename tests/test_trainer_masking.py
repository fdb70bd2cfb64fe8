"""Response-only masking on every real chat template: only assistant tokens are trainable, token by token.

The oracle is independent of the implementation: contents are located in the rendered text by search, and
each token's trainability is checked against where it lies (gpt-2 tokenizer offsets).
"""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from llmforge.errors import LlmforgeError
from llmforge.trainer.masking import IGNORE_INDEX, assistant_spans, make_renderer, token_labels
from tiny_models import TEMPLATES, TOKENIZERS

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
FINAL = "Final reply number 42, in a fixed format."
# Templates that cannot be trained on with response-only masking, and why (checked to stay exactly this set).
NOT_TRAINABLE = {
    "firefunction-v2": "needs a `functions` variable transformers does not pass",
    "llamacpp-fireworks-ai-llama-3-firefunction-v2": "needs a `functions` variable transformers does not pass",
    "vicuna-vllm": "Jinja syntax error in the published template",
}
# Safety classifiers: they quote the conversation inside a rating prompt; there is no reply to train.
CLASSIFIERS = ("ollama-lib-llama-guard3-1b", "ollama-lib-shieldgemma-27b", "ollama-lib-granite3-guardian-2b")
# End-of-turn markers of well-known formats: when one directly follows an assistant reply it must be trained.
END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>", "<|END_OF_TURN_TOKEN|>",
               "<｜end▁of▁sentence｜>", "<|endoftext|>")

CASES = json.loads((TEMPLATES / "conversations.json").read_text())["cases"]
TEMPLATE_FILES = sorted(p for p in (TEMPLATES / "jinja").glob("*.jinja") if p.stem not in CLASSIFIERS)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(TOKENIZERS / "gpt-2" / "tokenizer.json"))


def text_of(message: dict) -> str:
    content = message.get("content") or ""
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content.strip()


def occurrences(text: str, needle: str) -> list[tuple[int, int]]:
    found, at = [], text.find(needle)
    while needle and at >= 0:
        found.append((at, at + len(needle)))
        at = text.find(needle, at + 1)
    return found


def check_conversation(text: str, spans: list, messages: list[dict], tok: Tokenizer) -> None:
    encoding = tok.encode(text, add_special_tokens=False)
    labels = token_labels(encoding.ids, encoding.offsets, spans)
    tokens = list(zip(encoding.offsets, labels))
    trained = [(s, e) for (s, e), label in tokens if label != IGNORE_INDEX]
    assert trained, "no trainable token"
    cursor = 0
    for message in messages:
        content = text_of(message)
        if message["role"] == "assistant":
            if not content:
                continue
            at = text.find(content, cursor)
            if at < 0:
                continue  # the template drops this reply's text (e.g. history thinking rules)
            cursor = at + len(content)
            for (s, e), label in tokens:
                if s < cursor and e > at:
                    assert label != IGNORE_INDEX, f"assistant token {text[s:e]!r} is masked"
            following = text[cursor:]
            marker = next((m for m in END_MARKERS if following.startswith(m)), None)
            if marker:
                for (s, e), label in tokens:
                    if s < cursor + len(marker) and e > cursor:
                        assert label != IGNORE_INDEX, f"end-of-turn {marker!r} is not trained"
        elif len(content) >= 8:
            for a, b in occurrences(text, content):
                if any(sa <= a and b <= sb for sa, sb in spans):
                    continue  # the same words quoted inside an assistant reply
                for (s, e), label in tokens:
                    if s >= a and e <= b:
                        assert label == IGNORE_INDEX, f"{message['role']} token {text[s:e]!r} is trainable"
    first_assistant = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt_end = max((occurrences(text, text_of(m))[0][1] for m in messages[:first_assistant]
                      if len(text_of(m)) >= 8 and text_of(m) in text), default=0)
    assert trained[0][0] >= prompt_end - 1, f"a token of the prompt is trainable: {text[trained[0][0]:prompt_end]!r}"


def test_masking_on_every_template(tokenizer: Tokenizer) -> None:
    verified: dict[str, int] = {}
    rejected: dict[str, str] = {}
    for path in TEMPLATE_FILES:
        render = make_renderer(path.read_text(), SPECIAL)
        verified[path.stem] = 0
        for case in CASES:
            final = [{"type": "text", "text": FINAL}] if "parts" in case["needs"] else FINAL
            messages = case["messages"] + [{"role": "assistant", "content": final}]
            tools = case.get("tools")
            try:
                render(messages, tools=tools)
            except LlmforgeError:
                continue  # the template does not accept this kind of conversation at all
            try:
                rendered = assistant_spans(render, messages, tools)
            except LlmforgeError as exc:
                rejected[f"{path.stem}/{case['name']}"] = str(exc)
                continue
            try:
                check_conversation(rendered.text, rendered.spans, messages, tokenizer)
            except AssertionError as exc:
                raise AssertionError(f"{path.stem} / {case['name']}: {exc}") from None
            verified[path.stem] += 1
    none = {name for name, n in verified.items() if n == 0}
    assert none == set(NOT_TRAINABLE), f"templates with no masked conversation changed: {sorted(none)}"
    assert sum(verified.values()) >= 1500
    # a rejection is a clear one-line error, never a silently wrong mask
    assert len(rejected) < 40, sorted(rejected)


def test_chatml_mask_is_exactly_the_replies(tokenizer: Tokenizer) -> None:
    template = (TEMPLATES / "jinja" / "chatml-openhermes.jinja").read_text()
    render = make_renderer(template, SPECIAL)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye."}]
    rendered = assistant_spans(render, messages)
    assert [rendered.text[a:b] for a, b in rendered.spans] == ["Hello.<|im_end|>", "Goodbye.<|im_end|>"]


def test_llama3_mask_trains_eot(tokenizer: Tokenizer) -> None:
    template = json.loads((TOKENIZERS / "llama-bpe" / "tokenizer_config.json").read_text())["chat_template"]
    render = make_renderer(template, {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
    rendered = assistant_spans(render, messages)
    assert [rendered.text[a:b] for a, b in rendered.spans] == ["Hello there.<|eot_id|>"]


def test_tool_call_turn_is_trained_from_the_header_on() -> None:
    template = (TEMPLATES / "jinja" / "qwen2.5-instruct-tools.jinja")
    if not template.exists():
        pytest.skip("qwen2.5 template not in the fixtures")
    render = make_renderer(template.read_text(), SPECIAL)
    case = next(c for c in CASES if c["name"] == "two_tool_calls")
    messages = case["messages"] + [{"role": "assistant", "content": FINAL}]
    rendered = assistant_spans(render, messages, case.get("tools"))
    first = rendered.text[rendered.spans[0][0]:rendered.spans[0][1]]
    assert first.startswith("<tool_call>") and '"add"' in first and first.endswith("<|im_end|>")


def test_named_template_drives_the_labels() -> None:
    from llmforge.trainer.data import normalise
    from llmforge.trainer.encode import encode_all, resolve_chat_template
    from llmforge.trainer.example import TOKENIZER_DIR
    from llmforge.trainer.load import load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER_DIR)
    template = resolve_chat_template(tokenizer, "llama3")
    assert "<|start_header_id|>" in template and tokenizer.chat_template == template
    _, examples = normalise([{"messages": [{"role": "user", "content": "Hi"},
                                           {"role": "assistant", "content": "The capital of Peru is Lima."}]}])
    (row,), _ = encode_all(examples, tokenizer, template, 256)
    trained = [t for t, label in zip(row.input_ids, row.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "The capital of Peru is Lima.<|eot_id|>"
    with pytest.raises(LlmforgeError, match="unknown chat template name"):
        resolve_chat_template(tokenizer, "no-such-family")
