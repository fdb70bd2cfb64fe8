"""Stop strings and the default system prompt, found by rendering the chat template itself.

A history ``user, assistant, user`` is rendered with marker contents. What the template writes between the
assistant's content and the next user's content is the end-of-turn terminator plus the next turn's header:
those are stops. Tokens the template writes after the generation prompt but before the assistant's content
(``<|channel|>``, ``<|message|>``, ...) are emitted by the model mid-turn and are never stops (Ollama #17939).
"""

from __future__ import annotations

import re
from datetime import datetime
from collections.abc import Iterable, Mapping

from ..errors import LlmforgeError

USER_1, ASSISTANT_1, USER_2, SYSTEM_PROBE = "llmforgeUserOne", "llmforgeAssistantOne", "llmforgeUserTwo", "llmforgeSystem"
# Fine-tunes often end turns with EOS instead of the template's terminator; these are added when special.
SECOND_TERMINATORS = ("<|endoftext|>",)
# Without a tokenizer's special-token list, marker-looking strings count as special tokens.
MARKER_PATTERN = re.compile(r"<\|[^|<>\s]{1,40}\|>|<｜[^｜<>\s]{1,40}｜>|<[a-z_]{2,30}>|</s>|\[/?[A-Z_]{2,20}\]")


def _render(chat_template: str, messages: list[dict], special_tokens: Mapping[str, str] | None,
            add_generation_prompt: bool) -> str:
    from .jinja_render import render_jinja

    return render_jinja(chat_template, messages, special_tokens=dict(special_tokens or {}),
                        add_generation_prompt=add_generation_prompt)


def _split_specials(text: str, specials: list[str]) -> list[tuple[bool, str]]:
    """Split ``text`` into (is_special, piece): the tokenizer's added tokens (longest first), then markers."""
    alternatives = [re.escape(s) for s in sorted(set(specials), key=len, reverse=True)]
    alternatives.append(MARKER_PATTERN.pattern)  # added tokens not flagged special (Command-R's turn tokens)
    pattern = re.compile("|".join(alternatives))
    pieces, pos = [], 0
    for match in pattern.finditer(text):
        if match.start() > pos:
            pieces.append((False, text[pos:match.start()]))
        pieces.append((True, match.group()))
        pos = match.end()
    if pos < len(text):
        pieces.append((False, text[pos:]))
    return pieces


def _between(text: str, left: str, right: str) -> str | None:
    start = text.find(left)
    if start < 0:
        return None
    start += len(left)
    end = text.find(right, start)
    return text[start:end] if end >= 0 else None


def turn_boundary(chat_template: str, special_tokens: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(text after an assistant turn up to the next user content, text the model writes before its content)."""
    history = [{"role": "user", "content": USER_1}, {"role": "assistant", "content": ASSISTANT_1},
               {"role": "user", "content": USER_2}]
    rendered = _render(chat_template, history, special_tokens, False)
    after = _between(rendered, ASSISTANT_1, USER_2)
    before = _between(rendered, USER_1, ASSISTANT_1)
    if after is None or before is None:
        raise LlmforgeError("the chat template does not write message contents in order",
                            hint="check the template; stops fall back to the EOS token")
    prompt = _render(chat_template, history[:1], special_tokens, True)
    plain = _render(chat_template, history[:1], special_tokens, False)
    generation_prompt = prompt[len(plain):] if prompt.startswith(plain) else ""
    at = before.find(generation_prompt) if generation_prompt else -1
    mid_turn = before[at + len(generation_prompt):] if at >= 0 else ""
    return after, mid_turn


def stop_tokens(chat_template: str, *, special_tokens: Mapping[str, str] | None = None,
                vocab_specials: Iterable[str] = ()) -> list[str]:
    """Stops for ``chat_template``: the terminator(s) and next-turn header it renders, plus eos/eot.

    ``special_tokens`` holds bos_token/eos_token/...; ``vocab_specials`` the tokenizer's added tokens (for
    splitting rendered text into tokens). Falls back to the EOS token when the template cannot be rendered.
    """
    special_tokens = dict(special_tokens or {})
    specials = [s for s in vocab_specials if s]
    specials += [v for k, v in special_tokens.items() if isinstance(v, str) and v and k.endswith("_token")]
    eos = special_tokens.get("eos_token")
    # BOS is never generated, unless the tokenizer uses one token for both (GPT-2)
    bos = special_tokens.get("bos_token") if special_tokens.get("bos_token") != eos else None
    stops: list[str] = []
    try:
        after, mid_turn = turn_boundary(chat_template, special_tokens)
    except LlmforgeError:
        after, mid_turn = "", ""
    mid_turn_tokens = {piece for is_special, piece in _split_specials(mid_turn, specials) if is_special}
    previous: str | None = None  # the previous special token piece in `after`
    terminator: str | None = None
    for is_special, piece in _split_specials(after, specials):
        if is_special:
            if piece != bos and piece not in mid_turn_tokens:
                stops.append(piece)
            if terminator is None:
                terminator = piece
            previous = piece
            continue
        header = next((line.strip() for line in piece.splitlines() if line.strip()), "")
        # text after a header-opening token is a role name ("user"), not a marker
        if header and (previous is None or previous == bos or (previous == terminator and terminator in stops)):
            stops.append(header)
    if eos and eos not in mid_turn_tokens:
        stops.append(eos)
    stops += [t for t in SECOND_TERMINATORS if t in specials and t not in mid_turn_tokens]
    return list(dict.fromkeys(stops))


def default_system_prompt(chat_template: str, *, special_tokens: Mapping[str, str] | None = None) -> str | None:
    """The system text the template writes when the conversation has none (e.g. Qwen2.5's), else None.

    Found by rendering with a marker system message and without one: the template's default sits exactly
    where the marker was.
    """
    user = [{"role": "user", "content": USER_1}]
    try:
        with_system = _render(chat_template, [{"role": "system", "content": SYSTEM_PROBE}, *user],
                              special_tokens, True)
        without = _render(chat_template, user, special_tokens, True)
    except LlmforgeError:
        return None
    head, sep, tail = with_system.partition(SYSTEM_PROBE)
    if not sep or not without.startswith(head) or not without.endswith(tail):
        return None
    default = without[len(head):len(without) - len(tail)]
    if not default.strip() or _mentions_today(default):
        return None  # a date preamble changes daily: leave it to the template
    return default


def _mentions_today(text: str) -> bool:
    today = datetime.now()
    return any(today.strftime(fmt) in text for fmt in ("%Y-%m-%d", "%d %b %Y", "%B %d, %Y", "%d %B %Y"))
