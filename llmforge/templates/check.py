"""Render a chat template with Jinja (transformers' way) and its Go translation (Ollama's way) and compare.

Only two normalisations exist, each counted separately: a leading BOS dropped from the Jinja output
(llama.cpp adds BOS when tokenizing) and JSON values compared as parsed JSON (Go's encoder orders struct
fields and escapes ``<>&``). Everything else must be the same string.

The Jinja side sees the conversation as Ollama presents it to a template: :func:`collate` joins system
messages and merges consecutive same-role messages first (a no-op for the shared fixtures, which are shaped
that way already), and content parts reach Go as their joined text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LlmforgeError
from .go_render import ollama_request, render_go_batch
from .jinja_render import TemplateRaised, render_jinja

CONVERSATIONS = Path(__file__).resolve().parents[2].parent / "shared" / "templates" / "conversations.json"
CATEGORIES = ("exact", "bos", "json", "fallback", "different")

# What a template must mention to support a case's needs (documented heuristics on the Jinja source).
NEEDS_PATTERNS = {
    "tools": re.compile(r"\btools\b"),
    "tool_calls": re.compile(r"\btool_calls\b"),
    "thinking": re.compile(r"\breasoning_content\b|\bthinking\b|\breasoning\b"),
    "parts": re.compile(r"is string|is not string|is iterable|is sequence|is mapping|\[['\"]text['\"]\]|\.text\b"
                        r"|\[['\"]type['\"]\]|\.type\b"),
}


@dataclass
class Row:
    case: str
    category: str           # one of CATEGORIES, or "n/a" when the template does not accept the case
    detail: str = ""
    jinja: str = ""
    go: str = ""


@dataclass
class CheckReport:
    name: str
    rows: list[Row] = field(default_factory=list)
    fallback: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(CATEGORIES, 0)
        for row in self.rows:
            if row.category in counts:
                counts[row.category] += 1
        return counts

    @property
    def passed(self) -> bool:
        return self.counts["different"] == 0

    def table(self) -> str:
        width = max([len(r.case) for r in self.rows] + [4])
        lines = [f"{'case':<{width}}  result"]
        for row in self.rows:
            lines.append(f"{row.case:<{width}}  {row.category}" + (f"  ({row.detail})" if row.detail else ""))
        counts = self.counts
        lines.append("total: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        if self.fallback:
            lines.append(f"fallback: named template {self.fallback!r} because " + "; ".join(self.problems))
        return "\n".join(lines)


def load_conversations(path: Path | None = None) -> list[dict[str, Any]]:
    """The conversation fixtures (``shared/templates/conversations.json``)."""
    path = path or CONVERSATIONS
    if not path.exists():
        raise LlmforgeError(f"conversation fixtures not found at {path}", hint="pass conversations explicitly")
    return json.loads(path.read_text())["cases"]


def collate(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge consecutive same-role messages (not tool ones) with "\\n\\n", as Ollama does before rendering."""
    out: list[dict[str, Any]] = []
    for message in messages:
        if out and out[-1]["role"] == message["role"] and message["role"] != "tool" \
                and isinstance(out[-1].get("content"), str) and isinstance(message.get("content"), str) \
                and not out[-1].get("tool_calls") and not message.get("tool_calls"):
            out[-1] = dict(out[-1], content=out[-1]["content"] + "\n\n" + message["content"])
            continue
        out.append(dict(message))
    return out


def supports(chat_template: str, needs: list[str]) -> bool:
    return all(NEEDS_PATTERNS[n].search(chat_template) for n in needs if n in NEEDS_PATTERNS)


def split_json(text: str) -> list[Any]:
    """Split text into literal pieces and parsed JSON objects/arrays (at every '{' or '[' that starts one)."""
    decoder = json.JSONDecoder()
    pieces: list[Any] = []
    literal_start = i = 0
    while i < len(text):
        if text[i] in "{[":
            try:
                value, end = decoder.raw_decode(text, i)
            except ValueError:
                i += 1
                continue
            if isinstance(value, (dict, list)) and value:
                pieces.append(text[literal_start:i])
                pieces.append(("json", json.dumps(value, sort_keys=True)))
                literal_start = i = end
                continue
        i += 1
    pieces.append(text[literal_start:])
    return pieces


def compare(jinja_text: str, go_text: str, bos: str | None) -> str:
    """exact | bos | json | different."""
    if jinja_text == go_text:
        return "exact"
    category = "json"
    if bos and jinja_text.startswith(bos) and not go_text.startswith(bos):
        jinja_text = jinja_text[len(bos):]
        if jinja_text == go_text:
            return "bos"
        category = "json"
    return category if split_json(jinja_text) == split_json(go_text) else "different"


def first_difference(a: str, b: str) -> str:
    i = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
    return f"at {i}: jinja {a[max(0, i - 20):i + 30]!r} vs go {b[max(0, i - 20):i + 30]!r}"


def check_template(chat_template: str, tokens: dict[str, str] | None = None, go_template: str | None = None,
                   conversations: list[dict[str, Any]] | None = None, name: str = "template") -> CheckReport:
    """Render Jinja and Go on each conversation the template accepts; classify every pair."""
    tokens = {k: v for k, v in (tokens or {}).items() if v is not None}
    fallback, problems = None, []
    if go_template is None:
        from .translate import translate_template

        translation = translate_template(chat_template, tokens)
        go_template, fallback, problems = translation.go_template, translation.fallback, translation.problems
    cases = conversations if conversations is not None else load_conversations()
    report = CheckReport(name, fallback=fallback, problems=problems)
    pending: list[tuple[Row, str]] = []
    jobs = []
    for case in cases:
        row = Row(case.get("name", "case"), "n/a")
        report.rows.append(row)
        if not supports(chat_template, case.get("needs", [])):
            row.detail = "template lacks " + ", ".join(case.get("needs", []))
            continue
        messages = collate(case["messages"])
        try:
            row.jinja = render_jinja(chat_template, messages, tools=case.get("tools"), special_tokens=tokens)
        except TemplateRaised as exc:
            row.detail = f"Jinja rejects it: {exc}"
            continue
        except LlmforgeError as exc:
            row.detail = f"Jinja cannot render it: {exc}"
            continue
        if "'type': 'text'" in row.jinja:
            row.detail = "template prints content parts as a Python list"
            continue
        pending.append((row, row.jinja))
        jobs.append((go_template, ollama_request(messages, case.get("tools"))))
    for (row, jinja_text), result in zip(pending, render_go_batch(jobs)):
        row.go = result.output
        if result.error:
            row.category, row.detail = ("fallback" if fallback else "different"), f"Go error: {result.error}"
            continue
        category = compare(jinja_text, result.output, tokens.get("bos_token"))
        if fallback:
            row.category = "fallback"
            row.detail = f"named {fallback}: " + ("renders equal" if category != "different" else "differs")
        else:
            row.category = category
            if category == "different":
                row.detail = first_difference(jinja_text, result.output)
    return report
