"""Response-only labels: find the assistant turns in a rendered conversation, derived from the template itself.

No per-family marker strings. The conversation is rendered once with each assistant message's text fields
(content, reasoning, tool-call arguments) replaced by unique sentinels; the template text between sentinels
is then matched against the real rendering. A turn's trainable span runs from its first sentinel to the end
of what the template writes after its last one when the conversation stops at that turn (tool calls and the
end-of-turn marker; trailing whitespace excluded). Turns whose text the template drops are located by
rendering prefixes and diffing. Tokens overlapping a span are trained; everything else is -100.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import LlmforgeError

IGNORE_INDEX = -100
SENTINEL = "\u27e6LLMF{}\u27e7"          # ⟦LLMF3⟧: survives strip/trim/split and never occurs in real data
SENTINEL_RE = re.compile("\u27e6LLMF(\\d+)\u27e7")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

Renderer = Callable[..., str]   # (messages, tools=..., add_generation_prompt=...) -> text


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]   # character spans that are trained, in order


def with_sentinels(messages: list[dict]) -> tuple[list[dict], dict[int, int]]:
    """Copy ``messages`` with assistant text fields replaced by sentinels; returns (copy, sentinel -> message)."""
    out = copy.deepcopy(messages)
    owner: dict[int, int] = {}

    def mark(index: int) -> str:
        sid = len(owner)
        owner[sid] = index
        return SENTINEL.format(sid)

    for i, message in enumerate(out):
        if message.get("role") != "assistant":
            continue
        for key in REASONING_FIELDS:
            if isinstance(message.get(key), str) and message[key]:
                message[key] = mark(i)
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    part["text"] = mark(i)
        elif content or not message.get("tool_calls"):
            message["content"] = mark(i)
        for call in message.get("tool_calls") or []:
            function = call.get("function", call) if isinstance(call, dict) else None
            if not isinstance(function, dict):
                continue
            if isinstance(function.get("name"), str):
                function["name"] = mark(i)
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                function["arguments"] = mark(i)
            elif isinstance(arguments, dict):
                for arg, value in arguments.items():
                    if isinstance(value, str):
                        arguments[arg] = mark(i)
    return out, owner


def split_on_sentinels(text: str) -> tuple[list[str], list[int]]:
    """``a⟦LLMF0⟧b⟦LLMF1⟧c`` -> (["a", "b", "c"], [0, 1])."""
    pieces = SENTINEL_RE.split(text)
    return pieces[0::2], [int(s) for s in pieces[1::2]]


def align(real: str, segments: list[str]) -> list[tuple[int, int]] | None:
    """Where each sentinel's real text lies in ``real``, given the template text between sentinels."""
    if not real.startswith(segments[0]):
        return None
    pos = len(segments[0])
    found = []
    for i, segment in enumerate(segments[1:], 1):
        last = i == len(segments) - 1
        if last:
            end = len(real) - len(segment)
            if end < pos or not real.endswith(segment):
                return None
        else:
            end = real.find(segment, pos) if segment else pos
            if end < 0:
                return None
        found.append((pos, end))
        pos = end + len(segment)
    return found


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def assistant_spans(render: Renderer, messages: list[dict], tools: list | None = None) -> Rendered:
    """Render ``messages`` and locate each assistant turn's trainable character span."""
    text = render(messages, tools=tools, add_generation_prompt=False)
    marked, owner = with_sentinels(messages)
    marked_text = render(marked, tools=tools, add_generation_prompt=False)
    segments, order = split_on_sentinels(marked_text)
    located = align(text, segments) if order else []
    if located is None:
        raise LlmforgeError("cannot match the template's text around the assistant turns",
                            hint="the template changes its layout with the message text; use --chat-template")
    # per message: where its sentinels start (real text) and where its last one ends (real and marked text)
    marked_ends = [m.end() for m in SENTINEL_RE.finditer(marked_text)]
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for k, (sid, (start, _)) in enumerate(zip(order, located)):
        first.setdefault(owner[sid], start)
        last[owner[sid]] = k
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        if i in first:
            k = last[i]
            tail = turn_tail(render, marked[: i + 1], tools, SENTINEL.format(order[k]))
            if not tail.strip() and i < len(messages) - 1:
                # some templates close a turn only when another follows (the last one is a prefill)
                tail = turn_tail(render, marked[: i + 1], tools, SENTINEL.format(order[k]), generation=True)
            keep = common_prefix(tail, marked_text[marked_ends[k]:])
            end = located[k][1] + len(tail[:keep].rstrip())
            start = body_start(render, marked, i, text, located, order, owner)
            spans.append((min(start, first[i]), close_marker(text, located[k][1], end)))
        else:
            span = prefix_diff(render, messages, i, tools, text)
            if span is None and not has_text(message):
                continue  # e.g. a tool-call turn whose calls the template does not print: nothing to learn
            if span is None:
                raise LlmforgeError(f"cannot locate assistant message {i + 1} in the rendered conversation",
                                    hint="the template does not print it; check the template or the data")
            spans.append(span)
    return Rendered(text, sorted(s for s in spans if s[1] > s[0]))


def body_start(render: Renderer, marked: list[dict], i: int, text: str,
               located: list[tuple[int, int]], order: list[int], owner: dict[int, int]) -> int:
    """Start of message ``i``'s body: just after the generation prompt the template writes before it.

    Template text between that point and the first sentinel (``<think>``, ``<tool_call>{"name": "``) is
    part of what the model must produce, so it is trained too.
    """
    k = next(k for k, sid in enumerate(order) if owner[sid] == i)
    try:
        without = render(marked[:i], add_generation_prompt=False)
        with_prompt = render(marked[:i], add_generation_prompt=True)
    except LlmforgeError:
        return located[k][0]
    prompt = with_prompt[len(without):] if with_prompt.startswith(without) else ""
    # the template text between the previous sentinel (or the start) and this message's first sentinel
    segment_start = located[k - 1][1] if k else 0
    before = text[segment_start:located[k][0]]
    for candidate in (prompt, prompt.rstrip()):
        at = before.rfind(candidate) if candidate else -1
        if at >= 0:
            return segment_start + at + len(candidate)
    return located[k][0]


def close_marker(text: str, start: int, end: int, reach: int = 40) -> int:
    """Extend ``end`` to the closing ``>`` when the kept end-of-turn text stops inside a ``<...>`` marker.

    A final turn may end with another marker than earlier ones (gpt-oss: ``<|return|>`` vs ``<|end|>``), so
    the common prefix can stop at ``<|``; the marker the template actually wrote there is what is trained.
    """
    kept = text[start:end]
    opened = kept.rfind("<")
    if opened < 0 or kept.rfind(">") > opened:
        return end
    close = text.find(">", end, end + reach)
    return close + 1 if close >= 0 else end


def has_text(message: dict) -> bool:
    """Whether an assistant message carries content or reasoning text."""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return bool(content) or any(message.get(k) for k in REASONING_FIELDS)


def turn_tail(render: Renderer, prefix: list[dict], tools: list | None, last_sentinel: str,
              generation: bool = False) -> str:
    """What the template writes after the turn's last sentinel when the conversation ends with that turn.

    With ``generation`` the render asks for a generation prompt; a header it adds for a next turn is cut off.
    """
    try:
        text = render(prefix, tools=tools, add_generation_prompt=generation)
    except LlmforgeError:
        return ""
    at = text.rfind(last_sentinel)
    tail = text[at + len(last_sentinel):] if at >= 0 else ""
    if generation:
        header = generation_prompt(render, prefix, tools).strip()
        if header and header in tail:
            tail = tail[: tail.index(header)]
    return tail


def generation_prompt(render: Renderer, prefix: list[dict], tools: list | None) -> str:
    """The text the template adds for ``add_generation_prompt`` after a user turn."""
    system = [m for m in prefix[:1] if m.get("role") == "system"]
    user = next((m for m in prefix if m.get("role") == "user"), {"role": "user", "content": "x"})
    probe = system + [user]
    try:
        without = render(probe, tools=tools, add_generation_prompt=False)
        with_prompt = render(probe, tools=tools, add_generation_prompt=True)
    except LlmforgeError:
        return ""
    return with_prompt[len(without):] if with_prompt.startswith(without) else ""


def prefix_diff(render: Renderer, messages: list[dict], i: int, tools: list | None, full: str) -> tuple[int, int] | None:
    """Span of message ``i`` as (prompt before it + generation prompt) vs (conversation up to it)."""
    try:
        before = render(messages[:i], tools=tools, add_generation_prompt=True)
        upto = render(messages[: i + 1], tools=tools, add_generation_prompt=False)
    except LlmforgeError:
        return None
    if not upto.startswith(before) or not full.startswith(upto.rstrip()) or len(upto.rstrip()) <= len(before):
        return None
    return len(before), len(upto.rstrip())


def token_labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Label each token with its id if it overlaps a trainable span, else -100."""
    labels = []
    j = 0
    for token, (start, end) in zip(ids, offsets):
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        inside = j < len(spans) and start < spans[j][1] and end > spans[j][0] and end > start
        labels.append(token if inside else IGNORE_INDEX)
    return labels


def make_renderer(chat_template: str, special_tokens: dict[str, str]) -> Renderer:
    """A renderer bound to one template and the tokenizer's special tokens (transformers' semantics)."""
    from ..templates.jinja_render import render_jinja

    def render(messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False) -> str:
        return render_jinja(chat_template, messages, tools=tools, special_tokens=special_tokens,
                            add_generation_prompt=add_generation_prompt)

    return render


def special_tokens_of(tokenizer: Any) -> dict[str, str]:
    """The special-token variables a chat template may use (``bos_token``, ``eos_token``, ...)."""
    names = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
    return {name: str(getattr(tokenizer, name)) for name in names if getattr(tokenizer, name, None) is not None}
